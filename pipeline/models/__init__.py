"""Models: the teacher, the student, and one masked-LM interface over BERT and DistilBERT (MaskedLM)."""
from .mlm import MaskedLM, ModelLoadError
from .student import build_student, default_layer_map
from .teacher import load_teacher

__all__ = ["MaskedLM", "ModelLoadError", "build_student", "default_layer_map", "load_teacher"]
