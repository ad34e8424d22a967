"""MaskedLM: the same numbers as the HF model's own forward, for every family; logits at chosen positions;
the all-ones mask dropped; and the stages working under DeepSpeed ZeRO-3, where parameters are partitioned."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.models import MaskedLM
from tests.models import batch, tiny_hf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["bert", "distilbert", "roberta"])
def model(request):
    return MaskedLM(tiny_hf(request.param, n_layers=2))


def test_stages_match_the_hf_forward(model):
    ids, mask = batch()
    hidden, logits = model(ids, mask)
    out = model.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(hidden, out.hidden_states[-1], rtol=0, atol=0)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=0)
    # the three stages, and the decoder properties, compose to the same logits
    torch.testing.assert_close(model.logits(model.transform(model.encode(ids, mask))), logits, rtol=0, atol=0)
    by_hand = model.transform(hidden) @ model.decoder_weight.T + model.decoder_bias
    torch.testing.assert_close(by_hand, logits, rtol=1e-5, atol=1e-5)


def test_decoder_is_tied_to_the_word_embeddings(model):
    assert model.decoder_weight is model.word_embeddings.weight
    assert model.decoder_weight.shape == (model.config.vocab_size, model.config.hidden_size)
    assert model.decoder_bias.shape == (model.config.vocab_size,)
    if model.family.name == "bert":  # one bias Parameter, not two copies that drift apart in training
        assert model.decoder_bias is model.hf.cls.predictions.bias


def test_logits_at_positions_equal_the_full_logits_there(model):
    ids, mask = batch()
    _, full = model(ids, mask)
    chosen = torch.zeros_like(mask, dtype=torch.bool)
    chosen[0, [1, 7]] = chosen[1, 2] = chosen[2, [0, 3, 9]] = True
    expected = full[chosen]
    flat_index = chosen.flatten().nonzero().squeeze(1)
    for positions in (chosen, chosen.flatten(), flat_index):
        hidden, logits = model(ids, mask, positions=positions)
        assert hidden.shape == (*ids.shape, model.config.hidden_size)  # hidden states stay whole
        assert logits.shape == (6, model.config.vocab_size)
        torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    assert model(ids, mask, positions=flat_index[:0])[1].shape == (0, model.config.vocab_size)
    with pytest.raises(ValueError, match="bool positions"):
        model(ids, mask, positions=chosen[:, :4])
    with pytest.raises(ValueError, match="index positions"):
        model(ids, mask, positions=flat_index.view(2, 3))


def test_an_all_ones_mask_reaches_the_encoder_as_none(model):
    seen = []
    encoder = model.hf.get_submodule(model.family.encoder)
    handle = encoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True)
    try:
        ids, ones = batch(padded=False)
        _, with_ones = model(ids, ones)
        _, without = model(ids)
        ids, mask = batch(padded=True)
        model(ids, mask)
    finally:
        handle.remove()
    assert seen[0] is None and seen[1] is None and seen[2] is mask
    torch.testing.assert_close(with_ones, without, rtol=0, atol=0)


def test_state_dict_is_the_hf_models_under_hf(model):
    """Checkpoints of the engine-wrapped MaskedLM hold each weight once, as "hf." + the HF model's own key."""
    assert list(model.state_dict()) == ["hf." + k for k in model.hf.state_dict()]


def test_rejects_a_model_without_an_mlm_head():
    from transformers import BertConfig, BertModel

    with pytest.raises(TypeError, match="BertModel"):
        MaskedLM(BertModel(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=8)))


ZERO3_SCRIPT = textwrap.dedent("""
    import copy, os, torch, deepspeed
    from pipeline.models import MaskedLM, build_student
    from tests.models import batch, tiny_hf

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    teacher = MaskedLM(tiny_hf("bert", n_layers=4))
    for arch in ("distilbert", "bert"):
        student = build_student(teacher=teacher, arch=arch, n_layers=2, dropout=0.0, attention_dropout=0.0)
        reference = copy.deepcopy(student)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        config = {"train_micro_batch_size_per_gpu": 3, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=config)
        # partitioned: a bare read of .weight inside forward would see an empty tensor
        assert student.decoder_weight.numel() == 0
        ids, mask = batch()
        chosen = torch.zeros_like(mask, dtype=torch.bool)
        chosen[0, 2] = chosen[2, 5] = True
        for positions in (None, chosen):
            hidden, logits = engine(ids, mask, positions=positions)
            ref_hidden, ref_logits = reference(ids, mask, positions=positions)
            torch.testing.assert_close(hidden, ref_hidden, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)
        engine.backward(logits.logsumexp(-1).mean() + hidden.pow(2).mean())
        engine.step()
        with deepspeed.zero.GatheredParameters(list(student.parameters())):
            # the update reached the (tied) decoder weight and its bias
            assert not torch.equal(student.decoder_bias, reference.decoder_bias)
            assert not torch.equal(student.decoder_weight, reference.decoder_weight)
            assert student.decoder_weight is student.word_embeddings.weight
        engine.destroy()

    # The chunked loss reads the decoder weight and bias inside the student's forward (a `head`): registered as
    # external parameters, ZeRO-3 gathers them there, and one step equals a plain-loss step of a twin engine.
    from pipeline.losses.chunked import chunked_kd_loss
    from pipeline.losses.distill import kd_loss, mlm_loss
    student = build_student(teacher=teacher, arch="distilbert", n_layers=2, dropout=0.0, attention_dropout=0.0)
    twin = copy.deepcopy(student)
    before = copy.deepcopy(student)
    student.register_decoder_for_zero3()
    # no reuse or prefetch: a parameter is released after each use, as in a big model
    strict = {**config, "zero_optimization": {**config["zero_optimization"], "stage3_max_reuse_distance": 0,
                                              "stage3_prefetch_bucket_size": 0, "stage3_max_live_parameters": 0}}
    engines = [deepspeed.initialize(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.5), config=strict)[0]
               for m in (student, twin)]
    ids, mask = batch()
    rows = mask.bool()
    labels = torch.full((int(rows.sum()),), -100)
    labels[::3] = ids[rows][::3]
    with torch.no_grad():
        t_transformed = teacher.transform(teacher.encode(ids, mask)[rows])
    def head(x, w, b):
        return chunked_kd_loss(x, t_transformed, w, b, teacher.decoder_weight, teacher.decoder_bias, 2.0, labels, 4,
                               kd_weight=5.0, mlm_weight=2.0)
    for _ in range(3):  # from the second step on, ZeRO-3 releases parameters by its recorded trace
        _, (kd, mlm, _) = engines[0](ids, mask, rows, head=head)
        _, logits = engines[1](ids, mask, rows)
        ref_kd, ref_mlm = kd_loss(logits, teacher.logits(t_transformed), 2.0), mlm_loss(logits, labels)
        torch.testing.assert_close((kd, mlm), (ref_kd, ref_mlm), rtol=1e-5, atol=1e-6)
        for engine, loss in zip(engines, (5 * kd + 2 * mlm, 5 * ref_kd + 2 * ref_mlm)):
            engine.backward(loss)
            engine.step()
    with deepspeed.zero.GatheredParameters(list(student.parameters()) + list(twin.parameters())):
        for (name, p), q, p0 in zip(student.named_parameters(), twin.parameters(), before.parameters()):
            assert not torch.equal(p, p0) or name.endswith("k_lin.bias"), f"{name} not updated"
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for engine in engines:
        engine.destroy()
    print("ZERO3 OK")
""")


@pytest.mark.integration
def test_forward_and_backward_under_zero3(tmp_path):
    """One rank on gloo: ZeRO-3 still partitions (each parameter's data is emptied), so this catches any
    stage that reads a weight outside its module's own forward."""
    script = tmp_path / "zero3.py"
    script.write_text(ZERO3_SCRIPT)
    with socket.socket() as sock:  # a free port: other test sessions may share this machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "ZERO3 OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
