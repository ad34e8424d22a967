"""Each loss term against an independent computation in fp64 (explicit sums, no torch.nn.functional)."""
import math

import pytest
import torch

from pipeline.losses.distill import cosine_loss, distillation_loss, kd_loss, mlm_loss, mse_loss
from pipeline.training.config import LossConfig


def _rows(n=7, v=11, h=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * 3, torch.randn(n, v, generator=g, dtype=torch.float64) * 3,
            torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(n, h, generator=g, dtype=torch.float64))


def _softmax(row, T):
    m = max(row)
    e = [math.exp((x - m) / T) for x in row]
    z = sum(e)
    return [x / z for x in e]


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_matches_explicit_kl_times_t2(T):
    s, t, _, _ = _rows()
    want = 0.0
    for i in range(s.shape[0]):
        p_t, p_s = _softmax(t[i].tolist(), T), _softmax(s[i].tolist(), T)
        want += sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s))
    want = want / s.shape[0] * T * T
    assert kd_loss(s, t, T).item() == pytest.approx(want, rel=1e-6)  # fp32 inside: ~1e-7 relative


def test_kd_is_zero_for_identical_logits_and_positive_otherwise():
    s, t, _, _ = _rows()
    assert kd_loss(s, s, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(s, t, 2.0).item() > 0


def test_mlm_is_mean_ce_over_labelled_rows():
    s, _, _, _ = _rows()
    labels = torch.tensor([3, -100, 0, -100, 10, 5, -100])
    want, n = 0.0, 0
    for i, y in enumerate(labels.tolist()):
        if y == -100:
            continue
        row = s[i].tolist()
        m = max(row)
        want += -(row[y] - m - math.log(sum(math.exp(x - m) for x in row)))
        n += 1
    assert mlm_loss(s, labels).item() == pytest.approx(want / n, rel=1e-6)


def test_cosine_and_mse():
    _, _, a, b = _rows()
    want = 0.0
    for x, y in zip(a.tolist(), b.tolist()):
        dot = sum(p * q for p, q in zip(x, y))
        want += 1 - dot / (math.sqrt(sum(p * p for p in x)) * math.sqrt(sum(q * q for q in y)))
    assert cosine_loss(a, b).item() == pytest.approx(want / len(a), rel=1e-6)
    s, t, _, _ = _rows()
    want = sum(sum((p - q) ** 2 for p, q in zip(x, y)) for x, y in zip(s.tolist(), t.tolist())) / s.shape[0]
    assert mse_loss(s, t).item() == pytest.approx(want, rel=1e-6)


def test_weighted_total_and_off_terms():
    s, t, a, b = _rows()
    labels = torch.tensor([3, -100, 0, -100, 10, 5, -100])
    w = LossConfig(kd=5.0, mlm=2.0, cos=1.0, mse=0.5, temperature=2.0)
    terms = distillation_loss(student_logits=s, labels=labels, student_hidden=a, teacher_hidden=b, teacher_logits=t,
                              weights=w, temperature=2.0)
    want = 5 * kd_loss(s, t, 2.0) + 2 * mlm_loss(s, labels) + cosine_loss(a, b) + 0.5 * mse_loss(s, t)
    assert terms.total.item() == pytest.approx(want.item(), rel=1e-6)
    assert terms.total.dtype == torch.float32
    mlm_only = distillation_loss(student_logits=s, labels=labels, weights=LossConfig(kd=0, mlm=1, cos=0, mse=0))
    assert mlm_only.kd is None and mlm_only.cos is None
    assert mlm_only.total.item() == pytest.approx(mlm_loss(s, labels).item(), rel=1e-6)


def test_losses_are_fp32_from_bf16_inputs_and_differentiable():
    s, t, a, b = (x.to(torch.bfloat16) for x in _rows())
    s.requires_grad_(True)
    a.requires_grad_(True)
    terms = distillation_loss(student_logits=s, labels=torch.tensor([1, 2, -100, 3, -100, -100, 4]), student_hidden=a,
                              teacher_hidden=b, teacher_logits=t, weights=LossConfig(), temperature=2.0)
    assert terms.kd.dtype == terms.mlm.dtype == terms.cos.dtype == torch.float32
    terms.total.backward()
    assert s.grad is not None and torch.isfinite(s.grad.float()).all()


def test_empty_rows_give_zero_not_nan():
    s = torch.zeros(0, 11)
    assert kd_loss(s, s, 2.0).item() == 0.0
    assert mlm_loss(s, torch.zeros(0, dtype=torch.long)).item() == 0.0
