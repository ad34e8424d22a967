"""Labelled data through `datasets` (pipeline/evaluation/data.py): every file format and schema, pair and
regression tasks, held-out validation, hidden test labels, and every bad input as one clear DataError."""
from __future__ import annotations

import gzip
import json

import pytest

from pipeline.evaluation.data import DataError, load_task_data, parse_hub_spec
from tests.evaluation.test_finetune import sentiment_rows, write_csv, write_jsonl


def write_tsv(path, rows):
    """GLUE's TSV: tab-separated, no quoting (a quote character is an ordinary character)."""
    lines = ["\t".join(rows[0])] + ["\t".join(str(r[k]) for k in rows[0]) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet", "csv.gz"])
def test_every_format_gives_the_same_task(tmp_path, fmt):
    rows = sentiment_rows(30, seed=0)
    rows[3]["text"] = 'she said "it was great" and left'  # a quote inside a TSV field stays as it is
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        write_csv(path, rows)
    elif fmt == "tsv":
        write_tsv(path, rows)
    elif fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        write_parquet(path, rows)
    else:
        plain = write_csv(tmp_path / "plain.csv", rows)
        path.write_bytes(gzip.compress(plain.read_bytes()))
    data = load_task_data(str(path), valid_fraction=0.2, seed=1)
    assert data.kind == "classification" and data.label_names == ["negative", "positive"]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 24, "validation": 6}
    texts = sorted(list(data.splits["train"]["text"]) + list(data.splits["validation"]["text"]))
    assert texts == sorted(r["text"] for r in rows)
    assert set(data.splits["train"]["labels"]) == {0, 1}
    again = load_task_data(str(path), valid_fraction=0.2, seed=1)
    # the held-out part is seeded
    assert list(again.splits["validation"]["text"]) == list(data.splits["validation"]["text"])


def test_folder_of_glue_shaped_pair_splits(tmp_path):
    """MNLI's layout: a pair task, two validation splits, a test split with hidden labels (-1)."""
    def rows(n, hidden=False):
        return [{"premise": f"premise {i}", "hypothesis": f"hypothesis {i}", "label": -1 if hidden else i % 3}
                for i in range(n)]
    write_tsv(tmp_path / "train.tsv", rows(12))
    write_jsonl(tmp_path / "validation_matched.jsonl", rows(4))
    write_parquet(tmp_path / "validation_mismatched.parquet", rows(5))
    write_csv(tmp_path / "test.csv", rows(3, hidden=True))
    data = load_task_data(str(tmp_path), "premise", "label", text_pair_column="hypothesis")
    assert data.text_columns == ("premise", "hypothesis") and data.label_names == ["0", "1", "2"]
    assert data.eval_splits == ["validation_matched", "validation_mismatched"]
    assert "test split left out: its labels are hidden" in " ".join(data.notes)
    assert list(data.splits["validation_mismatched"]["labels"]) == [0, 1, 2, 0, 1]


def test_regression_and_dev_alias(tmp_path):
    train = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "label": i / 4} for i in range(12)]
    write_csv(tmp_path / "train.csv", train)
    write_csv(tmp_path / "dev.csv", train[:4])
    data = load_task_data(str(tmp_path), "sentence1", "label", text_pair_column="sentence2")
    assert data.kind == "regression" and data.num_labels == 1 and data.label_names is None
    assert list(data.splits["validation"]["labels"]) == pytest.approx([0.0, 0.25, 0.5, 0.75])
    # integer scores are classes unless the task says regression
    ints = write_csv(tmp_path / "ints.csv", [{"text": f"t {i}", "label": i % 5} for i in range(20)])
    assert load_task_data(str(ints)).kind == "classification"
    assert load_task_data(str(ints), kind="regression").kind == "regression"


def test_hub_spec_is_parsed():
    assert parse_hub_spec("hf:nyu-mll/glue#config=mnli") == ("nyu-mll/glue", {"config": "mnli"})
    assert parse_hub_spec("hf:stanfordnlp/imdb") == ("stanfordnlp/imdb", {})
    assert parse_hub_spec("hf:x#config=a,revision=r1") == ("x", {"config": "a", "revision": "r1"})
    with pytest.raises(DataError, match="unknown option 'subset=sst2'"):
        parse_hub_spec("hf:glue#subset=sst2")


def test_hub_dataset_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hf:stanfordnlp/imdb: cannot load Hugging Face dataset 'stanfordnlp/imdb'.*"
                                        r"only cached datasets load"):
        load_task_data("hf:stanfordnlp/imdb")


def _bad(tmp_path, name, rows, **kw):
    path = write_csv(tmp_path / name, rows) if rows else tmp_path / name
    with pytest.raises(DataError) as e:
        load_task_data(str(path), **kw)
    return str(e.value)


def test_bad_inputs_name_file_column_and_row(tmp_path):
    rows = sentiment_rows(10, seed=0)
    msg = _bad(tmp_path, "a.csv", [{"body": r["text"], "label": r["label"]} for r in rows])
    assert msg.startswith(f"{tmp_path}/a.csv: column 'text': no such column") and "['body', 'label']" in msg
    assert "--text-column" in msg
    msg = _bad(tmp_path, "b.csv", rows, text_pair_column="sentence2")
    assert "column 'sentence2': no such column" in msg and "a single-text dataset? drop --text-pair-column" in msg
    msg = _bad(tmp_path, "c.csv", rows, label_column="y")
    assert "column 'y': no such column" in msg and "--label-column" in msg
    msg = _bad(tmp_path, "d.csv", rows, kind="regression")
    assert msg.startswith(f"{tmp_path}/d.csv: column 'label' row 1: the label 'positive' is not a number")
    msg = _bad(tmp_path, "e.csv", [{"text": f"t{i}", "label": 0.5 + i} for i in range(4)], kind="classification")
    assert "column 'label' row 1: the label 0.5 is a fractional number" in msg and "--task regression" in msg
    msg = _bad(tmp_path, "f.csv", [{"text": f"t{i}", "label": "same"} for i in range(4)])
    assert "single label ['same']" in msg
    (tmp_path / "empty.csv").write_text("text,label\n")
    assert "empty.csv: the split is empty (no records)" in _bad(tmp_path, "empty.csv", None)
    (tmp_path / "zero.jsonl").write_text("")
    assert "the file is empty" in _bad(tmp_path, "zero.jsonl", None)
    rows_gap = rows[:4] + [{"text": "", "label": "positive"}] + rows[4:]
    assert "column 'text' row 5: the text is empty (null)" in _bad(tmp_path, "g.csv", rows_gap)
    assert "no such file" in _bad(tmp_path, "missing.csv", None)
    (tmp_path / "h.txt").write_text("x")
    assert "unknown file type '.txt'" in _bad(tmp_path, "h.txt", None)
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{"text": \n')
    assert "broken.jsonl: cannot read the file as JSON" in _bad(tmp_path, "broken.jsonl", None)


def test_folder_errors(tmp_path):
    write_csv(tmp_path / "train.csv", sentiment_rows(8, seed=0))
    write_csv(tmp_path / "validation.csv", sentiment_rows(3, seed=1) + [{"text": "meh", "label": "neutral"}])
    with pytest.raises(DataError, match=r"validation.csv: column 'label' row 4: the label 'neutral' is not one "
                                        r"of the train labels \['negative', 'positive'\]"):
        load_task_data(str(tmp_path))
    write_jsonl(tmp_path / "dev.jsonl", sentiment_rows(3, seed=1))
    with pytest.raises(DataError, match=r"several files for the validation split: \['dev.jsonl', 'validation.csv'\]"):
        load_task_data(str(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    write_csv(other / "test.csv", sentiment_rows(3, seed=1))
    with pytest.raises(DataError, match=r"no train file .*\['test.csv'\]"):
        load_task_data(str(other))


def test_hub_shaped_splits_keep_classlabel_names_and_drop_hidden_labels():
    """What `load_dataset("nyu-mll/glue", "sst2")` returns, built locally: ClassLabel ids and names, a test split
    with hidden labels (-1)."""
    import datasets

    from pipeline.evaluation.data import prepare

    features = datasets.Features({"sentence": datasets.Value("string"), "idx": datasets.Value("int32"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})

    def split(labels):
        return datasets.Dataset.from_dict({"sentence": [f"s {i}" for i in range(len(labels))],
                                           "idx": list(range(len(labels))), "label": labels}, features=features)

    raw = {"train": split([1, 0, 1, 1]), "validation": split([0, 1]),
           "test": datasets.Dataset.from_dict({"sentence": ["t"], "idx": [0], "label": [-1]})}
    origins = {s: f"hf:nyu-mll/glue#config=sst2[{s}]" for s in raw}
    data = prepare(raw, origins, "sentence", "label")
    assert data.label_names == ["negative", "positive"] and data.eval_splits == ["validation"]
    assert list(data.splits["train"]["labels"]) == [1, 0, 1, 1]
    assert data.notes == ["test split left out: its labels are hidden (all -1)"]
