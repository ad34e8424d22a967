"""Models: the teacher, the student, and one masked-LM interface over BERT and DistilBERT (MaskedLM)."""
from .compat import compatibility_problems
from .mlm import MaskedLM, ModelLoadError
from .student import build_student, default_layer_map
from .teacher import load_teacher

__all__ = ["MaskedLM", "ModelLoadError", "build_student", "compatibility_problems", "default_layer_map",
           "load_teacher"]
