"""The distillation losses of the DistilBERT recipe, each computed in fp32 whatever the model precision.

Row tensors: every function takes logits or hidden states already gathered to the tokens the term covers
([n, V] or [n, H]), so the caller decides which tokens count (all non-pad tokens or masked ones only) once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) summed over the vocabulary, averaged over rows, times T^2.

    The T^2 keeps the gradient's scale independent of T (Hinton et al.), so the term weights of the recipe hold.
    """
    if student_logits.shape[0] == 0:
        return student_logits.float().sum() * 0.0
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2


def mlm_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the rows whose label is not -100 (the masked tokens)."""
    if (labels != -100).sum() == 0:
        return student_logits.float().sum() * 0.0
    return F.cross_entropy(student_logits.float(), labels, ignore_index=-100)


def cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student, teacher) over rows: aligns the directions of the last hidden states."""
    if student_hidden.shape[0] == 0:
        return student_hidden.float().sum() * 0.0
    return (1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)).mean()


def mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Squared error between logits summed over the vocabulary, averaged over rows (the original scripts' choice)."""
    if student_logits.shape[0] == 0:
        return student_logits.float().sum() * 0.0
    return (student_logits.float() - teacher_logits.float()).pow(2).sum(-1).mean()


@dataclass
class LossTerms:
    total: torch.Tensor
    kd: Optional[torch.Tensor] = None
    mlm: Optional[torch.Tensor] = None
    cos: Optional[torch.Tensor] = None
    mse: Optional[torch.Tensor] = None


def distillation_loss(*, student_logits: torch.Tensor, labels: torch.Tensor, student_hidden=None, teacher_hidden=None,
                      teacher_logits=None, weights, temperature: float = 2.0) -> LossTerms:
    """Weighted sum of the terms whose weight is non-zero; `weights` has kd, mlm, cos, mse (a LossConfig).

    Rows: `student_logits`/`teacher_logits` [n, V] and the hidden states [n, H] are the tokens the KD, MSE and cosine
    terms cover; `labels` [n] is -100 except on masked rows, which the MLM term covers.
    """
    terms = LossTerms(total=torch.zeros((), device=student_logits.device, dtype=torch.float32))
    if weights.mlm > 0:
        terms.mlm = mlm_loss(student_logits, labels)
        terms.total = terms.total + weights.mlm * terms.mlm
    if weights.kd > 0:
        terms.kd = kd_loss(student_logits, teacher_logits, temperature)
        terms.total = terms.total + weights.kd * terms.kd
    if weights.mse > 0:
        terms.mse = mse_loss(student_logits, teacher_logits)
        terms.total = terms.total + weights.mse * terms.mse
    if weights.cos > 0:
        terms.cos = cosine_loss(student_hidden, teacher_hidden)
        terms.total = terms.total + weights.cos * terms.cos
    return terms
