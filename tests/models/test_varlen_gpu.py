"""On a CUDA GPU (pytest -m gpu): the FlashAttention varlen kernel path of unpadded batches against the padded
forward, in bf16, at BERT's head size and real document lengths up to 512.

The reference is the padded forward in fp32. The unpadded bf16 forward (kernel) must be as close to it as the
padded bf16 forward (SDPA with a mask) is: both carry bf16 rounding, so the test bounds the kernel path's error
by the padded path's own, which holds whatever the GPU's exact rounding."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.models import MaskedLM, varlen

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

VOCAB = 1000


def _model(arch: str) -> MaskedLM:
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(0)
    if arch == "distilbert":
        hf = DistilBertForMaskedLM(DistilBertConfig(vocab_size=VOCAB, dim=256, n_layers=2, n_heads=4, hidden_dim=512,
                                                    max_position_embeddings=512, dropout=0.0, attention_dropout=0.0))
    else:
        hf = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=512, max_position_embeddings=512,
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    return MaskedLM(hf)


def _documents(seed: int):
    """A right-padded batch of 8 documents, 1 to 512 tokens (one of each extreme), on the GPU."""
    g = torch.Generator().manual_seed(seed)
    lengths = [512, 1] + torch.randint(2, 512, (6,), generator=g).tolist()
    L = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), L), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids[mask == 0] = 0
    return ids.cuda(), mask.cuda()


def _run(model: MaskedLM, ids, mask, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        hidden = model.encode(ids, mask)
    real = mask.bool()
    h = hidden[real].float()
    w = torch.linspace(-1, 1, h.shape[-1], device=h.device)
    (h * w).pow(2).mean().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return h.detach(), grads


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_path_is_as_accurate_as_the_padded_bf16_forward(arch, seed, monkeypatch):
    calls = []
    real_kernel = varlen._kernel
    monkeypatch.setattr(varlen, "_kernel", lambda *a: calls.append(a[0].shape) or real_kernel(*a))
    ids, mask = _documents(seed)
    ref = _model(arch).cuda()
    padded, unpadded = copy.deepcopy(ref), copy.deepcopy(ref)
    unpadded.enable_unpadding()

    h_ref, g_ref = _run(ref, ids, mask, torch.float32)
    h_pad, g_pad = _run(padded, ids, mask, torch.bfloat16)
    calls.clear()
    h_unp, g_unp = _run(unpadded, ids, mask, torch.bfloat16)

    # the kernel served every layer (the self-check ran earlier in the process, or now, first)
    real_tokens = int(mask.sum())
    assert [s for s in calls if s[0] == real_tokens] == [(real_tokens, 4, 64)] * 2, calls
    assert varlen.kernel_works(ids.device, torch.bfloat16, 64)

    err_pad, err_unp = _rel(h_pad, h_ref), _rel(h_unp, h_ref)
    assert err_pad < 2e-2 and err_unp <= 1.5 * err_pad + 1e-3, (err_pad, err_unp)
    assert g_unp.keys() == g_ref.keys()
    for name in g_ref:
        if name.endswith(("key.bias", "k_lin.bias")):
            continue  # true gradient 0 (softmax ignores a per-row constant): both paths return rounding noise
        e_pad, e_unp = _rel(g_pad[name], g_ref[name]), _rel(g_unp[name], g_ref[name])
        assert e_unp <= 1.5 * e_pad + 5e-3, (name, e_pad, e_unp)


def test_self_checks_pass_at_the_head_sizes_we_train():
    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (32, 64, 128):
            assert varlen.kernel_works(torch.device("cuda", 0), dtype, head_dim), (dtype, head_dim)
            assert varlen.dropout_kernel_works(torch.device("cuda", 0), dtype, head_dim), (dtype, head_dim)


def _qkv(seed, dtype=torch.bfloat16):
    """Packed [T, 12, 64] q, k, v of 8 documents (1 to 512 tokens) and their cu_seqlens."""
    ids, mask = _documents(seed)
    lengths = mask.sum(1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = lengths.cumsum(0)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(int(cu[-1]), 12, 64, generator=g, device="cuda").to(dtype) for _ in range(3))
    return q, k, v, cu, int(lengths.max())


def _fwd_bwd(q, k, v, cu, max_len, p, w, checkpoint=False):
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    fn = lambda *a: varlen._dropout_kernel(*a, cu, max_len, p, 0.125)  # noqa: E731
    out = torch.utils.checkpoint.checkpoint(fn, *leaves, use_reentrant=False) if checkpoint else fn(*leaves)
    (out.float() * w).sum().backward()
    return [out.detach().float()] + [x.grad.float() for x in leaves]


def test_dropout_kernel_at_zero_is_the_public_kernel():
    q, k, v, cu, max_len = _qkv(0)
    w = torch.randn(q.shape, device="cuda")
    got = _fwd_bwd(q, k, v, cu, max_len, 0.0, w)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = varlen._kernel(*leaves, cu, max_len, 0.125)
    (out.float() * w).sum().backward()
    want = [out.detach().float()] + [x.grad.float() for x in leaves]
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # the same forward kernel
    for a, b in zip(got[1:], want[1:]):
        assert _rel(a, b) < 1e-3  # the backward's dq accumulates with atomics: rounding varies by run


def test_dropout_kernel_is_unbiased_in_forward_and_backward():
    """E[dropout(P) / (1 - p)] = P, and the gradients are linear in the mask: their means over many seeds
    converge to the dropout-free values, while a single draw is far from them (the mask is real)."""
    q, k, v, cu, max_len = _qkv(1)
    w = torch.randn(q.shape, device="cuda")
    ref = _fwd_bwd(q, k, v, cu, max_len, 0.0, w)
    n, p = 200, 0.1
    total = None
    for i in range(n):
        torch.manual_seed(100 + i)
        r = _fwd_bwd(q, k, v, cu, max_len, p, w)
        total = r if total is None else [a + b for a, b in zip(total, r)]
        if i == 0:
            single = [_rel(a, b) for a, b in zip(r, ref)]
    mean = [_rel(a / n, b) for a, b in zip(total, ref)]
    assert all(s > 0.1 for s in single), single
    assert all(m < 0.05 for m in mean), mean  # ~ single / sqrt(n), plus bf16 rounding


def test_dropout_kernel_recomputes_the_same_mask_under_activation_checkpointing():
    q, k, v, cu, max_len = _qkv(2)
    w = torch.randn(q.shape, device="cuda")
    torch.manual_seed(7)
    plain = _fwd_bwd(q, k, v, cu, max_len, 0.1, w)
    torch.manual_seed(7)
    ckpt = _fwd_bwd(q, k, v, cu, max_len, 0.1, w, checkpoint=True)
    torch.manual_seed(8)
    other = _fwd_bwd(q, k, v, cu, max_len, 0.1, w)
    # the forward is deterministic: the same mask gives the same output, bit for bit
    torch.testing.assert_close(ckpt[0], plain[0], rtol=0, atol=0)
    assert _rel(other[0], plain[0]) > 0.1
    # FlashAttention's backward accumulates dq with atomics, so its rounding varies from run to run (a few elements
    # one bf16 step apart): the gradients agree to rounding, far closer than another mask
    for a, b, c in zip(ckpt[1:], plain[1:], other[1:]):
        assert _rel(a, b) < 1e-3 < 0.1 < _rel(c, b)
