"""Unpadded (variable-length) encoder forward for one-document-per-row batches.

Document mode pads every row to the batch's longest document. Padded tokens cost every matmul of every layer,
and a padding mask keeps SDPA off its FlashAttention kernel. Unpadding removes both: the rows' real tokens
are packed into one sequence of T tokens (position ids restarting at each document, taken from the padded
layout so the embeddings are unchanged), and attention runs per document from the cumulative lengths
`cu_seqlens` [N + 1]: on CUDA in bf16/fp16 through PyTorch's FlashAttention varlen kernel
(`torch.nn.attention.varlen.varlen_attn`), elsewhere through SDPA document by document, which is exact and is
what the CPU tests compare against the padded forward. The encoder output is scattered back to [B, L, H]
(zeros on padding), so everything downstream sees the padded layout.

The attention function is registered with transformers' AttentionInterface as "distil_varlen". It receives
the packing through the attention kwargs that BERT and DistilBERT forward down to it (`cu_seq_lens_q`,
`max_length_q`), and without them it is plain SDPA, so a model switched to it still runs unpadded batches
(packed mode, evaluation) the usual way.

PyTorch's public varlen kernel has no dropout. A training forward with attention dropout > 0 (the recipe's
student) uses FlashAttention's varlen forward and backward ATen ops with dropout directly (`_FlashVarlenDropout`).
Those are private, so each kernel runs a self-check once per process before it is used (`kernel_works`,
`dropout_kernel_works`). `plan` picks a model's path once, at start-up: a kernel on CUDA in bf16/fp16, the exact
per-document path on CPU, and the padded forward on a GPU where no kernel passes its check (document-by-document
SDPA is slower than padding there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "distil_varlen"
_registered = False


def register() -> str:
    """Register the attention function with transformers (once) and return its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention)
        _registered = True
    return ATTN_IMPLEMENTATION


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """The real tokens of a padded batch as one sequence.

    Returns input_ids and position_ids [1, T] (each token keeps the position it had in its row, so a
    right-padded document gets 0..len-1), `index` [T] (flat positions in the B x L batch, row-major),
    cu_seqlens [N + 1] int32 and max_len (an int: one host sync). Rows without any real token are left out
    (they would be zero-length documents)."""
    L = input_ids.shape[1]
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    index = mask.reshape(-1).nonzero().squeeze(1)
    lengths = lengths[lengths > 0]
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=input_ids.device)
    cu[1:] = lengths.cumsum(0)
    return {"input_ids": input_ids.reshape(-1)[index].unsqueeze(0),
            "position_ids": (index % L).unsqueeze(0), "index": index, "cu_seqlens": cu,
            "max_len": int(lengths.max()) if lengths.numel() else 0}


def unpack(hidden: torch.Tensor, index: torch.Tensor, batch_shape: tuple[int, int]) -> torch.Tensor:
    """[1, T, H] packed encoder output back to [B, L, H], zeros at padding (differentiable)."""
    B, L = batch_shape
    out = hidden.new_zeros(B * L, hidden.shape[-1])
    return out.index_copy(0, index, hidden[0]).view(B, L, -1)


KERNEL = "FlashAttention varlen kernel"
DROPOUT_KERNEL = "FlashAttention varlen kernel with dropout"
EXACT = "SDPA per document"
PADDED = "padded"


def wants_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the FlashAttention varlen kernels serve this device and dtype (CUDA, bf16 or fp16)."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def _kernel(query, key, value, cu, max_len, scaling):
    """[T, H, D] tensors through PyTorch's varlen FlashAttention (CUDA only, no dropout)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(query, key, value, cu, cu, max_len, max_len, scale=scaling)


def _flash_forward(q, k, v, cu, max_len, dropout, scaling):
    """FlashAttention's varlen forward with dropout (the ATen op under varlen_attn, which fixes dropout at 0).
    Returns (out, logsumexp, rng_state, unused): the last three are what the backward needs."""
    out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, dropout, False, False, scale=scaling)
    return out, lse, rng_state, unused


def _flash_backward(grad, q, k, v, out, lse, cu, max_len, dropout, rng_state, unused, scaling):
    """FlashAttention's varlen backward: regenerates the forward's dropout mask from rng_state."""
    return torch.ops.aten._flash_attention_backward(
        grad, q, k, v, out, lse, cu, cu, max_len, max_len, dropout, False, rng_state, unused, scale=scaling)


class _FlashVarlenDropout(torch.autograd.Function):
    """Varlen FlashAttention with attention dropout, forward and backward ([T, H, D] tensors). The dropout mask
    comes from the CUDA generator's Philox stream, so a recomputed forward (activation checkpointing restores
    the RNG state) draws the same mask."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, dropout, scaling):
        out, lse, rng_state, unused = _flash_forward(q, k, v, cu, max_len, dropout, scaling)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng_state, unused)
        ctx.max_len, ctx.dropout, ctx.scaling = max_len, dropout, scaling
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = _flash_backward(grad.contiguous(), q, k, v, out, lse, cu, ctx.max_len, ctx.dropout, rng_state,
                                     unused, ctx.scaling)
        return dq, dk, dv, None, None, None, None


def _dropout_kernel(query, key, value, cu, max_len, dropout, scaling):
    return _FlashVarlenDropout.apply(query, key, value, cu, max_len, float(dropout), scaling)


_kernel_checked: dict = {}


def _check_problem(device, dtype, head_dim):
    """3 documents of 1, 37 and 200 tokens, 4 heads: [T, H, D] q, k, v from a fixed CPU generator."""
    g = torch.Generator(device="cpu").manual_seed(0)
    cu = torch.tensor([0, 1, 38, 238], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(238, 4, head_dim, generator=g).to(device, dtype) for _ in range(3))
    return q, k, v, cu, 200, head_dim ** -0.5


def _checked(key, check, what) -> bool:
    """Run `check` (returns (ok, reason)) once per key; False, with a warning, when it fails or raises."""
    if key not in _kernel_checked:
        import warnings

        try:
            ok, reason = check()
        except Exception as e:  # any failure means: do not use it
            ok, reason = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if not ok:
            warnings.warn(f"the {what} fails its check on {key[0]} {key[1]} ({reason}); unpadded batches use the "
                          f"next path instead (see pipeline/models/varlen.py)", stacklevel=3)
        _kernel_checked[key] = ok
    return _kernel_checked[key]


def _tolerance(dtype: torch.dtype) -> float:
    return 2e-2 if dtype == torch.bfloat16 else 5e-3


def kernel_works(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Once per (device, dtype, head size): the varlen kernel against the per-document path on a small random
    problem. False, with a warning, when it raises (a PyTorch build or GPU without it) or differs."""
    def check():
        q, k, v, cu, max_len, scale = _check_problem(device, dtype, head_dim)
        got = _kernel(q, k, v, cu, max_len, scale).float()
        err = (got - _per_document(q.float(), k.float(), v.float(), cu, 0.0, scale)).abs().max().item()
        return err < _tolerance(dtype), f"max difference {err:.3g} from the per-document path"

    return _checked((str(device), dtype, head_dim), check, KERNEL)


def dropout_kernel_works(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Once per (device, dtype, head size): the dropout kernel (private ATen ops, so checked before use). At
    dropout 0 its output and gradients must match the per-document path in fp32; at dropout 0.5 two runs from
    the same RNG state must agree exactly and differ from dropout 0. The check restores the RNG state."""
    def check():
        q, k, v, cu, max_len, scale = _check_problem(device, dtype, head_dim)
        g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)

        def run(exact, dt, dropout):  # [out, dq, dk, dv] in fp32
            leaves = [x.detach().to(dt).requires_grad_(True) for x in (q, k, v)]
            out = (_per_document(*leaves, cu, dropout, scale) if exact
                   else _dropout_kernel(*leaves, cu, max_len, dropout, scale))
            out.backward(g.to(dt))
            return [out.detach().float()] + [x.grad.float() for x in leaves]

        want = run(True, torch.float32, 0.0)
        got = run(False, dtype, 0.0)
        errs = [((a - b).norm() / b.norm()).item() for a, b in zip(got, want)]
        if max(errs) >= _tolerance(dtype):
            return False, f"relative differences {', '.join(f'{e:.3g}' for e in errs)} (out, dq, dk, dv) at dropout 0"
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(1234)
            a = run(False, dtype, 0.5)
            torch.manual_seed(1234)
            b = run(False, dtype, 0.5)
        if not all(torch.equal(x, y) for x, y in zip(a, b)):
            return False, "dropout 0.5 from the same RNG state gave different results"
        if torch.equal(a[0], got[0]):
            return False, "dropout 0.5 changed nothing"
        return True, ""

    return _checked((str(device), dtype, head_dim, "dropout"), check, DROPOUT_KERNEL)


def _kernel_for(device: torch.device, dtype: torch.dtype, dropout: float, head_dim: int) -> str | None:
    """KERNEL or DROPOUT_KERNEL when one serves this device, dtype and dropout and passes its check, else None.
    The one rule, for `plan` at start-up and for each attention call."""
    if not wants_kernel(device, dtype):
        return None
    if dropout == 0:
        return KERNEL if kernel_works(device, dtype, head_dim) else None
    return DROPOUT_KERNEL if dropout_kernel_works(device, dtype, head_dim) else None


def plan(device: torch.device, dtype: torch.dtype, dropout: float, head_dim: int) -> str:
    """How a model's document batches should run: KERNEL or DROPOUT_KERNEL (CUDA, bf16/fp16, kernel checked),
    EXACT (the per-document path, on CPU), or PADDED: on a GPU without a working kernel, document-by-document
    SDPA is slower than the padded batch (one kernel launch per document and layer instead of one per layer),
    so the model is not unpadded there."""
    return _kernel_for(device, dtype, dropout, head_dim) or (PADDED if device.type == "cuda" else EXACT)


def enable(model, device: torch.device, dtype: torch.dtype, dropout: float) -> str:
    """Unpad `model` (a MaskedLM) if `plan` says so; returns the plan. `dtype`: the attention's compute dtype
    (the model's, or its autocast dtype); `dropout`: its attention dropout in training (0 for a teacher)."""
    cfg = model.hf.config
    how = plan(device, dtype, dropout, cfg.hidden_size // cfg.num_attention_heads)
    if how != PADDED:
        model.enable_unpadding()
    return how


def _per_document(query, key, value, cu, dropout, scaling):
    """[T, H, D] tensors, attention document by document with SDPA (exact; any device; dropout allowed)."""
    bounds = cu.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, H, n, D]
        outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)[0].transpose(0, 1))
    return torch.cat(outs, 0)


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: query/key/value [1, H, T, D] -> ([1, T, H, D], None).

    With `cu_seq_lens_q` in kwargs (a packed batch from `pack`) attention stays inside each document; without,
    it is transformers' SDPA path unchanged."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch has batch size 1, not {query.shape[0]}")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    how = _kernel_for(q.device, q.dtype, dropout, q.shape[-1])
    if how == KERNEL:
        out = _kernel(q, k, v, cu, int(kwargs["max_length_q"]), scaling)
    elif how == DROPOUT_KERNEL:
        out = _dropout_kernel(q, k, v, cu, int(kwargs["max_length_q"]), dropout, scaling)
    else:
        out = _per_document(q, k, v, cu, dropout, scaling)
    return out.unsqueeze(0), None
