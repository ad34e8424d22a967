"""Training data: reading prepared datasets."""
from .prepared import DatasetError, PreparedDataset

__all__ = ["DatasetError", "PreparedDataset"]
