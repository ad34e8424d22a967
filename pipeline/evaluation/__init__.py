"""Evaluation of a student (or the teacher): masked-LM evaluation (`mlm_eval.py`), student-vs-teacher comparison
(`compare.py`), and downstream fine-tuning on transformers' Trainer: labelled data through `datasets`
(`data.py`), task metrics (`metrics.py`), classification / regression fine-tuning (`finetune.py`), SQuAD
(`squad.py`), the GLUE suite (`glue.py`), the per-class report (`report.py`). The fine-tuning modules are
imported on demand: they pull in torch and transformers."""
from .report import classification_report, confusion_matrix, format_report

__all__ = ["classification_report", "confusion_matrix", "format_report"]
