"""The chunked KD/MLM loss against the plain path (full logits, the losses of distill.py, autograd)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.losses.chunked import STAT_KEYS, chunked_kd_loss
from pipeline.losses.distill import kd_loss, mlm_loss

N, H, V = 23, 6, 31


def _case(dtype=torch.float64, n=N, h=H, v=V, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    xs, ws, bs = r(n, h), r(v, h), (r(v) if bias else None)
    xt, wt, bt = r(n, h) * 1.5, r(v, h), (r(v) if bias else None)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.5] = -100
    return [xs, xt, ws, bs, wt, bt], labels


def _leaves(ts):
    return [None if t is None else t.clone().requires_grad_(True) for t in ts]


# distill.kd_loss / mlm_loss cast to fp32 inside; these are the same definitions without the cast, so the fp64
# comparison can be exact to 1e-10 (test_plain_losses_agree_in_fp32 checks against distill.py itself).
def _kd64(s, t, T):
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True) * T * T


def _mlm64(s, labels):
    if (labels != -100).sum() == 0:
        return s.sum() * 0.0
    return F.cross_entropy(s, labels, ignore_index=-100)


def _plain(xs, xt, ws, bs, wt, bt, T, labels, kd=_kd64, mlm=_mlm64):
    s = F.linear(xs, ws, bs)
    with torch.no_grad():
        t = F.linear(xt, wt, bt)
    return kd(s, t, T), (mlm(s, labels) if labels is not None else None)


def _grads(loss, params):
    params = [p for p in params if p is not None]
    return torch.autograd.grad(loss, params, retain_graph=True)


def _close(a, b, tol):
    assert a.dtype == b.dtype
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item()), (a - b).abs().max().item()


@pytest.mark.parametrize("chunk", [1, 7, N, N + 9])
@pytest.mark.parametrize("T", [1.0, 2.0, 3.5])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_labels", [True, False])
def test_matches_plain_loss_and_gradients_fp64(chunk, T, bias, with_labels):
    ts, labels = _case(bias=bias)
    labels = labels if with_labels else None
    xs, xt, ws, bs, wt, bt = _leaves(ts)
    kd, mlm, stats = chunked_kd_loss(xs, xt, ws, bs, wt, bt, T, labels, chunk)
    px, pxt, pw, pb, pwt, pbt = _leaves(ts)
    kd_ref, mlm_ref = _plain(px, pxt, pw, pb, pwt, pbt, T, labels)

    _close(kd, kd_ref, 1e-10)
    for a, b in zip(_grads(kd, [xs, ws, bs]), _grads(kd_ref, [px, pw, pb])):
        _close(a, b, 1e-10)
    if with_labels:
        _close(mlm, mlm_ref, 1e-10)
        for a, b in zip(_grads(mlm, [xs, ws, bs]), _grads(mlm_ref, [px, pw, pb])):
            _close(a, b, 1e-10)
        for a, b in zip(_grads(5 * kd + 2 * mlm, [xs, ws, bs]), _grads(5 * kd_ref + 2 * mlm_ref, [px, pw, pb])):
            _close(a, b, 1e-10)
        assert set(stats) == set(STAT_KEYS)
    else:
        assert mlm is None and stats == {}


@pytest.mark.parametrize("chunk", [1, 7, N + 9])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_fused_weights_match_plain_total_fp64(chunk, T):
    ts, labels = _case()
    xs, xt, ws, bs, wt, bt = _leaves(ts)
    kd, mlm, _ = chunked_kd_loss(xs, xt, ws, bs, wt, bt, T, labels, chunk, kd_weight=5.0, mlm_weight=2.0)
    px, pxt, pw, pb, pwt, pbt = _leaves(ts)
    kd_ref, mlm_ref = _plain(px, pxt, pw, pb, pwt, pbt, T, labels)
    _close(kd, kd_ref, 1e-10)
    _close(mlm, mlm_ref, 1e-10)
    # any common factor (loss scaling, 1/accumulation) is fine; the cosine term's own graph is untouched
    total, total_ref = 0.25 * (5 * kd + 2 * mlm + xs.sum()), 0.25 * (5 * kd_ref + 2 * mlm_ref + px.sum())
    for a, b in zip(_grads(total, [xs, ws, bs]), _grads(total_ref, [px, pw, pb])):
        _close(a, b, 1e-10)


def test_fused_refuses_a_backward_in_another_ratio():
    ts, labels = _case()
    xs, xt, ws, bs, wt, bt = _leaves(ts)
    kd, mlm, _ = chunked_kd_loss(xs, xt, ws, bs, wt, bt, 2.0, labels, 8, kd_weight=5.0, mlm_weight=2.0)
    with pytest.raises(RuntimeError, match="ratio"):
        kd.backward()


def test_fused_passes_a_non_finite_loss_on_as_non_finite_gradients():
    """A NaN total (a bad batch, or the trainer's fault injection) must reach the optimizer's overflow check as NaN
    gradients, not stop the process in the ratio check."""
    ts, labels = _case()
    xs, xt, ws, bs, wt, bt = _leaves(ts)
    kd, mlm, _ = chunked_kd_loss(xs, xt, ws, bs, wt, bt, 2.0, labels, 8, kd_weight=5.0, mlm_weight=2.0)
    ((5 * kd + 2 * mlm) * float("nan")).backward()
    assert torch.isnan(xs.grad).all() and torch.isnan(ws.grad).all() and torch.isnan(bs.grad).all()


def test_plain_losses_agree_in_fp32():
    """Against distill.py itself (fp32 inside), on fp32 inputs."""
    ts, labels = _case(torch.float32)
    xs, xt, ws, bs, wt, bt = _leaves(ts)
    kd, mlm, _ = chunked_kd_loss(xs, xt, ws, bs, wt, bt, 2.0, labels, 5)
    px, pxt, pw, pb, pwt, pbt = _leaves(ts)
    kd_ref, mlm_ref = _plain(px, pxt, pw, pb, pwt, pbt, 2.0, labels, kd=kd_loss, mlm=mlm_loss)
    assert kd.dtype == mlm.dtype == torch.float32
    assert kd.item() == pytest.approx(kd_ref.item(), rel=1e-5)
    assert mlm.item() == pytest.approx(mlm_ref.item(), rel=1e-5)
    for a, b in zip(_grads(2 * kd + mlm, [xs, ws, bs]), _grads(2 * kd_ref + mlm_ref, [px, pw, pb])):
        _close(a, b, 1e-5)


def test_bf16_inputs_give_fp32_losses_close_to_fp32_reference():
    ts, labels = _case(torch.float32)
    xs, xt, ws, bs, wt, bt = _leaves([t.bfloat16() for t in ts])
    kd, mlm, _ = chunked_kd_loss(xs, xt, ws, bs, wt, bt, 2.0, labels, 6)
    assert kd.dtype == mlm.dtype == torch.float32
    (kd + mlm).backward()
    assert xs.grad.dtype == ws.grad.dtype == bs.grad.dtype == torch.bfloat16
    px, pxt, pw, pb, pwt, pbt = _leaves(ts)
    kd_ref, mlm_ref = _plain(px, pxt, pw, pb, pwt, pbt, 2.0, labels, kd=kd_loss, mlm=mlm_loss)
    (kd_ref + mlm_ref).backward()
    assert kd.item() == pytest.approx(kd_ref.item(), rel=5e-2)
    assert mlm.item() == pytest.approx(mlm_ref.item(), rel=5e-2)
    for a, b in ((xs.grad, px.grad), (ws.grad, pw.grad), (bs.grad, pb.grad)):
        _close(a.float(), b, 5e-2)


def test_stats_match_full_logits():
    ts, labels = _case()
    xs, xt, ws, bs, wt, bt = ts
    _, _, stats = chunked_kd_loss(xs, xt, ws, bs, wt, bt, 2.0, labels, 4)
    s, t = F.linear(xs, ws, bs), F.linear(xt, wt, bt)
    m = labels != -100
    gold, s_pred, t_pred = labels[m], s[m].argmax(-1), t[m].argmax(-1)
    assert stats["masked"].item() == m.sum().item()
    assert stats["student_correct"].item() == (s_pred == gold).sum().item()
    assert stats["teacher_correct"].item() == (t_pred == gold).sum().item()
    assert stats["agree"].item() == (s_pred == t_pred).sum().item()
    assert stats["student_mlm"].item() == pytest.approx(F.cross_entropy(s[m], gold, reduction="sum").item(), rel=1e-12)
    assert stats["teacher_mlm"].item() == pytest.approx(F.cross_entropy(t[m], gold, reduction="sum").item(), rel=1e-12)
    # a sanity check that the case is not degenerate
    assert 0 < stats["masked"].item() < N


def test_teacher_never_gets_gradients_and_empty_cases_are_zero():
    ts, labels = _case()
    xs, xt, ws, bs, wt, bt = _leaves(ts)
    kd, mlm, _ = chunked_kd_loss(xs, xt, ws, bs, wt, bt, 2.0, labels, 4)
    (kd + mlm).backward()
    assert xt.grad is None and wt.grad is None and bt.grad is None
    assert ws.grad is not None

    none_labelled = torch.full((N,), -100)
    xs, xt, ws, bs, wt, bt = _leaves(ts)
    kd, mlm, stats = chunked_kd_loss(xs, xt, ws, bs, wt, bt, 2.0, none_labelled, 4)
    assert mlm.item() == 0.0 and stats["masked"].item() == 0 and stats["student_mlm"].item() == 0.0
    mlm.backward()
    assert xs.grad.abs().max().item() == 0.0

    empty = [t[:0] if t.shape[0] == N else t for t in ts]
    xs, xt, ws, bs, wt, bt = _leaves(empty)
    kd, mlm, _ = chunked_kd_loss(xs, xt, ws, bs, wt, bt, 2.0, labels[:0], 4)
    assert kd.item() == 0.0 and mlm.item() == 0.0
    (kd + mlm).backward()
    assert ws.grad.abs().max().item() == 0.0


class _Recorder(TorchDispatchMode):
    """Records every op's output sizes (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numels, self.ops = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.numels.append(o.numel())
        return out


@pytest.mark.parametrize("mlm_weight", [None, 2.0])
def test_never_allocates_full_logits(mlm_weight):
    n, h, v, chunk = 64, 8, 1000, 16      # chunk x V = 16,000 >= V x H = 8,000; n x V = 64,000
    ts, labels = _case(torch.float32, n=n, h=h, v=v)
    xs, xt, ws, bs, wt, bt = _leaves(ts)
    with _Recorder() as rec:
        kd, mlm, _ = chunked_kd_loss(xs, xt, ws, bs, wt, bt, 2.0, labels, chunk, kd_weight=5.0, mlm_weight=mlm_weight)
        (5 * kd + 2 * mlm).backward()
    assert max(rec.numels) <= chunk * v
    # the recorder does see the plain path's full logits
    with _Recorder() as rec:
        F.linear(xs, ws, bs)
    assert max(rec.numels) == n * v


def test_no_gradient_work_without_grad():
    ts, labels = _case(torch.float32)
    with torch.no_grad(), _Recorder() as rec:
        chunked_kd_loss(*_leaves(ts), 2.0, labels, 8)
    # only the forward products (student and teacher logits per chunk): no decoder backward products
    n_chunks = -(-N // 8)
    products = [op for op in rec.ops if op.startswith(("aten.addmm", "aten.mm", "aten.linear", "aten.matmul"))]
    assert len(products) == 2 * n_chunks


def test_bad_arguments_are_refused():
    ts, labels = _case()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_kd_loss(*ts, 2.0, labels, 0)
    with pytest.raises(ValueError, match="temperature"):
        chunked_kd_loss(*ts, 0.0, labels, 4)
    with pytest.raises(ValueError, match="labels"):
        chunked_kd_loss(*ts, 2.0, labels[:3], 4)


@pytest.mark.parametrize("chunk", [7, N + 9])
def test_the_compiled_path_computes_the_same_loss_gradients_and_stats(chunk, monkeypatch):
    """`compiled=True` routes each chunk through `_fused_chunk` (torch.compile'd on GPU). Here it runs eagerly
    (compiling on CPU needs a C++ toolchain and minutes): the same values as the in-place loop, fp32."""
    import pipeline.losses.chunked as chunked

    used = []
    monkeypatch.setattr(chunked, "_fused_chunk_fn", lambda compiled: used.append(compiled) or chunked._fused_chunk)
    ts, labels = _case(torch.float32)
    results = []
    for compiled in (False, True):
        xs, xt, ws, bs, wt, bt = _leaves(ts)
        kd, mlm, stats = chunked_kd_loss(xs, xt, ws, bs, wt, bt, 2.0, labels, chunk, kd_weight=5.0, mlm_weight=2.0,
                                         compiled=compiled)
        (0.5 * (5 * kd + 2 * mlm)).backward()
        results.append((kd, mlm, stats, xs.grad, ws.grad, bs.grad))
    assert used == [True]
    (kd0, mlm0, st0, *g0), (kd1, mlm1, st1, *g1) = results
    torch.testing.assert_close(kd1, kd0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mlm1, mlm0, rtol=1e-6, atol=1e-7)
    for k in STAT_KEYS:
        torch.testing.assert_close(st1[k], st0[k], rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_compiler_that_fails_falls_back_to_the_eager_loop(monkeypatch):
    """torch.compile failing on the first chunk (no Triton, say) warns once and the loss is the eager one."""
    import pipeline.losses.chunked as chunked

    def broken(*a):
        raise RuntimeError("triton not found")

    monkeypatch.setattr(chunked, "_compiled", {"fn": broken})
    ts, labels = _case(torch.float32)
    out = []
    for compiled in (True, True, False):
        xs, xt, ws, bs, wt, bt = _leaves(ts)
        if compiled and not out:
            with pytest.warns(UserWarning, match="compile_chunks.*triton not found.*eager"):
                kd, mlm, _ = chunked_kd_loss(xs, xt, ws, bs, wt, bt, 2.0, labels, 7, kd_weight=5.0, mlm_weight=2.0,
                                             compiled=True)
        else:
            kd, mlm, _ = chunked_kd_loss(xs, xt, ws, bs, wt, bt, 2.0, labels, 7, kd_weight=5.0, mlm_weight=2.0,
                                         compiled=compiled)
        (5 * kd + 2 * mlm).backward()
        out.append((kd.detach(), mlm.detach(), xs.grad, ws.grad, bs.grad))
    assert chunked._compiled["fn"] is None  # not tried again
    for a, b in zip(out[0], out[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(out[1], out[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
