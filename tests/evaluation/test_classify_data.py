"""Labelled data for fine-tuning: formats, folders, splits, labels, and clear errors."""
from __future__ import annotations

import csv
import json

import pytest

from pipeline.evaluation.classify_data import ClassifyDataError, load_classification_data


def write_csv(path, rows, columns=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, list(columns))
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows(n, labels=("neg", "pos")):
    return [{"text": f"example number {i}", "label": labels[i % len(labels)]} for i in range(n)]


def test_single_file_gets_seeded_validation_split_and_no_test(tmp_path):
    path = write_csv(tmp_path / "data.csv", rows(50))
    a = load_classification_data(str(path), valid_fraction=0.2, seed=3)
    b = load_classification_data(str(path), valid_fraction=0.2, seed=3)
    c = load_classification_data(str(path), valid_fraction=0.2, seed=4)
    assert (len(a.train), len(a.validation), a.test) == (40, 10, None)
    assert a.validation.texts == b.validation.texts and a.validation.texts != c.validation.texts
    assert sorted(a.train.texts + a.validation.texts) == sorted(r["text"] for r in rows(50))
    assert a.label_names == ["neg", "pos"] and a.id2label == {0: "neg", 1: "pos"}
    assert a.report_split is a.validation
    assert any("no test split" in n for n in a.notes) and any("held out 10" in n for n in a.notes)


def test_folder_with_all_splits_and_mixed_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_csv(tmp_path / "train.csv", rows(20, labels=("b", "a", "c")))
    write_jsonl(tmp_path / "dev.jsonl", rows(6, labels=("c", "a")))
    pq.write_table(pa.Table.from_pylist(rows(9, labels=("a", "b", "c"))), tmp_path / "test.parquet")
    d = load_classification_data(str(tmp_path))
    assert d.label_names == ["a", "b", "c"]  # sorted, from train
    assert (len(d.train), len(d.validation), len(d.test)) == (20, 6, 9)
    assert d.validation.labels[:2] == [2, 0] and d.test.labels[:3] == [0, 1, 2]
    assert d.notes == []


def test_int_labels_are_sorted_numerically_and_match_across_formats(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": [10, 2, 1][i % 3]} for i in range(9)])
    write_csv(tmp_path / "valid.csv", [{"text": "x", "label": "10"}, {"text": "y", "label": "2"}])
    d = load_classification_data(str(tmp_path))
    assert d.label_names == ["1", "2", "10"] and d.validation.labels == [2, 1]


def test_separate_test_source_and_custom_columns(tmp_path):
    data = write_jsonl(tmp_path / "all.jsonl", [{"sentence": f"s {i}", "y": i % 2} for i in range(20)])
    test = write_csv(tmp_path / "held.csv", [{"sentence": "t", "y": 1}], columns=("sentence", "y"))
    d = load_classification_data(str(data), text_column="sentence", label_column="y", test=str(test))
    assert d.test.texts == ["t"] and d.test.labels == [1] and d.report_split is d.test


def test_missing_label_column_lists_columns(tmp_path):
    path = write_csv(tmp_path / "train.csv", [{"text": "a", "sentiment": "pos"}], columns=("text", "sentiment"))
    with pytest.raises(ClassifyDataError, match=r"label column 'label'.*\['sentiment', 'text'\]") as e:
        load_classification_data(str(path))
    assert e.value.path == str(path)


def test_missing_text_field_in_jsonl_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", rows(3) + [{"body": "x", "label": "pos"}])
    with pytest.raises(ClassifyDataError, match=r"train.jsonl: line 4: no text column 'text'.*\['body', 'label'\]"):
        load_classification_data(str(path))


def test_unknown_label_in_test_names_label_and_line(tmp_path):
    write_csv(tmp_path / "train.csv", rows(10))
    test = write_csv(tmp_path / "test.csv", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neutral"}])
    with pytest.raises(ClassifyDataError, match=r"test.csv: line 3: label 'neutral' in the test split is not a "
                                                r"train label") as e:
        load_classification_data(str(tmp_path))
    assert e.value.line == 3 and e.value.path == str(test)


def test_unknown_label_in_parquet_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_csv(tmp_path / "train.csv", rows(10))
    pq.write_table(pa.Table.from_pylist(rows(4) + [{"text": "z", "label": "meh"}]), tmp_path / "validation.parquet")
    with pytest.raises(ClassifyDataError, match=r"validation.parquet: row 5: label 'meh'"):
        load_classification_data(str(tmp_path))


def test_empty_split(tmp_path):
    write_csv(tmp_path / "train.csv", rows(10))
    write_csv(tmp_path / "test.csv", [])
    with pytest.raises(ClassifyDataError, match=r"test.csv: the test split is empty"):
        load_classification_data(str(tmp_path))


def test_single_class(tmp_path):
    path = write_csv(tmp_path / "train.csv", rows(10, labels=("pos",)))
    with pytest.raises(ClassifyDataError, match="single class"):
        load_classification_data(str(path))


@pytest.mark.parametrize("name,content,match", [
    ("train.parquet", b"this is not parquet", "cannot read the file as Parquet"),
    ("train.jsonl", b'{"text": "a", "label": 1}\n{"text": oops\n', "line 2: not valid JSON"),
    ("train.csv.gz", b"not gzip at all", "cannot read the file"),
    ("train.xlsx", b"", "unknown file type"),
])
def test_unreadable_files(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ClassifyDataError, match=match):
        load_classification_data(str(tmp_path / name))


def test_missing_file_and_folder_without_train(tmp_path):
    with pytest.raises(ClassifyDataError, match="no such file"):
        load_classification_data(str(tmp_path / "nope.csv"))
    write_csv(tmp_path / "test.csv", rows(4))
    with pytest.raises(ClassifyDataError, match=r"no train file.*\['test.csv'\]"):
        load_classification_data(str(tmp_path))


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ClassifyDataError, match=r"hf:stanfordnlp/imdb: cannot load Hugging Face dataset "
                                                r"'stanfordnlp/imdb'.*OFFLINE"):
        load_classification_data("hf:stanfordnlp/imdb")
    with pytest.raises(ClassifyDataError, match="unknown option"):
        load_classification_data("hf:glue#subset=sst2")


def test_hub_dataset_with_class_names_and_hidden_test_labels(monkeypatch):
    """The cluster path, with a local DatasetDict standing in for the hub: GLUE SST-2's layout (ClassLabel
    names, a `sentence` column, test labels all -1)."""
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    fake = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["bad", "good", "fine", "awful"], "label": [0, 1, 1, 0]},
                                            features=features),
        "validation": datasets.Dataset.from_dict({"sentence": ["nice"], "label": [1]}, features=features),
        "test": datasets.Dataset.from_dict({"sentence": ["?", "!"], "label": [-1, -1]}, features=features),
    })
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, **kw: calls.append((name, config)) or fake)
    d = load_classification_data("hf:glue#config=sst2", text_column="sentence")
    assert calls == [("glue", "sst2")]
    assert d.label_names == ["negative", "positive"] and d.train.labels == [0, 1, 1, 0]
    assert d.validation.texts == ["nice"] and d.test is None and d.report_split is d.validation
