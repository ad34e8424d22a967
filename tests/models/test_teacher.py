"""load_teacher: frozen, eval, cast and identical to the checkpoint; and an error that says what to do for every
checkpoint it cannot use (missing folder, no config, hub name offline, not a masked LM, no trained MLM head)."""
from __future__ import annotations

import pytest
import torch

from pipeline.models import MaskedLM, ModelLoadError, load_teacher
from tests.models import batch, gt_model_dir, tiny_hf


@pytest.fixture(scope="module", params=["bert", "distilbert", "roberta"])
def saved(request, tmp_path_factory):
    hf = tiny_hf(request.param, n_layers=2)
    path = tmp_path_factory.mktemp(f"teacher_{request.param}")
    hf.save_pretrained(path)
    return str(path), hf


def test_teacher_is_frozen_in_eval_and_equals_the_checkpoint(saved):
    path, hf = saved
    teacher = load_teacher(path)
    assert isinstance(teacher, MaskedLM) and teacher.family.name == hf.config.model_type
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())  # dropout off everywhere, not just at the top
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    ids, mask = batch()
    with torch.inference_mode():
        _, logits = teacher(ids, mask)
        expected = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert teacher.decoder_weight is teacher.word_embeddings.weight  # the tie survives save and load


def test_teacher_cast_to_bf16(saved):
    teacher = load_teacher(saved[0], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    ids, mask = batch()
    with torch.inference_mode():
        hidden, logits = teacher(ids, mask)
    assert hidden.dtype == logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_missing_folder(tmp_path):
    missing = tmp_path / "no_such_teacher"
    with pytest.raises(ModelLoadError, match="does not exist") as e:
        load_teacher(str(missing))
    assert str(missing) in str(e.value) and "save_pretrained" in str(e.value)


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json") as e:
        load_teacher(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_hub_name_unreachable_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Hugging Face Hub") as e:
        load_teacher("distil-pipeline-tests/no-such-model")
    assert "hf download distil-pipeline-tests/no-such-model" in str(e.value)


def test_not_a_masked_lm_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="'gpt2' model; supported masked LMs: bert, distilbert"):
        load_teacher(str(tmp_path))


def test_a_bare_encoder_has_no_trained_mlm_head():
    """The real all-MiniLM-L6-v2 is a BertModel: transformers would load it as BertForMaskedLM with a random
    head and no error; as a teacher that means distilling from noise."""
    with pytest.raises(ModelLoadError, match="has no trained MLM head") as e:
        load_teacher(gt_model_dir())
    message = str(e.value)
    assert gt_model_dir() in message and "cls.predictions.transform.dense.weight" in message
    assert "pretrain one with the teacher-free stage" in message


def test_incomplete_checkpoint_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_hf("bert", n_layers=2).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["bert.encoder.layer.1.output.dense.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing encoder weights.*layer.1.output.dense.weight"):
        load_teacher(str(tmp_path))
