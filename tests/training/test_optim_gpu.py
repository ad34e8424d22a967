"""On a CUDA GPU (pytest -m gpu): the GPU optimisers step, and DeepSpeed's FusedLamb builds (nvcc, just in time)
even when TORCH_CUDA_ARCH_LIST names an architecture-specific target such as 9.0a."""
from __future__ import annotations

import pytest
import torch

from pipeline.training.config import OptimizerConfig
from pipeline.training.optim import Lamb, build_optimizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))


def _steps(model, opt, n=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, 64, generator=g).to(next(model.parameters()).device)
    for i in range(n):
        opt.zero_grad()
        model(x[i]).pow(2).mean().backward()
        opt.step()
    return [p.detach().cpu() for p in model.parameters()]


def test_fused_adamw_on_gpu_matches_cpu_adamw():
    gpu, cpu = _model().cuda(), _model()
    opt = build_optimizer(gpu, OptimizerConfig(name="adamw", weight_decay=0.01), on_gpu=True, offload=False)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    ref = build_optimizer(cpu, OptimizerConfig(name="adamw", weight_decay=0.01), on_gpu=False, offload=False)
    for a, b in zip(_steps(gpu, opt), _steps(cpu, ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_lamb_builds_with_an_arch_specific_list_and_matches_our_lamb(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    gpu, cpu = _model().cuda(), _model()
    opt = build_optimizer(gpu, OptimizerConfig(name="lamb"), on_gpu=True, offload=False)
    assert type(opt).__name__ == "FusedLamb"
    import os
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0a"  # restored after the build
    ref = build_optimizer(cpu, OptimizerConfig(name="lamb"), on_gpu=False, offload=False)
    assert isinstance(ref, Lamb)
    for a, b in zip(_steps(gpu, opt), _steps(cpu, ref)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
