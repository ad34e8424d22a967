"""The KD (and MLM) loss of a BERT-style output layer computed in chunks of rows, never holding [n, V] logits.

The plain path (`pipeline/losses/distill.py`) builds teacher and student logits for every row the loss covers:
[n, V] with V = 30522, several times over once autograd keeps its intermediates. Here the logits are built
`chunk_size` rows at a time from the transformed hidden states (the MLM head's output, before the decoder),
the loss and its gradient w.r.t. the student's logits are computed on the chunk, and that gradient is pushed
through the decoder at once (into the student's transformed states, decoder weight and bias), so peak extra
memory is O(chunk_size x V). `backward` only scales the gradients saved by the forward.

Definitions are those of distill.py: `kd_loss` = KL(softmax(t/T) || softmax(s/T)) summed over the vocabulary,
averaged over rows, times T^2; `mlm_loss` = cross-entropy averaged over the rows whose label is not -100.
Softmax math runs in fp32 (or fp64 for fp64 inputs); the decoder products run in the inputs' dtype (bf16 on
GPU), exactly like the plain path's `decoder(x).float()`.

Gradients w.r.t. the student's logits z of one row (p^T = softmax(z/T), q^T = softmax(t/T), n rows, m labelled):
    d kd  / dz = T^2/n * (1/T) * (p^T - q^T) = (T/n) * (p^T - q^T)       (d/dz log p^T = (onehot - p^T)/T)
    d mlm / dz = (softmax(z) - onehot(y)) / m                             on labelled rows, 0 elsewhere

Unlike Liger-Kernel's fused linear JSD, this handles the decoder bias (BERT has one) and applies T^2.

Under ZeRO-3 the decoder weight and bias must be gathered (`deepspeed.zero.GatheredParameters`) around the call:
this function reads them directly, not through the decoder module's hooks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# keys of the stats dict; the same names as step.py's COUNTERS so a caller can add them as they are
STAT_KEYS = ("masked", "student_correct", "teacher_correct", "agree", "student_mlm", "teacher_mlm")


def _new_grads(xs: Tensor, ws: Tensor, bs: Optional[Tensor], want: tuple[bool, bool, bool], cdt) -> dict:
    return {"x": torch.zeros(xs.shape, dtype=cdt, device=xs.device) if want[0] else None,
            "w": torch.zeros(ws.shape, dtype=cdt, device=ws.device) if want[1] else None,
            "b": torch.zeros(bs.shape, dtype=cdt, device=bs.device) if want[2] else None}


def _push_through_decoder(g: Tensor, x: Tensor, ws: Tensor, acc: dict, rows: slice,
                          g_cols: Optional[Tensor] = None) -> None:
    """Accumulate the decoder's backward for logits gradient `g` [c, V] of input rows `x` [c, H]. `g_cols`:
    g's column sums, when the caller has them in a higher precision than g (the compiled path)."""
    gl = g.to(ws.dtype)  # what autograd does through the plain path's `.float()`: products in the model dtype
    if acc["x"] is not None:
        acc["x"][rows] = gl @ ws
    if acc["w"] is not None:
        if gl.dtype == acc["w"].dtype:
            acc["w"].addmm_(gl.t(), x)
        else:  # bf16 product, accumulated across chunks in fp32
            acc["w"] += gl.t() @ x
    if acc["b"] is not None:
        acc["b"] += g.sum(0) if g_cols is None else g_cols


def _fused_chunk(s: Tensor, t: Tensor, lab: Tensor, T: float, kd_scale: Tensor, mlm_w: Tensor,
                 out_dtype: torch.dtype):
    """The trainer's hot path for one chunk (labels given, fused weights, gradients wanted), written without
    in-place ops for torch.compile: it fuses these row reductions and element-wise passes over the [c, V]
    logits into a few kernels, where eager runs each op as one pass through memory, and on a GPU those passes over
    [c, V] are a large share of the whole step. Same definitions as the eager loop below.

    s, t: student and teacher logits [c, V] (model dtype); lab: labels [c]; kd_scale: (T / rows) x kd_weight and
    mlm_w: mlm_weight / labelled rows (0-d tensors). Returns (gradient w.r.t. s in out_dtype, its column sums in
    fp32 for the bias, the KL sum, the student and teacher CE sums [2], counts [4]: masked, student correct,
    teacher correct, agree)."""
    s, t = s.float(), t.float()
    msk = lab != -100
    y = lab.clamp_min(0).unsqueeze(1)
    s_lse = torch.logsumexp(s, -1, keepdim=True)
    t_lse = torch.logsumexp(t, -1, keepdim=True)
    ce_s = torch.where(msk, (s_lse - s.gather(1, y)).squeeze(1), 0.0)
    ce_t = torch.where(msk, (t_lse - t.gather(1, y)).squeeze(1), 0.0)
    s_arg, t_arg = s.argmax(-1), t.argmax(-1)
    counts = torch.stack((msk.sum(), (msk & (s_arg == lab)).sum(), (msk & (t_arg == lab)).sum(),
                          (msk & (s_arg == t_arg)).sum()))
    log_p = s / T - torch.logsumexp(s / T, -1, keepdim=True)
    log_q = t / T - torch.logsumexp(t / T, -1, keepdim=True)
    q = log_q.exp()
    kl = (q * (log_q - log_p)).sum()
    onehot = torch.arange(s.shape[1], device=s.device).unsqueeze(0) == y
    w_rows = (msk.float() * mlm_w).unsqueeze(1)
    g = (log_p.exp() - q) * kd_scale + ((s - s_lse).exp() - onehot.float()) * w_rows
    return g.to(out_dtype), g.sum(0), kl, torch.stack((ce_s.sum(), ce_t.sum())), counts


_compiled: dict = {}


def _fused_chunk_fn(compiled: bool):
    """`_fused_chunk`, through torch.compile when asked (once per process; dynamic row count for the last chunk).
    None once compiling it has failed here: the caller then runs its eager loop."""
    if not compiled:
        return _fused_chunk
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(_fused_chunk, dynamic=True, fullgraph=True)
    return _compiled["fn"]


def _compile_failed(e: Exception) -> None:
    """A compiler that fails here (no Triton, an unsupported GPU, a PyTorch bug) costs speed, not the run."""
    import warnings

    warnings.warn(f"loss.compile_chunks: torch.compile of the chunked loss failed ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); using the eager chunk loop", stacklevel=3)
    _compiled["fn"] = None


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, xt, ws, bs, wt, bt, labels, temperature, chunk_size, kd_weight, mlm_weight, stats,
                grad_enabled, compiled=False):
        n = xs.shape[0]
        cdt = torch.promote_types(xs.dtype, torch.float32)
        T = float(temperature)
        with_mlm = labels is not None
        fused = with_mlm and mlm_weight is not None
        # needs_input_grad says True under torch.no_grad too: ask the caller's grad mode as well
        need = [grad_enabled and x for x in ctx.needs_input_grad]
        want = (need[0], need[2], bs is not None and need[3])
        grad = any(want)
        # one set of gradient accumulators per differentiable output, or one for the fused weighted sum
        accs = [_new_grads(xs, ws, bs, want, cdt) for _ in range(1 if fused or not with_mlm else 2)] if grad else []
        kd_scale = T / max(n, 1) * (kd_weight if fused else 1.0)

        kd_sum = torch.zeros((), dtype=cdt, device=xs.device)
        if with_mlm:
            inv_m = 1.0 / (labels != -100).sum().clamp_min(1).to(cdt)  # a tensor: no host sync
            counts = torch.zeros(4, dtype=torch.int64, device=xs.device)  # masked, s correct, t correct, agree
            ce_sums = torch.zeros(2, dtype=cdt, device=xs.device)         # student, teacher CE on labelled rows

        fast = _fused_chunk_fn(compiled) if compiled and fused and grad and cdt == torch.float32 else None
        if fast is not None:  # tensors: a float that changes with n would make torch.compile recompile
            kd_scale_t, mlm_w = torch.tensor(kd_scale, dtype=cdt, device=xs.device), inv_m * mlm_weight
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            x = xs[rows]
            if fast is not None:
                try:
                    g, g_cols, kl, ce, cnt = fast(F.linear(x, ws, bs), F.linear(xt[rows], wt, bt), labels[rows], T,
                                                  kd_scale_t, mlm_w, ws.dtype)
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as e:  # the call has no side effects: this chunk and the rest run eagerly
                    _compile_failed(e)
                    fast = None
            if fast is not None:
                kd_sum += kl
                ce_sums += ce
                counts += cnt
                _push_through_decoder(g, x, ws, accs[0], rows, g_cols)
                del g, g_cols
                continue
            s = F.linear(x, ws, bs).to(cdt)          # fresh tensors either way, so in-place below is safe
            t = F.linear(xt[rows], wt, bt).to(cdt)

            g_mlm = None
            if with_mlm:
                lab = labels[rows]
                msk = lab != -100
                y = lab.clamp_min(0).unsqueeze(1)
                s_lse = torch.logsumexp(s, -1)
                ce_s = torch.where(msk, s_lse - s.gather(1, y).squeeze(1), 0.0)
                ce_t = torch.where(msk, torch.logsumexp(t, -1) - t.gather(1, y).squeeze(1), 0.0)
                ce_sums += torch.stack((ce_s.sum(), ce_t.sum()))
                s_arg, t_arg = s.argmax(-1), t.argmax(-1)
                counts += torch.stack((msk.sum(), (msk & (s_arg == lab)).sum(), (msk & (t_arg == lab)).sum(),
                                       (msk & (s_arg == t_arg)).sum()))
                if grad:
                    w_rows = (msk.to(cdt) * inv_m).unsqueeze(1)
                    g_mlm = (s - s_lse.unsqueeze(1)).exp_()     # softmax(s), one [c, V] buffer
                    g_mlm.scatter_add_(1, y, -msk.to(cdt).unsqueeze(1))  # - onehot(y) on labelled rows
                    g_mlm.mul_(w_rows)
                    del w_rows
                del s_lse, ce_s, ce_t, s_arg, t_arg

            s.div_(T)
            s.sub_(torch.logsumexp(s, -1, keepdim=True))   # log p^T
            t.div_(T)
            t.sub_(torch.logsumexp(t, -1, keepdim=True))   # log q^T
            q = t.exp()
            kd_sum += t.sub_(s).mul_(q).sum()              # sum q (log q - log p), as F.kl_div(log_target=True)
            del t
            if grad:
                g = s.exp_().sub_(q).mul_(kd_scale)        # (T/n)(p - q), times kd_weight when fused
                del q
                if fused:
                    terms = [g.add_(g_mlm, alpha=mlm_weight)]
                else:
                    terms = [g] if g_mlm is None else [g, g_mlm]
                for g_term, acc in zip(terms, accs):
                    _push_through_decoder(g_term, x, ws, acc, rows)
                del g, g_mlm, terms
            del s

        kd = kd_sum * (T * T / max(n, 1))
        if with_mlm:
            mlm = ce_sums[0] * inv_m
            stats.update(zip(STAT_KEYS, (*counts.unbind(), *ce_sums.unbind())))
        else:
            mlm = torch.zeros((), dtype=cdt, device=xs.device)
            ctx.mark_non_differentiable(mlm)
        ctx.accs, ctx.fused, ctx.weights = accs, fused, (kd_weight, mlm_weight)
        ctx.dtypes = (xs.dtype, ws.dtype, None if bs is None else bs.dtype)
        return kd, mlm

    @staticmethod
    def backward(ctx, g_kd, g_mlm):
        if not ctx.accs:
            return (None,) * 14
        if ctx.fused:
            a, b = ctx.weights
            # The saved gradient is that of a*kd + b*mlm: right only when the caller's grad_outputs keep that
            # ratio (any common factor, e.g. loss scaling or 1/accumulation, is fine). Checked without a sync.
            # A non-finite grad_output passes: it makes the gradients non-finite, which the overflow check handles.
            ratio_kept = (g_kd * b - g_mlm * a).abs() <= 1e-4 * ((g_kd * b).abs() + (g_mlm * a).abs()) + 1e-30
            torch._assert_async(ratio_kept | ~torch.isfinite(g_kd * b - g_mlm * a),
                                "chunked_kd_loss(mlm_weight=...) saved the gradient of kd_weight*kd + mlm_weight*mlm; "
                                "backward must see grad_outputs in that ratio (use those weights in the total loss)")
            scales = [(g_kd * a + g_mlm * b) / (a * a + b * b)]
        else:
            scales = [g_kd, g_mlm][:len(ctx.accs)]
        out = []
        for key, dtype in zip(("x", "w", "b"), ctx.dtypes):
            parts = [acc[key] * sc for acc, sc in zip(ctx.accs, scales) if acc[key] is not None]
            out.append(None if not parts else sum(parts[1:], parts[0]).to(dtype))
        gx, gw, gb = out
        return gx, None, gw, gb, None, None, None, None, None, None, None, None, None, None


@torch.compiler.disable  # eager under a compiled student: a Python loop over chunks with a side-channel stats dict
def chunked_kd_loss(student_transformed: Tensor, teacher_transformed: Tensor,
                    student_weight: Tensor, student_bias: Optional[Tensor],
                    teacher_weight: Tensor, teacher_bias: Optional[Tensor],
                    temperature: float, labels: Optional[Tensor] = None, chunk_size: int = 4096, *,
                    kd_weight: float = 1.0, mlm_weight: Optional[float] = None, compiled: bool = False,
                    ) -> tuple[Tensor, Optional[Tensor], dict]:
    """KD loss (and, with `labels`, the MLM loss) from the transformed hidden states [n, H] through the
    decoders (weight [V, H], bias [V] or None), `chunk_size` rows of logits at a time.

    Returns (kd, mlm, stats): kd and mlm are fp32 scalars (fp64 for fp64 inputs) equal to distill.kd_loss and
    distill.mlm_loss on the full logits; mlm is None without labels. Gradients reach student_transformed,
    student_weight and student_bias only; the teacher side is never differentiated.

    Gradients are computed during this call. By default each returned loss carries its own exact gradient,
    which costs a second pair of decoder products per chunk when `labels` is given. With `mlm_weight` (and
    `kd_weight`) set, only the gradient of kd_weight * kd + mlm_weight * mlm is built (one pair of products):
    the caller's total loss must then weight the two terms in that ratio (checked in backward).

    `compiled`: with labels, `mlm_weight` and gradients (the trainer's case) in fp32 math, run each chunk's
    softmax math through torch.compile (`_fused_chunk`): the same values, fused kernels. For CUDA; compiling
    costs seconds on first use.

    stats (labels given, else empty): 0-d tensors over the labelled rows, named like step.py's counters:
    masked (count), student_correct / teacher_correct (argmax == label), agree (student argmax == teacher
    argmax), student_mlm / teacher_mlm (cross-entropy sums).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, h = student_transformed.shape
    if teacher_transformed.shape[0] != n:
        raise ValueError(f"student has {n} rows, teacher {teacher_transformed.shape[0]}")
    if student_weight.shape[1] != h or student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"decoder shapes: student {list(student_weight.shape)} for hidden {h}, teacher "
                         f"{list(teacher_weight.shape)}: need [V, H] with the same V")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must be [{n}], got {list(labels.shape)}")
    if mlm_weight is not None and kd_weight == 0 and mlm_weight == 0:
        raise ValueError("kd_weight and mlm_weight cannot both be 0")
    detach = (lambda v: None if v is None else v.detach())
    stats: dict = {}
    kd, mlm = _ChunkedKD.apply(student_transformed, detach(teacher_transformed), student_weight, student_bias,
                               detach(teacher_weight), detach(teacher_bias), labels, float(temperature),
                               int(chunk_size), float(kd_weight), None if mlm_weight is None else float(mlm_weight),
                               stats, torch.is_grad_enabled(), bool(compiled))
    return kd, (mlm if labels is not None else None), stats
