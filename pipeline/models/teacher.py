"""The teacher: a trained masked LM, loaded frozen.

It stays a plain module outside deepspeed.initialize (a teacher inside ZeRO-3 gets partitioned and has
crashed runs); the trainer runs it under torch.inference_mode().
"""
from __future__ import annotations

import torch

from .mlm import MaskedLM, ModelLoadError, load_hf_masked_lm

__all__ = ["ModelLoadError", "load_teacher"]


def load_teacher(name_or_path: str, *, dtype: torch.dtype = torch.float32, device="cpu") -> MaskedLM:
    """Load a BERT, DistilBERT or RoBERTa masked LM (hub name, or a local folder offline) as a frozen
    teacher: no parameter requires grad, eval mode (dropout off), cast to `dtype`, on `device`.

    Refuses (ModelLoadError) a checkpoint whose MLM head or encoder weights are missing: transformers would
    initialise them at random and the student would be distilled from noise without any error.
    """
    hf, missing_head, missing_other = load_hf_masked_lm(name_or_path, dtype=dtype)
    if missing_head:
        raise ModelLoadError(
            f"{name_or_path!r} has no trained MLM head (missing from the checkpoint: {', '.join(missing_head)}); "
            f"it is a bare encoder (e.g. a sentence-embedding model), not a masked LM, so its logits would be "
            f"random. Use a masked-LM checkpoint as the teacher, or pretrain one with the teacher-free stage "
            f"(student init 'pretrained' from this encoder, MLM loss only) and pass that run's saved model.")
    if missing_other:
        raise ModelLoadError(f"{name_or_path!r} is missing encoder weights ({len(missing_other)}, e.g. "
                             f"{', '.join(missing_other[:4])}): the checkpoint is incomplete or of another "
                             f"architecture than its config.json says")
    hf.requires_grad_(False)
    model = MaskedLM(hf).to(device=device, dtype=dtype)
    return model.eval()
