"""DistilBERT-style distillation pipeline: data preparation, training data, models, losses, training."""
