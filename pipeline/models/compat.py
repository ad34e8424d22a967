"""Whether a student, a teacher and the prepared data can train together: vocabulary, positions, hidden size."""
from __future__ import annotations

from .mlm import MaskedLM


def compatibility_problems(student: MaskedLM, teacher: MaskedLM | None, *, data_vocab_size: int, seq_len: int,
                           cosine_loss: bool) -> list[str]:
    """Every reason the pair cannot train on this data, each saying what to change; [] when they can.

    The student's vocabulary must cover the data's ids (a larger one is padding, as in BERT's checkpoints); the
    teacher's must equal the student's, because the KD loss compares their distributions id by id; sequences must
    fit the student's position table; the cosine loss compares hidden states, so it needs equal hidden sizes.
    """
    s = student.hf.config
    problems = []
    if s.vocab_size < data_vocab_size:
        problems.append(f"student: the student's vocabulary ({s.vocab_size}) is smaller than the dataset's "
                        f"({data_vocab_size}): prepare the data with the student's tokenizer")
    if seq_len > s.max_position_embeddings:
        problems.append(f"data.seq_len ({seq_len}) exceeds the student's {s.max_position_embeddings} position "
                        f"embeddings")
    if teacher is not None:
        t = teacher.hf.config
        if t.vocab_size != s.vocab_size:
            problems.append(f"teacher vocabulary {t.vocab_size} != student {s.vocab_size}")
        if cosine_loss and t.hidden_size != s.hidden_size:
            problems.append("loss.cos > 0 needs equal teacher and student hidden sizes; set loss.cos=0")
    return problems
