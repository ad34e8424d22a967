"""Training data: reading prepared datasets, cutting sequences, masking, and the rank-aware stream."""
from .prepared import DatasetError, PreparedDataset
from .sequences import SequenceDataset

# Masking and the loader import torch (seconds); data preparation imports this package for the reader only,
# so those names load on first use.
_LAZY = {"Masker": "masking", "word_starts": "masking", "EvalBatches": "loader", "TrainStream": "loader",
         "rank_positions": "loader"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DatasetError", "EvalBatches", "Masker", "PreparedDataset", "SequenceDataset", "TrainStream",
           "rank_positions", "word_starts"]
