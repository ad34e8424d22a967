"""Optimisers and the learning-rate schedule, built from the recipe (DeepSpeed's own sections are not used).

On GPU: torch's fused CUDA AdamW (one kernel over all tensors, nothing to compile) and DeepSpeed's fused LAMB; with
ZeRO-Offload: DeepSpeedCPUAdam; on CPU: torch's AdamW and the LAMB below (DeepSpeed's fused kernels need CUDA).

DeepSpeed's ops (FusedLamb, DeepSpeedCPUAdam) compile with nvcc on first use; `_deepspeed_op_build` keeps an
architecture-specific TORCH_CUDA_ARCH_LIST entry ("9.0a", set by some Hopper images) from breaking that build.
"""
from __future__ import annotations

import contextlib
import math
import os
import re

import torch

from pipeline.training.config import OptimizerConfig, ScheduleConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Biases and LayerNorm weights get no decay (the BERT convention); tied weights appear once."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019): Adam's update rescaled per parameter tensor by ||w|| / ||update||, the trust ratio,
    clamped to [0, max_trust] like DeepSpeed's FusedLamb so CPU and GPU runs follow the same rule."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, max_trust=10.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      max_trust=max_trust))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                step = state["step"].item()
                g = p.grad.float()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                update = (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    update.add_(p.float(), alpha=group["weight_decay"])
                w_norm, u_norm = p.float().norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), (w_norm / u_norm).clamp(max=group["max_trust"]),
                                    torch.ones_like(w_norm))
                p.add_((update * trust).to(p.dtype), alpha=-group["lr"])
        return loss


def buildable_arch_list(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST with architecture-specific entries ("9.0a", "10.0f") turned into their base
    architecture ("9.0"): DeepSpeed's JIT builder parses each entry as numbers and raises on the letter. Other
    entries ("8.0", "9.0+PTX") are kept; so is the separator style."""
    return re.sub(r"(\d+\.\d+)[a-z](?=\+PTX|[;\s]|$)", r"\1", arch_list)


@contextlib.contextmanager
def _deepspeed_op_build():
    """Around the construction of a DeepSpeed op that may JIT-compile: a TORCH_CUDA_ARCH_LIST it can parse."""
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if old is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = buildable_arch_list(old)
    try:
        yield
    finally:
        if old is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, *, on_gpu: bool, offload: bool):
    groups = param_groups(model, cfg.weight_decay)
    betas = tuple(cfg.betas)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        with _deepspeed_op_build():
            return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, adamw_mode=True)
    if cfg.name == "adamw":
        # on GPU the fused kernel: DeepSpeed's FusedAdam does the same update but needs an nvcc build per node
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps,
                                 **({"fused": True} if on_gpu else {"foreach": True}))
    if on_gpu:
        from deepspeed.ops.lamb import FusedLamb
        with _deepspeed_op_build():
            return FusedLamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    return Lamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_fraction * total_steps))


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Fraction of the peak lr at optimiser step `step` (0-based): linear warmup, then the chosen decay."""
    warm = warmup_steps(cfg, total_steps)
    if step < warm:
        return (step + 1) / warm
    if cfg.decay == "constant":
        return 1.0
    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    shape = 1.0 - progress if cfg.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer, cfg: ScheduleConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total_steps, cfg))
