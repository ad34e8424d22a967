"""SQuAD v1.1 (pipeline/evaluation/squad.py): the official answer normalisation and EM/F1 on hand-made cases,
the sliding windows (answers cut by a window are labelled [CLS]), the n-best post-processing on hand-set logits,
and a tiny end-to-end run through launch/finetune.py --task qa with SQuAD's own nested JSON file."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from pipeline.evaluation.data import DataError
from tests.evaluation.test_finetune import distil_student  # noqa: F401 (fixture)
from pipeline.evaluation.squad import (eval_features, exact_match, f1, normalize_answer, postprocess,
                                       squad_scores, train_features)


def test_normalisation_and_scores_by_hand():
    assert normalize_answer("The  Cat's hat!") == "cats hat"
    assert normalize_answer("an Apple, a pear") == "apple pear"
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel tower") == 0.0
    # pred [cat, sat], gold [cat, sat, down]: precision 1, recall 2/3
    assert f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert f1("dog", "cat") == 0.0
    # the best gold answer counts; a missing prediction scores 0; results in percent
    scores = squad_scores({"q1": "Denver Broncos", "q2": "in 1990"},
                          {"q1": ["Broncos", "Denver Broncos"], "q2": ["1989 or 1990"], "q3": ["x"]})
    assert scores["exact_match"] == pytest.approx(100 / 3)
    # q2: pred [in, 1990] gold [1989, or, 1990]: same 1, p 1/2, r 1/3 -> f1 0.4
    assert scores["f1"] == pytest.approx(100 * (1 + 0.4 + 0) / 3)


@pytest.fixture(scope="module")
def tokenizer(wordpiece_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(wordpiece_dir)


CONTEXT = ("The river rises in the hills north of the old town. It flows south past seven mills and a church. "
           "Near the sea the river turns west and reaches the harbour of Porthmill after ninety miles.")
QUESTION = "Where does the river reach the sea?"
ANSWER = "the harbour of Porthmill"


def example(answer=ANSWER):
    start = CONTEXT.index(answer)
    return {"id": ["q1"], "question": [QUESTION], "context": [CONTEXT],
            "answers": [{"text": [answer], "answer_start": [start]}]}


def test_training_windows_label_the_answer_or_cls(tokenizer):
    ex = example()
    enc = train_features(ex, tokenizer, "question", "context", "answers", max_length=32, doc_stride=8)
    n = len(enc["input_ids"])
    assert n >= 3  # the context is several windows long
    offsets = tokenizer(QUESTION, CONTEXT, truncation="only_second", max_length=32, stride=8,
                        return_overflowing_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    inside = cut = 0
    for i in range(n):
        s, e = enc["start_positions"][i], enc["end_positions"][i]
        if s == 0:
            assert e == 0
            cut += 1
            continue
        inside += 1
        assert CONTEXT[offsets[i][s][0]:offsets[i][e][1]] == ANSWER  # the labelled tokens are the answer
    assert inside >= 1 and cut >= 1
    # a window that holds only part of the answer is labelled [CLS], not the part
    long_answer = "reaches the harbour of Porthmill after ninety miles"
    enc = train_features(example(long_answer), tokenizer, "question", "context", "answers", max_length=24,
                         doc_stride=4)
    for i in range(len(enc["input_ids"])):
        s = enc["start_positions"][i]
        assert s == 0 or enc["end_positions"][i] - s + 1 >= len(tokenizer.tokenize(long_answer))


def test_postprocess_picks_the_best_valid_span_over_windows(tokenizer):
    ex = example()
    feats = eval_features(ex, tokenizer, "question", "context", max_length=32, doc_stride=8)
    n = len(feats["input_ids"])
    offsets = feats["offset_mapping"]
    assert all(offsets[i][0] is None for i in range(n))  # [CLS] and the question are not context
    # the answer's tokens in the last window that holds it whole
    target = None
    for i in range(n):
        ctx = [t for t, o in enumerate(offsets[i]) if o is not None]
        starts = [t for t in ctx if offsets[i][t][0] == CONTEXT.index(ANSWER)]
        ends = [t for t in ctx if offsets[i][t][1] == CONTEXT.index(ANSWER) + len(ANSWER)]
        if starts and ends:
            target = (i, starts[0], ends[0])
    assert target is not None
    width = max(len(f) for f in feats["input_ids"])
    start_logits = np.full((n, width), -10.0, dtype=np.float32)
    end_logits = np.full((n, width), -10.0, dtype=np.float32)
    i, s, e = target
    start_logits[i, s], end_logits[i, e] = 25.0, 25.0  # the answer: 50
    # decoys that must lose: a span of question tokens (not context: 100), an end before its start (80)
    start_logits[0, 1], end_logits[0, 2] = 50.0, 50.0
    ctx0 = [t for t, o in enumerate(offsets[0]) if o is not None]
    start_logits[0, ctx0[5]], end_logits[0, ctx0[2]] = 40.0, 40.0
    # and a span over a whole window's context (56), longer than max_answer_length tokens
    j = next(k for k in range(1, n) if k != i)
    ctx_j = [t for t, o in enumerate(offsets[j]) if o is not None]
    assert len(ctx_j) > 10
    start_logits[j, ctx_j[0]], end_logits[j, ctx_j[-1]] = 28.0, 28.0
    rows = [{k: v[0] for k, v in ex.items()}]
    assert postprocess(rows, feats, start_logits, end_logits, n_best=20, max_answer_length=10) == {"q1": ANSWER}
    whole = CONTEXT[offsets[j][ctx_j[0]][0]:offsets[j][ctx_j[-1]][1]]
    assert postprocess(rows, feats, start_logits, end_logits, n_best=20, max_answer_length=100) == {"q1": whole}


def qa_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
    cities = ["paris", "london", "berlin", "madrid", "rome", "vienna", "oslo", "dublin"]
    out = []
    for i in range(n):
        who, city = rng.choice(names).title(), rng.choice(cities).title()
        filler = " ".join(rng.choice(["it", "was", "a", "long", "day", "and", "the", "weather", "fine"])
                          for _ in range(rng.randint(5, 30)))
        context = f"{filler}. {who} lives in {city} with a cat. {filler}."
        out.append({"id": f"{seed}-{i}", "question": f"Where does {who} live?", "context": context,
                    "answers": {"text": [city], "answer_start": [context.index(city)]}})
    return out


def squad_json(rows) -> dict:
    """SQuAD's own nested layout (train-v1.1.json / dev-v1.1.json)."""
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": r["context"], "qas": [{"id": r["id"], "question": r["question"],
                                           "answers": [{"text": t, "answer_start": s} for t, s in
                                                       zip(r["answers"]["text"], r["answers"]["answer_start"])]}]}
        for r in rows]}]}


def test_question_answering_end_to_end(distil_student, tmp_path):
    from transformers import AutoModelForQuestionAnswering

    from pipeline.evaluation.finetune import FinetuneConfig, finetune

    d = tmp_path / "qa"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_rows(64, 0)))
    (d / "validation.json").write_text(json.dumps(squad_json(qa_rows(16, 1))))
    out = tmp_path / "out"
    report = finetune(FinetuneConfig(model=distil_student, data=str(d), output=str(out), task="qa",
                                     text_column="question", text_pair_column="context", label_column="answers",
                                     epochs=2, lr=1e-3, batch_size=8, max_length=32, doc_stride=8, seed=0,
                                     tqdm=False))
    val = report["results"]["validation"]
    assert val["questions"] == 16 and val["exact_match"] >= 50 and val["f1"] >= val["exact_match"], report
    assert report["config"]["metric"] == "f1" and len(report["history"]) == 2
    assert json.loads((out / "report.json").read_text())["results"] == report["results"]
    model = AutoModelForQuestionAnswering.from_pretrained(out)
    assert model.config.architectures == ["DistilBertForQuestionAnswering"]


def test_question_answering_bad_input(distil_student, tmp_path):
    from pipeline.evaluation.finetune import FinetuneConfig, finetune

    rows = qa_rows(4, 0)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "answers"}) + "\n" for r in rows))
    cfg = dict(model=distil_student, output=str(tmp_path / "o"), task="qa", text_column="question",
               text_pair_column="context", label_column="answers")
    with pytest.raises(DataError, match=r"train.jsonl: column 'answers': no such column"):
        finetune(FinetuneConfig(data=str(path), **cfg))
    rows[2]["answers"]["answer_start"] = [len(rows[2]["context"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"train.jsonl: column 'answers' row 3: answer .* is outside the context"):
        finetune(FinetuneConfig(data=str(path), **cfg))
