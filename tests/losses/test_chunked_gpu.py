"""On a CUDA GPU (pytest -m gpu): the chunked KD + MLM loss in bf16 at BERT-base's sizes against the plain path
(full logits, distill.py), both measured against an fp64 reference of the same inputs. The chunked loss must be
at least as accurate as the plain bf16 path, and its peak memory (the reason it exists) far below it."""
from __future__ import annotations

import pytest
import torch

from pipeline.losses.chunked import chunked_kd_loss
from pipeline.losses.distill import kd_loss, mlm_loss

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

N, H, V, T = 4096, 768, 30522, 2.0


def _inputs(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, device="cuda", dtype=torch.float64) * scale  # noqa: E731
    xs, xt = r(N, H), r(N, H) * 1.2
    ws, wt = r(V, H, scale=H ** -0.5), r(V, H, scale=H ** -0.5)
    bs, bt = r(V, scale=0.1), r(V, scale=0.1)
    labels = torch.randint(0, V, (N,), generator=g, device="cuda")
    labels[torch.rand(N, generator=g, device="cuda") > 0.15] = -100
    return (xs, xt, ws, bs, wt, bt), labels


def _plain(xs, xt, ws, bs, wt, bt, labels):
    s = torch.nn.functional.linear(xs, ws, bs)
    with torch.no_grad():
        t = torch.nn.functional.linear(xt, wt, bt)
    return 5 * kd_loss(s, t, T) + 2 * mlm_loss(s, labels)


def _chunked(xs, xt, ws, bs, wt, bt, labels):
    kd, mlm, _ = chunked_kd_loss(xs, xt, ws, bs, wt, bt, T, labels, 1024, kd_weight=5.0, mlm_weight=2.0)
    return 5 * kd + 2 * mlm


def _run(fn, ts, labels, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(i in (0, 2, 3)) for i, t in enumerate(ts)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fn(*leaves, labels)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return loss.detach().double(), [leaves[i].grad.double() for i in (0, 2, 3)], peak


@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_bf16_is_as_accurate_as_plain_bf16_and_smaller(seed):
    ts, labels = _inputs(seed)
    ref_loss, ref_grads, _ = _run(_plain, ts, labels, torch.float64)
    p_loss, p_grads, p_peak = _run(_plain, ts, labels, torch.bfloat16)
    c_loss, c_grads, c_peak = _run(_chunked, ts, labels, torch.bfloat16)
    assert torch.isfinite(c_loss)
    p_err, c_err = abs(p_loss - ref_loss) / ref_loss, abs(c_loss - ref_loss) / ref_loss
    assert c_err <= 2 * p_err + 1e-3, (p_err.item(), c_err.item())
    for p, c, r in zip(p_grads, c_grads, ref_grads):
        pe, ce = ((p - r).norm() / r.norm()).item(), ((c - r).norm() / r.norm()).item()
        assert ce <= 1.5 * pe + 5e-3, (pe, ce)
    assert c_peak < p_peak / 2, (c_peak / 2 ** 20, p_peak / 2 ** 20)


def test_compiled_chunks_match_eager_and_use_no_more_memory():
    """loss.compile_chunks (the GPU default): the chunk's softmax math through torch.compile gives the eager
    loop's losses, statistics and gradients, within bf16 rounding of the logits' gradient, in no more memory."""
    ts, labels = _inputs(2)

    def run(compiled):
        leaves = [t.detach().to(torch.bfloat16).requires_grad_(i in (0, 2, 3)) for i, t in enumerate(ts)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        kd, mlm, stats = chunked_kd_loss(*leaves, T, labels, 1024, kd_weight=5.0, mlm_weight=2.0, compiled=compiled)
        (5 * kd + 2 * mlm).backward()
        torch.cuda.synchronize()
        return kd, mlm, stats, [leaves[i].grad.float() for i in (0, 2, 3)], torch.cuda.max_memory_allocated() - base

    eager = run(False)
    run(True)  # compiles
    comp = run(True)
    torch.testing.assert_close(comp[0], eager[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(comp[1], eager[1], rtol=1e-4, atol=1e-6)
    assert comp[2]["masked"] == eager[2]["masked"]
    for k in ("student_correct", "teacher_correct", "agree"):
        assert abs(int(comp[2][k]) - int(eager[2][k])) <= 2, k  # argmax ties may break either way
    for a, b in zip(comp[3], eager[3]):
        assert ((a - b).norm() / b.norm()).item() < 1e-2
    assert comp[4] <= 1.1 * eager[4], (comp[4] / 2 ** 20, eager[4] / 2 ** 20)
