"""forward_losses: the chunked (fused) path gives the plain path's losses, counters and gradients (fp64), for every
choice the trainer can make; the config keeps loss.mse and the chunked loss apart."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.models import MaskedLM, build_student
from pipeline.training.config import LossConfig
from pipeline.training.step import forward_losses, uses_chunked_loss
from tests.models import batch, tiny_hf


@pytest.fixture(scope="module")
def models():
    teacher = MaskedLM(tiny_hf("bert", n_layers=4)).double().requires_grad_(False)
    student = build_student(teacher=teacher, arch="distilbert", n_layers=2, dropout=0.0, attention_dropout=0.0)
    with torch.no_grad():  # off the teacher's copy, so the KD and cosine terms and their gradients are not ~0
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    return teacher, student.double()


def micro_batch(padded: bool):
    ids, mask = batch(batch_size=4, length=12, padded=padded, seed=7)
    labels = torch.full_like(ids, -100)
    pick = (torch.arange(ids.numel()).reshape(ids.shape) % 4 == 1) & mask.bool()
    labels[pick] = ids[pick]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(student, teacher, b, cfg):
    model = copy.deepcopy(student)
    terms, stats = forward_losses(model, teacher, b, cfg, eval_stats=True)
    terms.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return terms, stats, grads


@pytest.mark.parametrize("kd_tokens", ["all", "masked"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("weights", [dict(kd=5.0, mlm=2.0, cos=1.0), dict(kd=1.0, mlm=0.0, cos=0.0)])
def test_chunked_path_equals_the_plain_path(models, kd_tokens, padded, weights):
    teacher, student = models
    b = micro_batch(padded)
    plain = LossConfig(**weights, kd_tokens=kd_tokens, chunk_size=0)
    chunked = LossConfig(**weights, kd_tokens=kd_tokens, chunk_size=5)  # several chunks, the last one short
    assert not uses_chunked_loss(plain, True) and uses_chunked_loss(chunked, True)
    p_terms, p_stats, p_grads = run(student, teacher, b, plain)
    c_terms, c_stats, c_grads = run(student, teacher, b, chunked)
    for name in ("total", "kd", "mlm", "cos"):
        a, c = getattr(p_terms, name), getattr(c_terms, name)
        assert (a is None) == (c is None), name
        if a is not None:
            # the plain path computes its losses in fp32 even for an fp64 model; the chunked one in fp64 here
            torch.testing.assert_close(c.double(), a.double(), rtol=1e-5, atol=1e-7, msg=name)
    assert p_terms.kd > 0.01  # the comparison is not between two zeros
    for k in ("tokens", "masked", "student_correct", "teacher_correct", "agree", "student_mlm", "teacher_mlm"):
        torch.testing.assert_close(c_stats[k].double(), p_stats[k].double(), rtol=1e-6, atol=1e-6, msg=k)
    assert set(c_grads) == set(p_grads) and len(p_grads) > 10
    global_norm = torch.stack([g.norm() for g in p_grads.values()]).norm()
    for n in p_grads:
        # fp32 (plain) against fp64 (chunked) arithmetic: whole tensors, relative to their norm (plus a floor from the
        # global norm for gradients that are 0 in exact arithmetic, e.g. attention key biases)
        err = (c_grads[n] - p_grads[n]).norm()
        assert err <= 1e-5 * p_grads[n].norm() + 1e-7 * global_norm, (n, float(err), float(p_grads[n].norm()))
    assert p_grads["hf.vocab_projector.bias"].abs().sum() > 0


def test_teacher_free_and_mse_runs_use_the_plain_loss():
    assert not uses_chunked_loss(LossConfig(kd=0.0, mlm=1.0, cos=0.0), with_teacher=False)
    assert not uses_chunked_loss(LossConfig(kd=1.0, mse=1.0, chunk_size=0), with_teacher=True)
    assert uses_chunked_loss(LossConfig(), with_teacher=True)  # the default: chunked


def test_config_refuses_mse_with_a_chunk_size():
    from pipeline.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="loss.chunk_size=0"):
        load_config("tiny_cpu", ["teacher.name_or_path=t", "data.path=d", "run_dir=r", "loss.mse=1.0"])
    with pytest.raises(ConfigError, match="loss.chunk_size"):
        load_config("tiny_cpu", ["teacher.name_or_path=t", "data.path=d", "run_dir=r", "loss.chunk_size=-1"])
    cfg = load_config("tiny_cpu", ["teacher.name_or_path=t", "data.path=d", "run_dir=r", "loss.mse=1.0",
                                   "loss.chunk_size=0"])
    assert cfg.loss.chunk_size == 0


def test_a_padded_batch_gives_the_losses_of_its_documents_run_without_padding(models):
    """Padding with an attention mask (one document per sample) computes what each document computes alone with no
    mask (the pad-free path): every loss term is a mean over the same rows."""
    teacher, student = models
    b = micro_batch(padded=True)
    cfg = LossConfig(kd=5.0, mlm=2.0, cos=1.0, kd_tokens="all", chunk_size=5)
    terms, _ = forward_losses(student, teacher, b, cfg)
    kd_sum = cos_sum = mlm_sum = 0.0
    rows = b["attention_mask"].sum().item()
    masked = (b["labels"] != -100).sum().item()
    for i in range(b["input_ids"].shape[0]):
        n = int(b["attention_mask"][i].sum())
        one = {k: b[k][i:i + 1, :n] for k in ("input_ids", "attention_mask", "labels")}
        t, _ = forward_losses(student, teacher, one, cfg)
        kd_sum += t.kd.item() * n
        cos_sum += t.cos.item() * n
        mlm_sum += t.mlm.item() * (one["labels"] != -100).sum().item()
    assert b["attention_mask"].eq(0).sum() > 0
    assert terms.kd.item() == pytest.approx(kd_sum / rows, rel=1e-9)  # chunked: fp64 here
    assert terms.cos.item() == pytest.approx(cos_sum / rows, rel=1e-6)  # computed in fp32
    assert terms.mlm.item() == pytest.approx(mlm_sum / masked, rel=1e-9)


def test_activation_checkpointing_gives_the_same_losses_and_gradients(models):
    teacher, student = models
    b = micro_batch(padded=True)
    cfg = LossConfig(kd=5.0, mlm=2.0, cos=1.0, chunk_size=5)
    ckpt = copy.deepcopy(student)
    ckpt.enable_activation_checkpointing()
    assert getattr(ckpt.hf, "is_activation_checkpointing", None) or ckpt.hf.is_gradient_checkpointing
    p_terms, _, p_grads = run(student, teacher, b, cfg)
    c_terms, _, c_grads = run(ckpt, teacher, b, cfg)
    assert c_terms.total.item() == p_terms.total.item()
    for n in p_grads:
        torch.testing.assert_close(c_grads[n], p_grads[n], rtol=1e-12, atol=1e-14, msg=n)
