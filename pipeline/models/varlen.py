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

PyTorch's varlen kernel has no dropout. A training forward with attention dropout > 0 therefore uses the exact
per-document path, which is correct on any device but not faster on a GPU: `wants_kernel_without_dropout` says
when that happens, and the trainer unpads only models whose attention dropout is 0 in training (the teacher
always, being in eval mode).
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


def wants_kernel_without_dropout(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the FlashAttention varlen kernel serves this device and dtype (CUDA, bf16 or fp16)."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def _kernel(query, key, value, cu, max_len, scaling):
    """[T, H, D] tensors through PyTorch's varlen FlashAttention (CUDA only)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(query, key, value, cu, cu, max_len, max_len, scale=scaling)


_kernel_checked: dict = {}


def kernel_works(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Once per (device, dtype, head size): the varlen kernel against the per-document path on a small random
    problem (3 documents of 1, 37 and 200 tokens). False, with a warning, when it raises (a PyTorch build or
    GPU without it) or differs: the exact path is used then, slower but right."""
    key = (str(device), dtype, head_dim)
    if key not in _kernel_checked:
        import warnings

        g = torch.Generator(device="cpu").manual_seed(0)
        lengths = [1, 37, 200]
        cu = torch.tensor([0, 1, 38, 238], dtype=torch.int32, device=device)
        q, k, v = (torch.randn(sum(lengths), 4, head_dim, generator=g).to(device, dtype) for _ in range(3))
        scale = head_dim ** -0.5
        try:
            got = _kernel(q, k, v, cu, max(lengths), scale).float()
            want = _per_document(q.float(), k.float(), v.float(), cu, 0.0, scale)
            err = (got - want).abs().max().item()
            ok = err < (2e-2 if dtype == torch.bfloat16 else 5e-3)
            reason = f"max difference {err:.3g} from the per-document path"
        except Exception as e:  # any failure means: do not use it
            ok, reason = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if not ok:
            warnings.warn(f"the FlashAttention varlen kernel fails its check on {device} {dtype} ({reason}); "
                          f"unpadded batches use per-document SDPA instead", stacklevel=2)
        _kernel_checked[key] = ok
    return _kernel_checked[key]


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
    if dropout == 0.0 and wants_kernel_without_dropout(q.device, q.dtype) and kernel_works(q.device, q.dtype,
                                                                                             q.shape[-1]):
        out = _kernel(q, k, v, cu, int(kwargs["max_length_q"]), scaling)
    else:
        out = _per_document(q, k, v, cu, dropout, scaling)
    return out.unsqueeze(0), None


def describe(device: torch.device, student_precision: str, teacher_dtype: torch.dtype | None,
             student_attention_dropout: float) -> str:
    """One line for the run log: which attention path each model's unpadded batches take."""
    kernel = "FlashAttention varlen kernel"
    exact = "SDPA per document"
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(student_precision, torch.float32)
    if wants_kernel_without_dropout(device, half):
        student = kernel if student_attention_dropout == 0 else (
            f"{exact}: the varlen kernel has no dropout and student.attention_dropout is {student_attention_dropout}")
    else:
        student = exact
    parts = [f"student: {student}"]
    if teacher_dtype is not None:
        parts.append(f"teacher: {kernel if wants_kernel_without_dropout(device, teacher_dtype) else exact}")
    return "; ".join(parts)
