"""Evaluation of a student (or the teacher). Downstream fine-tuning on sequence classification: labelled data
(`classify_data.py`), the fine-tuning loop (`finetune.py`, imported on demand: it pulls in torch and
transformers), and the per-class report (`report.py`)."""
from .classify_data import ClassificationData, ClassifyDataError, Split, load_classification_data
from .report import classification_report, format_report

__all__ = ["ClassificationData", "ClassifyDataError", "Split", "classification_report", "format_report",
           "load_classification_data"]
