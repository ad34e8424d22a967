"""compatibility_problems: every reason a student, a teacher and the data cannot train together, at once."""
from __future__ import annotations

from pipeline.models import MaskedLM, compatibility_problems
from tests.models import VOCAB, tiny_hf


def test_a_matching_pair_has_no_problems():
    teacher, student = MaskedLM(tiny_hf("bert", n_layers=2)), MaskedLM(tiny_hf("distilbert", n_layers=1))
    assert compatibility_problems(student, teacher, data_vocab_size=VOCAB, seq_len=64, cosine_loss=True) == []
    # a vocabulary larger than the data's is padding, as in BERT's own checkpoints
    assert compatibility_problems(student, None, data_vocab_size=VOCAB - 10, seq_len=32, cosine_loss=False) == []


def test_every_mismatch_is_named_with_its_fix():
    from transformers import BertConfig, BertForMaskedLM

    teacher = MaskedLM(BertForMaskedLM(BertConfig(vocab_size=VOCAB + 1, hidden_size=48, num_hidden_layers=1,
                                                  num_attention_heads=4, intermediate_size=64)))
    student = MaskedLM(tiny_hf("distilbert", n_layers=1))
    problems = compatibility_problems(student, teacher, data_vocab_size=VOCAB + 5, seq_len=65, cosine_loss=True)
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert "prepare the data with the student's tokenizer" in text
    assert "data.seq_len (65) exceeds the student's 64 position embeddings" in text
    assert f"teacher vocabulary {VOCAB + 1} != student {VOCAB}" in text
    assert "set loss.cos=0" in text
    # without the cosine loss, different hidden sizes are fine
    assert len(compatibility_problems(student, teacher, data_vocab_size=VOCAB, seq_len=64, cosine_loss=False)) == 1
