"""build_student: the DistilBERT construction copies the right teacher weights into the right places and computes
what the teacher computes; random and pretrained inits; save/load; and an error for every bad argument."""
from __future__ import annotations

import logging

import pytest
import torch

from pipeline.models import MaskedLM, ModelLoadError, build_student, default_layer_map
from tests.models import VOCAB, batch, gt_model_dir, tiny_hf

PARTS = ("q", "k", "v", "o", "attn_norm", "ffn_in", "ffn_out", "out_norm")


@pytest.fixture(scope="module")
def teacher():
    return MaskedLM(tiny_hf("bert", n_layers=12)).requires_grad_(False)


@pytest.fixture(scope="module")
def distil_teacher():
    return MaskedLM(tiny_hf("distilbert", n_layers=4)).requires_grad_(False)


def layer_part(model: MaskedLM, i: int, part: str) -> torch.nn.Module:
    return model.layers[i].get_submodule(model.family.layer_parts[part])


def four_d_mask(model: MaskedLM, hidden, mask):
    """The mask a layer receives inside the model, made the way the model itself makes it."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask)


# --- the layer map ---------------------------------------------------------------------------------------


def test_default_layer_map():
    assert default_layer_map(12, 6) == [0, 2, 4, 7, 9, 11]  # DistilBERT's choice
    assert default_layer_map(12, 12) == list(range(12))
    assert default_layer_map(12, 4) == [0, 4, 7, 11]
    assert default_layer_map(6, 3) == [0, 3, 5]
    assert default_layer_map(4, 3) == [0, 2, 3]  # 1.5 rounds up, not to even
    assert default_layer_map(12, 1) == [0]
    for t in range(2, 25):
        for s in range(2, t + 1):  # both ends kept, each teacher layer at most once, in order
            m = default_layer_map(t, s)
            assert len(m) == s and m[0] == 0 and m[-1] == t - 1 and all(b > a for a, b in zip(m, m[1:]))
    for t, s in ((6, 7), (6, 0)):
        with pytest.raises(ValueError, match="cannot be taken"):
            default_layer_map(t, s)


# --- the DistilBERT construction -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["distilbert", "bert"])
def test_layer_parameters_come_from_the_mapped_teacher_layers(teacher, arch):
    student = build_student(teacher=teacher, arch=arch)
    assert student.family.name == arch and len(student.layers) == 6
    for i, j in enumerate([0, 2, 4, 7, 9, 11]):
        for part in PARTS:
            s, t = layer_part(student, i, part), layer_part(teacher, j, part)
            assert torch.equal(s.weight, t.weight) and torch.equal(s.bias, t.bias), (i, j, part)
    for part in ("head_dense", "head_norm"):
        s = student.hf.get_submodule(getattr(student.family, part))
        t = teacher.hf.get_submodule(getattr(teacher.family, part))
        assert torch.equal(s.weight, t.weight) and torch.equal(s.bias, t.bias)
    assert torch.equal(student.decoder_bias, teacher.decoder_bias)
    assert torch.equal(student.word_embeddings.weight, teacher.word_embeddings.weight)
    assert student.decoder_weight is student.word_embeddings.weight
    encoder = student.hf.get_submodule(student.family.encoder)
    assert getattr(encoder, "pooler", None) is None
    assert hasattr(encoder.embeddings, "token_type_embeddings") == (arch == "bert")


def test_token_type_zero_is_folded_into_the_positions(teacher):
    student = build_student(teacher=teacher)
    t_emb = teacher.hf.bert.embeddings
    assert t_emb.token_type_embeddings.weight[0].abs().min() > 0  # folding must matter in this test
    expected = t_emb.position_embeddings.weight + t_emb.token_type_embeddings.weight[0]
    torch.testing.assert_close(student.hf.distilbert.embeddings.position_embeddings.weight, expected,
                               rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["distilbert", "bert"])
def test_embedding_output_equals_the_teachers(teacher, arch):
    student = build_student(teacher=teacher, arch=arch).eval()
    ids, _ = batch()
    out = student.hf.get_submodule(student.family.encoder).embeddings(input_ids=ids)
    torch.testing.assert_close(out, teacher.hf.bert.embeddings(input_ids=ids), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["distilbert", "bert"])
@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "mask"])
def test_each_student_layer_computes_its_teacher_layer(teacher, arch, padded):
    student = build_student(teacher=teacher, arch=arch).eval()
    ids, mask = batch(padded=padded)
    hidden = torch.randn(*ids.shape, 32, generator=torch.Generator().manual_seed(3))
    t_mask, s_mask = four_d_mask(teacher, hidden, mask), four_d_mask(student, hidden, mask)
    assert (t_mask is None) == (not padded)
    for i, j in enumerate(default_layer_map(12, 6)):
        torch.testing.assert_close(student.layers[i](hidden, attention_mask=s_mask),
                                   teacher.layers[j](hidden, attention_mask=t_mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["distilbert", "bert"])
def test_all_layers_copied_gives_the_teachers_outputs(teacher, arch):
    student = build_student(teacher=teacher, arch=arch, n_layers=12).eval()
    ids, mask = batch()
    t_hidden, t_logits = teacher(ids, mask)
    s_hidden, s_logits = student(ids, mask)
    keep = mask.bool()  # padded positions are not compared: their values are never used
    torch.testing.assert_close(s_hidden[keep], t_hidden[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_logits[keep], t_logits[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["distilbert", "bert"])
def test_from_a_distilbert_teacher(distil_teacher, arch):
    student = build_student(teacher=distil_teacher, arch=arch, layers=[0, 1, 2, 3]).eval()
    ids, mask = batch()
    keep = mask.bool()
    torch.testing.assert_close(student(ids, mask)[1][keep], distil_teacher(ids, mask)[1][keep],
                               rtol=1e-5, atol=1e-5)
    half = build_student(teacher=distil_teacher, arch=arch)
    assert len(half.layers) == 2
    for part in PARTS:
        assert torch.equal(layer_part(half, 1, part).weight, layer_part(distil_teacher, 3, part).weight)


def test_shorter_position_table(teacher):
    student = build_student(teacher=teacher, max_position=16)
    assert student.config.max_position_embeddings == 16
    t_emb = teacher.hf.bert.embeddings
    torch.testing.assert_close(student.hf.distilbert.embeddings.position_embeddings.weight,
                               t_emb.position_embeddings.weight[:16] + t_emb.token_type_embeddings.weight[0])


def test_the_student_is_independent_of_the_teacher(teacher):
    """A copy, never a shared tensor: training the student must not move the teacher."""
    student = build_student(teacher=teacher, n_layers=12)
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not teacher_ptrs & {p.data_ptr() for p in student.parameters()}
    assert student.training and all(p.requires_grad for p in student.parameters())


@pytest.mark.parametrize("arch", ["distilbert", "bert"])
def test_dropout_reaches_the_config_and_the_modules(teacher, arch):
    student = build_student(teacher=teacher, arch=arch, dropout=0.2, attention_dropout=0.05)
    hidden_key, attention_key = (("dropout", "attention_dropout") if arch == "distilbert"
                                 else ("hidden_dropout_prob", "attention_probs_dropout_prob"))
    assert getattr(student.config, hidden_key) == 0.2 and getattr(student.config, attention_key) == 0.05
    ps = {m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)}
    assert ps == {0.2, 0.05}


@pytest.mark.parametrize("arch", ["distilbert", "bert"])
def test_save_and_load_round_trip(teacher, arch, tmp_path):
    from transformers import AutoModelForMaskedLM

    student = build_student(teacher=teacher, arch=arch)
    student.hf.save_pretrained(tmp_path)
    loaded, info = AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = MaskedLM(loaded).eval()
    assert loaded.family.name == arch and loaded.decoder_weight is loaded.word_embeddings.weight
    ids, mask = batch()
    expected = student.eval()(ids, mask)
    for got, want in zip(loaded(ids, mask), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- random and pretrained inits --------------------------------------------------------------------------


def test_random_init_is_seeded_and_leaves_the_global_rng_alone():
    sizes = dict(init="random", n_layers=2, hidden_size=16, n_heads=2, vocab_size=50)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_student(**sizes, seed=1)
    assert torch.equal(torch.rand(1), before)
    b = build_student(**sizes, seed=1)
    c = build_student(**sizes, seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.word_embeddings.weight, c.word_embeddings.weight)
    assert a.config.hidden_dim == 64 and a.config.max_position_embeddings == 512  # the documented defaults
    assert a.decoder_weight is a.word_embeddings.weight


def test_random_init_takes_missing_sizes_from_the_teacher(teacher):
    student = build_student(init="random", teacher=teacher, arch="bert")
    assert (student.config.num_hidden_layers, student.config.hidden_size, student.config.vocab_size) == (6, 32, VOCAB)
    assert not torch.equal(student.word_embeddings.weight, teacher.word_embeddings.weight)
    wide = build_student(init="random", teacher=teacher, hidden_size=64, n_heads=8, n_layers=3)
    assert (wide.config.dim, wide.config.n_heads, wide.config.n_layers, wide.config.hidden_dim) == (64, 8, 3, 64)


def test_pretrained_from_a_bare_encoder_keeps_the_encoder(caplog, wordpiece_dir):
    """all-MiniLM-L6-v2 has no MLM head: the student gets a fresh one, and its encoder is the original."""
    from tokenizers import Tokenizer
    from transformers import AutoModel

    with caplog.at_level(logging.WARNING, logger="pipeline.models.student"):
        student = build_student(init="pretrained", pretrained=gt_model_dir(), seed=5, dropout=0.0,
                                attention_dropout=0.0)
    assert "no MLM head; initialised fresh" in caplog.text and "cls.predictions.transform.dense.weight" in caplog.text
    assert student.family.name == "bert" and student.training and student.config.hidden_dropout_prob == 0.0
    assert student.decoder_weight is student.word_embeddings.weight
    head = student.hf.cls.predictions.transform  # initialised as BERT initialises a head
    assert torch.equal(head.LayerNorm.weight, torch.ones(384)) and torch.equal(student.decoder_bias, torch.zeros(30522))
    assert 0.015 < head.dense.weight.std() < 0.025

    tok = Tokenizer.from_file(f"{wordpiece_dir}/tokenizer.json")
    encodings = tok.encode_batch(["The student keeps the encoder.", "A longer sentence, which needs no padding "
                                  "at all because it is the longest one here."])
    length = max(len(e.ids) for e in encodings)
    ids = torch.tensor([e.ids + [0] * (length - len(e.ids)) for e in encodings])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (length - len(e.ids)) for e in encodings])
    original = AutoModel.from_pretrained(gt_model_dir()).eval()
    with torch.no_grad():
        expected = original(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden, logits = student.eval()(ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(hidden[keep], expected[keep], rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, length, 30522)

    again = build_student(init="pretrained", pretrained=gt_model_dir(), seed=5)
    assert torch.equal(again.hf.cls.predictions.transform.dense.weight, head.dense.weight)  # the seed decides


def test_pretrained_from_a_masked_lm_loads_everything(tmp_path, caplog):
    hf = tiny_hf("distilbert", n_layers=2)
    hf.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.models.student"):
        student = build_student(init="pretrained", pretrained=str(tmp_path))
    assert "initialised fresh" not in caplog.text
    ids, mask = batch()
    torch.testing.assert_close(student.eval()(ids, mask)[1], hf(input_ids=ids, attention_mask=mask).logits,
                               rtol=0, atol=0)


# --- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=[0, 2, 12]), r"\[12\] out of range for a 12-layer teacher"),
    (dict(layers=[-1, 2]), r"\[-1\] out of range"),
    (dict(layers=[0, 4, 4, 7]), "strictly increasing"),
    (dict(layers=[0, 7, 4]), "strictly increasing"),
    (dict(layers=[0, 4, 7], n_layers=4), "has 3 entries but n_layers=4"),
    (dict(layers=[]), "layers is empty"),
    (dict(n_layers=13), "needs 1..12 layers"),
    (dict(hidden_size=64), "hidden_size=64 differs from the teacher's 32"),
    (dict(n_heads=2), "n_heads=2 differs"),
    (dict(vocab_size=100), "vocab_size=100 differs"),
    (dict(max_position=65), "max_position=65 must be 1..64"),
    (dict(arch="gpt"), "arch must be one of"),
    (dict(init="copy"), "init must be one of"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(init="random", layers=[0, 1]), "layers only applies to init 'teacher'"),
    (dict(init="random", teacher=None, n_layers=2), "needs hidden_size, n_heads, vocab_size"),
    (dict(init="random", teacher=None, n_layers=2, hidden_size=30, n_heads=4, vocab_size=9), "not a multiple"),
    (dict(init="random", vocab_size=50), "vocab_size=50 differs from the teacher's"),
    (dict(init="teacher", teacher=None), "init 'teacher' needs a teacher"),
    (dict(init="pretrained"), "needs pretrained="),
])
def test_bad_arguments_raise_a_clear_error(teacher, kwargs, message):
    kwargs = {"teacher": teacher, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_student(**kwargs)


def test_every_problem_is_reported_at_once(teacher):
    with pytest.raises(ValueError) as e:
        build_student(teacher=teacher, hidden_size=64, layers=[3, 1, 20])
    text = str(e.value)
    assert "hidden_size=64" in text and "out of range" in text and "strictly increasing" in text


def test_layer_norm_eps_that_distilbert_cannot_hold():
    teacher = MaskedLM(tiny_hf("bert", n_layers=2, layer_norm_eps=1e-5))
    with pytest.raises(ValueError, match="layer_norm_eps 1e-05 differs from DistilBERT's fixed 1e-12"):
        build_student(teacher=teacher)
    assert build_student(teacher=teacher, arch="bert").config.layer_norm_eps == 1e-5


def test_roberta_teacher_is_refused_for_the_copy():
    with pytest.raises(ValueError, match="not roberta"):
        build_student(teacher=MaskedLM(tiny_hf("roberta", n_layers=2)))


def test_pretrained_arguments_must_agree_with_the_checkpoint(teacher, tmp_path, caplog):
    tiny_hf("distilbert", n_layers=2).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.models.student"):
        kept = build_student(init="pretrained", pretrained=str(tmp_path), arch="bert")
    assert kept.family.name == "distilbert" and "arch='bert' ignored" in caplog.text
    with pytest.raises(ValueError, match="n_layers=3 differs from the checkpoint's 2"):
        build_student(init="pretrained", pretrained=str(tmp_path), n_layers=3)
    with pytest.raises(ValueError, match="vocab_size 30522 but the teacher 99"):
        build_student(init="pretrained", pretrained=gt_model_dir(), teacher=teacher)
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_student(init="pretrained", pretrained=str(tmp_path / "nothing"))
