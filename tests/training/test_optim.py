"""Learning-rate schedule, parameter groups and the CPU LAMB against hand computations."""
import math
import os

import pytest
import torch

from pipeline.training.config import OptimizerConfig, ScheduleConfig
from pipeline.training.optim import Lamb, build_optimizer, lr_multiplier, param_groups


def test_warmup_then_linear_or_cosine():
    cfg = ScheduleConfig(warmup_fraction=0.1, decay="linear")
    m = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)  # 10 warmup steps, linear up to the peak
    assert m[10] == pytest.approx(1.0) and m[55] == pytest.approx(0.5) and m[99] == pytest.approx(1 / 90, abs=1e-9)
    cos = ScheduleConfig(warmup_steps=0, decay="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, 100, cos) == pytest.approx(1.0)
    assert lr_multiplier(50, 100, cos) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(100, 100, cos) == pytest.approx(0.1)
    assert lr_multiplier(70, 100, ScheduleConfig(warmup_steps=5, decay="constant")) == 1.0


def test_no_decay_for_biases_and_layernorm_and_tied_weights_once():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    emb = torch.nn.Embedding(10, 4)
    model.add_module("emb", emb)
    model.add_module("dec", torch.nn.Linear(4, 10))
    model.dec.weight = emb.weight  # tied
    groups = param_groups(model, 0.01)
    decay, no_decay = groups
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(emb.weight)}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 4  # linear bias, LN weight+bias, decoder bias
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.01), on_gpu=False, offload=False)
    assert isinstance(opt, torch.optim.AdamW)


def test_lamb_step_matches_the_formula():
    torch.manual_seed(0)
    w0 = torch.randn(5, 3, dtype=torch.float64)
    g = torch.randn(5, 3, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = Lamb([p], lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    p.grad = g.clone()
    opt.step()
    m = 0.1 * g / (1 - 0.9)
    v = 0.01 * g * g / (1 - 0.99)
    update = m / (v.sqrt() + 1e-6) + 0.01 * w0
    trust = min(w0.norm().item() / update.norm().item(), 10.0)
    torch.testing.assert_close(p.detach(), w0 - 0.1 * trust * update, rtol=1e-6, atol=1e-9)


def test_lamb_trust_ratio_is_one_for_zero_weights():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Lamb([p], lr=0.5)
    p.grad = torch.tensor([1.0, -1.0, 2.0])
    opt.step()
    assert torch.allclose(p.detach(), -0.5 * torch.sign(torch.tensor([1.0, -1.0, 2.0])), atol=1e-5)
    assert not math.isnan(p.sum().item())


def test_arch_list_entries_deepspeed_cannot_parse_become_their_base_architecture():
    from pipeline.training.optim import buildable_arch_list

    assert buildable_arch_list("9.0a") == "9.0"
    assert buildable_arch_list("8.0;9.0a;10.0f+PTX") == "8.0;9.0;10.0+PTX"
    assert buildable_arch_list("7.5 8.6 9.0+PTX") == "7.5 8.6 9.0+PTX"
    assert buildable_arch_list("9.0a 12.0a") == "9.0 12.0"


def test_the_op_build_environment_is_restored(monkeypatch):
    from pipeline.training.optim import _deepspeed_op_build

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    with _deepspeed_op_build():
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0a"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    with _deepspeed_op_build():
        assert "TORCH_CUDA_ARCH_LIST" not in os.environ
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ
