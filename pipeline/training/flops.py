"""FLOP model of one distillation step, for model FLOPs utilisation (MFU).

Counting conventions (the usual ones: Kaplan et al., PaLM's MFU appendix, nanoGPT):

- A matrix product [m, k] x [k, n] costs 2*m*n*k FLOPs; element-wise work (softmax, GELU, LayerNorm, the
  losses) and embedding lookups are free.
- Forward, per token, per encoder layer of width H, FFN width F, at sequence length S:
    attention projections q, k, v, out   4 * 2*H^2
    FFN in + out                         2 * 2*H*F
    attention scores QK^T + weights x V  2 * 2*S*H    (full S x S attention, no causal halving: BERT is
                                                        bidirectional; padding is counted as if it were tokens)
- Output layer, per row that gets logits: the MLM transform (dense H x H) 2*H^2 plus the decoder 2*H*V.
  Rows that get logits: the step computes logits for the same rows in teacher and student
  (`pipeline/training/step.py` `rows_for`): every token when KD covers all tokens, the masked tokens
  otherwise, so the fraction is max(kd_rows_fraction, mlm_rows_fraction) (the masked rows are a subset of
  the KD rows either way); without a teacher only the masked rows get logits.
- The student pays forward + backward, backward = 2 x forward (gradients w.r.t. activations and w.r.t.
  weights: one product each); the frozen teacher pays forward only.
- Recomputation (activation checkpointing) is not counted: MFU counts the model's FLOPs, not the hardware's.

`step_flops` returns the breakdown below; teacher_forward, student_forward and student_backward each include
that pass's attention and output-layer FLOPs, and total is their sum. `attention` and `output_layers` are
the parts of the total spent in attention scores/values and in the MLM transform + decoder (teacher forward
plus student forward and backward), reported separately only to show where the FLOPs go; they are not added
again.

For BERT-base (12 x 768, FFN 3072, V 30522) into a 6-layer student at seq 512: ~664 MFLOP per token with KD
over all tokens, ~501 with KD on the masked 15% (the cost model of the reference notes).
"""
from __future__ import annotations

from dataclasses import dataclass

# Dense (no 2:4 sparsity) peak throughput per accelerator, FLOP/s. Datasheet numbers: real ceilings are lower
# (H100_MEASURED_BF16), so an MFU near 1 is not reachable and 0.8 of it is already the hardware's limit.
PEAK_FLOPS = {
    "H100-bf16": 989e12,   # H100 SXM5, dense bf16/fp16 tensor cores
    "H100-tf32": 494.5e12,
    "H200-bf16": 989e12,   # same compute die as H100 SXM5; more and faster memory
    "A100-bf16": 312e12,
    "A100-tf32": 156e12,
    "V100-fp16": 125e12,
}
H100_MEASURED_BF16 = 790e12  # the practical ceiling: a large bf16 matrix product measured on an H100


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of an encoder with an MLM head (heads do not change the count)."""

    n_layers: int
    hidden: int
    ffn: int
    vocab: int


def layer_forward_flops_per_token(shape: ModelShape, seq_len: int) -> dict:
    """Forward FLOPs of one encoder layer per token: {"dense": projections + FFN, "attention": scores + values}."""
    h, f = shape.hidden, shape.ffn
    return {"dense": 4 * 2 * h * h + 2 * 2 * h * f, "attention": 2 * 2 * seq_len * h}


def output_forward_flops_per_row(shape: ModelShape) -> int:
    """Forward FLOPs of the MLM transform and the decoder for one row that gets logits."""
    return 2 * shape.hidden * shape.hidden + 2 * shape.hidden * shape.vocab


def step_flops(teacher: ModelShape | None, student: ModelShape, seq_len: int, tokens: int,
               kd_rows_fraction: float = 1.0, mlm_rows_fraction: float = 0.15) -> dict:
    """FLOPs of one optimiser step over `tokens` tokens (global batch x seq_len, pad included) of sequences of
    `seq_len`: a dict with teacher_forward, student_forward, student_backward, total (their sum), and the
    informational parts attention and output_layers (already inside the three passes), plus per_token.

    kd_rows_fraction: share of tokens the KD term covers (1.0 for `loss.kd_tokens=all`, the masking rate
    (~0.15) for `masked`); mlm_rows_fraction: share of tokens that are masked. `teacher=None` counts a
    teacher-free (MLM only) step: only the masked rows get logits.
    """
    if seq_len <= 0 or tokens < 0:
        raise ValueError(f"need seq_len > 0 and tokens >= 0, got seq_len={seq_len}, tokens={tokens}")
    for name, frac in (("kd_rows_fraction", kd_rows_fraction), ("mlm_rows_fraction", mlm_rows_fraction)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {frac}")
    rows = max(kd_rows_fraction, mlm_rows_fraction) if teacher is not None else mlm_rows_fraction

    def forward(shape: ModelShape) -> tuple[float, float, float]:
        """(total, attention, output layer) forward FLOPs per token."""
        layer = layer_forward_flops_per_token(shape, seq_len)
        attention = shape.n_layers * layer["attention"]
        output = rows * output_forward_flops_per_row(shape)
        return shape.n_layers * layer["dense"] + attention + output, attention, output

    s_total, s_attn, s_out = forward(student)
    t_total, t_attn, t_out = forward(teacher) if teacher is not None else (0.0, 0.0, 0.0)
    out = {
        "teacher_forward": t_total * tokens,
        "student_forward": s_total * tokens,
        "student_backward": 2 * s_total * tokens,
        "attention": (t_attn + 3 * s_attn) * tokens,
        "output_layers": (t_out + 3 * s_out) * tokens,
    }
    out["total"] = out["teacher_forward"] + out["student_forward"] + out["student_backward"]
    out["per_token"] = t_total + 3 * s_total
    return out


def mfu(flops_per_step: float, step_time_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak, for the whole job (pass the job's FLOPs per step
    and the peak of one device times the number of devices)."""
    if step_time_s <= 0 or peak_flops <= 0:
        raise ValueError(f"need step_time_s > 0 and peak_flops > 0, got {step_time_s}, {peak_flops}")
    return flops_per_step / step_time_s / peak_flops


def model_shape(hf_config) -> ModelShape:
    """The FLOP-relevant sizes of a Hugging Face BERT / DistilBERT / RoBERTa config."""
    c = hf_config
    return ModelShape(n_layers=getattr(c, "num_hidden_layers", None) or c.n_layers,
                      hidden=getattr(c, "hidden_size", None) or c.dim,
                      ffn=getattr(c, "intermediate_size", None) or c.hidden_dim, vocab=c.vocab_size)


def peak_flops_for(device_name: str, precision: str) -> float | None:
    """Datasheet peak of one device from its name (torch.cuda.get_device_name) and the run's precision (bf16,
    fp16 or fp32, which runs on TF32 tensor cores), or None when unknown (then no MFU is logged)."""
    name = device_name.upper()
    kind = "bf16" if precision in ("bf16", "fp16") else "tf32"
    for chip in ("H200", "H100", "A100"):
        if chip in name:
            return PEAK_FLOPS.get(f"{chip}-{kind}") or (PEAK_FLOPS[f"H100-{kind}"] if chip == "H200" else None)
    if "V100" in name and precision == "fp16":
        return PEAK_FLOPS["V100-fp16"]
    return None
