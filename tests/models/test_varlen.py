"""Unpadded (varlen) forward of document-mode batches: the same hidden states and gradients as the padded
forward for BERT, DistilBERT and RoBERTa (fp64), the same distillation losses, unchanged unpadded batches, the
exported config untouched, and the CUDA kernel's plumbing (shapes, cu_seqlens, its self-check) exercised on CPU
with a stand-in for the kernel."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

from pipeline.models import MaskedLM, varlen
from tests.models import VOCAB, batch, tiny_hf


def doc_batch(seed: int = 3):
    """Right-padded documents of lengths 12, 1, 7, 12, 3 (one row of a single token, two full rows)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [12, 1, 7, 12, 3]
    ids = torch.randint(1, VOCAB, (len(lengths), 12), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids[mask == 0] = 0
    return ids, mask


def test_pack_and_unpack():
    ids, mask = doc_batch()
    p = varlen.pack(ids, mask)
    assert p["input_ids"].shape == (1, 35) and p["cu_seqlens"].tolist() == [0, 12, 13, 20, 32, 35]
    assert p["cu_seqlens"].dtype == torch.int32 and p["max_len"] == 12
    assert p["input_ids"][0].tolist() == ids[mask.bool()].tolist()
    assert p["position_ids"][0, 12:20].tolist() == [0, 0, 1, 2, 3, 4, 5, 6]
    h = torch.arange(35.0).view(1, 35, 1)
    back = varlen.unpack(h, p["index"], tuple(ids.shape))
    assert back.shape == (5, 12, 1) and back[mask == 0].abs().sum() == 0
    assert back[mask.bool()].flatten().tolist() == list(range(35))


@pytest.mark.parametrize("arch, layout", [("bert", "right"), ("distilbert", "right"), ("roberta", "right"),
                                          ("bert", "left"), ("distilbert", "left")])
def test_unpadded_forward_equals_the_padded_one(arch, layout, monkeypatch):
    packed = []
    real_pack = varlen.pack
    monkeypatch.setattr(varlen, "pack", lambda *a: packed.append(1) or real_pack(*a))
    ids, mask = doc_batch()
    if layout == "left":
        ids, mask = ids.flip(1), mask.flip(1)
    padded = MaskedLM(tiny_hf(arch, n_layers=2)).double()
    unpadded = copy.deepcopy(padded)
    unpadded.enable_unpadding()
    real = mask.bool()
    out = {}
    for name, m in (("padded", padded), ("unpadded", unpadded)):
        hidden = m.encode(ids, mask)
        loss = (hidden[real] * torch.linspace(-1, 1, hidden.shape[-1], dtype=hidden.dtype)).pow(2).sum()
        loss.backward()
        out[name] = hidden, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    (hp, gp), (hu, gu) = out["padded"], out["unpadded"]
    assert packed == [1]  # the unpadded model did pack its batch
    torch.testing.assert_close(hu[real], hp[real], rtol=1e-9, atol=1e-10)
    assert hu[~real].abs().sum() == 0  # padding rows are zeros (the losses never read them)
    assert gp.keys() == gu.keys() and len(gp) > 10
    for n in gp:
        torch.testing.assert_close(gu[n], gp[n], rtol=1e-8, atol=1e-11, msg=n)


def test_batches_without_padding_take_the_usual_path(monkeypatch):
    ids, mask = batch(padded=False)
    m = MaskedLM(tiny_hf("distilbert", n_layers=2)).double()
    want = m.encode(ids, mask)
    m.enable_unpadding()
    monkeypatch.setattr(varlen, "pack", lambda *a: pytest.fail("an unpadded batch was packed"))
    torch.testing.assert_close(m.encode(ids, mask), want, rtol=0, atol=0)
    torch.testing.assert_close(m.encode(ids, None), want, rtol=0, atol=0)


def test_the_exported_config_does_not_name_the_attention_function(tmp_path):
    m = MaskedLM(tiny_hf("distilbert", n_layers=2))
    m.enable_unpadding()
    m.hf.save_pretrained(tmp_path)
    assert varlen.ATTN_IMPLEMENTATION not in (tmp_path / "config.json").read_text()
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_pretrained(tmp_path)  # loads without our registration being needed


def test_distillation_losses_are_unchanged():
    from pipeline.models import build_student
    from pipeline.training.config import LossConfig
    from pipeline.training.step import forward_losses

    teacher = MaskedLM(tiny_hf("bert", n_layers=4)).double().requires_grad_(False)
    student = build_student(teacher=teacher, arch="distilbert", n_layers=2, dropout=0.0,
                            attention_dropout=0.0).double()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    ids, mask = doc_batch()
    labels = torch.full_like(ids, -100)
    pick = (torch.arange(ids.numel()).reshape(ids.shape) % 3 == 1) & mask.bool()
    labels[pick] = ids[pick]
    b = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for chunk in (0, 5):  # the plain loss and the chunked one
        results = {}
        for unpad in (False, True):
            t, s = copy.deepcopy(teacher), copy.deepcopy(student)
            if unpad:
                t.enable_unpadding()
                s.enable_unpadding()
            terms, _ = forward_losses(s, t, b, LossConfig(kd=5.0, mlm=2.0, cos=1.0, chunk_size=chunk))
            results[unpad] = (terms.total.item(), terms.kd.item(), terms.mlm.item(), terms.cos.item())
        assert results[True] == pytest.approx(results[False], rel=1e-6)
        assert results[False][1] > 0.01  # not a comparison of zeros


def test_dropout_runs_the_exact_path_and_varies():
    """With attention dropout (a training student), attention runs per document with SDPA's dropout."""
    m = MaskedLM(tiny_hf("distilbert", n_layers=2, attention_dropout=0.5)).train()
    m.enable_unpadding()
    ids, mask = doc_batch()
    a, b = m.encode(ids, mask), m.encode(ids, mask)
    assert not torch.equal(a[mask.bool()], b[mask.bool()])
    m.eval()
    torch.testing.assert_close(m.encode(ids, mask), m.encode(ids, mask), rtol=0, atol=0)


def fake_cuda(monkeypatch, calls):
    """Make the CPU look like a device with the kernel, and stand in for the kernel with the exact path."""
    monkeypatch.setattr(varlen, "wants_kernel", lambda device, dtype: True)

    def kernel(q, k, v, cu, max_len, scaling):
        calls.append((tuple(q.shape), cu.clone(), max_len, scaling))
        assert q.dim() == 3 and k.shape == v.shape == q.shape and cu.dtype == torch.int32 and isinstance(max_len, int)
        return varlen._per_document(q, k, v, cu, 0.0, scaling)

    monkeypatch.setattr(varlen, "_kernel", kernel)
    monkeypatch.setattr(varlen, "_kernel_checked", {})


def test_kernel_plumbing(monkeypatch):
    calls = []
    fake_cuda(monkeypatch, calls)
    ids, mask = doc_batch()
    m = MaskedLM(tiny_hf("bert", n_layers=2)).double()
    want = m.encode(ids, mask)
    m.enable_unpadding()
    got = m.encode(ids, mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-9, atol=1e-10)
    layer_calls = [c for c in calls if c[0][0] == 35]
    assert len(layer_calls) == 2  # one per layer, after the self-check's call
    shape, cu, max_len, scaling = layer_calls[0]
    assert shape == (35, 4, 8) and cu.tolist() == [0, 12, 13, 20, 32, 35] and max_len == 12
    assert scaling == pytest.approx(8 ** -0.5)
    assert len(calls) == 3  # the self-check ran once, then the kernel served both layers


def test_a_kernel_that_fails_its_check_is_not_used(monkeypatch):
    calls = []
    fake_cuda(monkeypatch, calls)
    monkeypatch.setattr(varlen, "_kernel", lambda *a: (_ for _ in ()).throw(RuntimeError("no kernel on this GPU")))
    ids, mask = doc_batch()
    m = MaskedLM(tiny_hf("bert", n_layers=2)).double()
    want = m.encode(ids, mask)
    m.enable_unpadding()
    with pytest.warns(UserWarning, match="fails its check.*no kernel on this GPU"):
        got = m.encode(ids, mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-9, atol=1e-10)


def test_the_kernel_api_is_the_one_we_call():
    """torch.nn.attention.varlen.varlen_attn is what the CUDA path calls: the arguments it passes must exist."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    assert list(params)[:7] == ["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k"]
    assert "scale" in params


def fake_flash(monkeypatch, calls, effect=0.5):
    """Stand in for FlashAttention's varlen forward/backward ATen ops on CPU: the exact per-document attention,
    scaled by (1 + effect x dropout) so that dropout visibly (and deterministically) changes the output; the
    backward differentiates that function, reading only what the forward saved."""
    def forward(q, k, v, cu, max_len, dropout, scaling):
        calls.append(("fwd", tuple(q.shape), cu.dtype, max_len, dropout, scaling))
        assert isinstance(max_len, int) and cu.dtype == torch.int32
        with torch.no_grad():
            out = varlen._per_document(q, k, v, cu, 0.0, scaling) * (1 + effect * dropout)
        return out, torch.zeros(q.shape[1], q.shape[0]), torch.zeros(2), torch.zeros(())

    def backward(grad, q, k, v, out, lse, cu, max_len, dropout, rng_state, unused, scaling):
        calls.append(("bwd", tuple(grad.shape), dropout))
        assert grad.is_contiguous() and out.shape == q.shape
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
            o = varlen._per_document(*leaves, cu, 0.0, scaling) * (1 + effect * dropout)
            return torch.autograd.grad(o, leaves, grad)

    monkeypatch.setattr(varlen, "_flash_forward", forward)
    monkeypatch.setattr(varlen, "_flash_backward", backward)
    monkeypatch.setattr(varlen, "wants_kernel", lambda device, dtype: True)
    monkeypatch.setattr(varlen, "_kernel_checked", {})


def test_dropout_kernel_plumbing(monkeypatch):
    """A training student with attention dropout takes the dropout kernel: one self-check, then one forward and
    one backward per layer with the packed [T, H, D] tensors, int32 cu_seqlens and the model's dropout."""
    calls = []
    fake_flash(monkeypatch, calls)
    ids, mask = doc_batch()
    m = MaskedLM(tiny_hf("distilbert", n_layers=2, attention_dropout=0.25)).double().train()
    assert varlen.enable(m, torch.device("cpu"), torch.float64, 0.25) == varlen.DROPOUT_KERNEL and m.unpad
    checks = len(calls)
    assert checks > 0 and all(c[1][0] == 238 for c in calls)  # the self-check's problem: 238 tokens
    hidden = m.encode(ids, mask)
    hidden[mask.bool()].pow(2).sum().backward()
    layer = [c for c in calls[checks:]]
    assert [c[0] for c in layer] == ["fwd", "fwd", "bwd", "bwd"]
    assert layer[0][1:] == ((35, 4, 8), torch.int32, 12, 0.25, pytest.approx(8 ** -0.5))
    assert layer[2] == ("bwd", (35, 4, 8), 0.25)
    assert all(p.grad is not None for n, p in m.named_parameters() if ".transformer." in n)


def test_dropout_kernel_gradients_are_the_functions(monkeypatch):
    """The autograd Function routes the stand-in's gradients to q, k and v exactly."""
    fake_flash(monkeypatch, [])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(35, 4, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 12, 13, 20, 32, 35], dtype=torch.int32)
    w = torch.randn(35, 4, 8, generator=g, dtype=torch.float64)
    (varlen._dropout_kernel(q, k, v, cu, 12, 0.3, 0.35) * w).sum().backward()
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    (varlen._per_document(q, k, v, cu, 0.0, 0.35) * 1.15 * w).sum().backward()
    for a, x in zip(got, (q, k, v)):
        torch.testing.assert_close(a, x.grad, rtol=1e-12, atol=1e-12)


def test_a_dropout_kernel_without_effect_fails_its_check(monkeypatch):
    fake_flash(monkeypatch, [], effect=0.0)
    with pytest.warns(UserWarning, match="with dropout fails its check.*changed nothing"):
        assert not varlen.dropout_kernel_works(torch.device("cpu"), torch.float64, 8)


def test_plan(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    # CPU: the exact per-document path, whatever the dropout
    assert varlen.plan(cpu, torch.float32, 0.1, 64) == varlen.plan(cpu, torch.float32, 0.0, 64) == varlen.EXACT
    # a GPU in fp32 (no kernel): padded, never document by document
    assert varlen.plan(gpu, torch.float32, 0.0, 64) == varlen.PADDED
    monkeypatch.setattr(varlen, "kernel_works", lambda *a: True)
    monkeypatch.setattr(varlen, "dropout_kernel_works", lambda *a: True)
    assert varlen.plan(gpu, torch.bfloat16, 0.0, 64) == varlen.KERNEL
    assert varlen.plan(gpu, torch.float16, 0.1, 64) == varlen.DROPOUT_KERNEL
    monkeypatch.setattr(varlen, "dropout_kernel_works", lambda *a: False)
    assert varlen.plan(gpu, torch.bfloat16, 0.1, 64) == varlen.PADDED
    assert varlen.plan(gpu, torch.bfloat16, 0.0, 64) == varlen.KERNEL
    m = MaskedLM(tiny_hf("bert", n_layers=1))
    assert varlen.enable(m, gpu, torch.bfloat16, 0.1) == varlen.PADDED and not m.unpad
