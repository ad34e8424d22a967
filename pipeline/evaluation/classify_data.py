"""Labelled text for sequence classification: train / validation / test splits of (text, label) pairs.

A source is one of:
- a file: CSV (`.csv`, `.tsv`), JSON Lines (`.jsonl`, `.ndjson`; `.json` holding an array of objects or one
  object per line) or Parquet, optionally gzip-compressed (`.csv.gz`, `.jsonl.gz`);
- a folder holding `train.*`, optionally `validation.*` (or `valid.*`, `dev.*`) and `test.*` in those formats;
- `hf:NAME[#config=C]`: a Hugging Face dataset by name (IMDb, SST-2 on a cluster with a hub or a cache). Its
  `train`, `validation` and `test` splits are used; a split whose labels are all -1 (GLUE's hidden test labels)
  counts as missing.

Splits: without a validation split, a seeded shuffle of train gives one (`valid_fraction` of it); without a test
split, the report is made on validation (`ClassificationData.notes` says so). Labels may be strings or ints; they
are compared by `str(label)` (so `1` in JSON Lines and `"1"` in CSV are the same label). The label set is taken
from the train source, sorted (numerically when every label is an integer, else as strings); an unknown label in
validation or test is an error, never silently dropped.

Every problem is a `ClassifyDataError` naming the file and, where one applies, the line (text files, 1-based,
the header being line 1 of a CSV) or row (Parquet and hub datasets, 1-based).
"""
from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import random
from dataclasses import dataclass, field

SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}
EXTENSIONS = (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet")
MISSING_LABEL = -1  # GLUE and others publish test splits with hidden labels set to -1


class ClassifyDataError(ValueError):
    """Labelled data cannot be used; the message names the file and, where it applies, the line or row."""

    def __init__(self, path: str, reason: str, line: int | None = None, row: int | None = None):
        where = f" line {line}" if line is not None else f" row {row}" if row is not None else ""
        super().__init__(f"{path}{':' if where else ''}{where}: {reason}")
        self.path, self.reason, self.line, self.row = path, reason, line, row


@dataclass
class Split:
    """One split: texts, label ids into `ClassificationData.label_names`, and the source it was read from."""

    name: str
    texts: list[str]
    labels: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class ClassificationData:
    train: Split
    validation: Split
    test: Split | None
    label_names: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def report_split(self) -> Split:
        """The split the final report is made on: test, or validation when there is no test split."""
        return self.test if self.test is not None else self.validation

    def summary(self) -> dict:
        return {"labels": self.label_names,
                "sizes": {s.name: len(s) for s in (self.train, self.validation, self.test) if s is not None},
                "sources": {s.name: s.source for s in (self.train, self.validation, self.test) if s is not None},
                "notes": self.notes}


# -------------------------------------------------------------------------------------------------- raw records
# A raw record is (text, label, location) with location a dict usable as ClassifyDataError keyword arguments.


def _label_key(value, path: str, where: dict) -> str:
    if value is None or (isinstance(value, float) and value != value):
        raise ClassifyDataError(path, "the label is empty", **where)
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():  # Parquet/pandas turn int columns with gaps into floats
        return str(int(value))
    if isinstance(value, (int, float, str)):
        text = str(value).strip()
        if not text:
            raise ClassifyDataError(path, "the label is empty", **where)
        return text
    raise ClassifyDataError(path, f"the label {value!r} is not a string or a number", **where)


def _text_value(value, path: str, where: dict) -> str:
    if value is None or (isinstance(value, float) and value != value):
        raise ClassifyDataError(path, "the text is empty (null)", **where)
    if not isinstance(value, str):
        raise ClassifyDataError(path, f"the text {value!r} is not a string", **where)
    return value


def _check_columns(path: str, columns, text_column: str, label_column: str, where: dict | None = None) -> None:
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        what = " and ".join(f"{'text' if c == text_column else 'label'} column {c!r}" for c in missing)
        raise ClassifyDataError(path, f"no {what}; columns present: {sorted(columns)} "
                                      f"(choose with --text-column / --label-column)", **(where or {}))


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _base_ext(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(name)[1].lower()


def _read_csv(path: str, text_column: str, label_column: str, delimiter: str):
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            return
        _check_columns(path, reader.fieldnames, text_column, label_column)
        for rec in reader:
            where = {"line": reader.line_num}
            if all(v in (None, "") for v in rec.values()):
                continue  # a blank line
            yield (_text_value(rec.get(text_column), path, where), _label_key(rec.get(label_column), path, where),
                   where)


def _read_jsonl(path: str, text_column: str, label_column: str):
    with _open_text(path) as f:
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
        if first == "[":  # a .json file holding one array of objects
            try:
                records = json.loads(first + f.read())
            except json.JSONDecodeError as e:
                raise ClassifyDataError(path, f"not valid JSON ({e.msg})", line=e.lineno) from None
            for i, rec in enumerate(records, 1):
                yield _record(path, rec, text_column, label_column, {"row": i})
            return
        f.seek(0)
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ClassifyDataError(path, f"not valid JSON ({e.msg})", line=lineno) from None
            yield _record(path, rec, text_column, label_column, {"line": lineno})


def _record(path, rec, text_column, label_column, where):
    if not isinstance(rec, dict):
        raise ClassifyDataError(path, f"expected a JSON object, found {type(rec).__name__}", **where)
    _check_columns(path, rec.keys(), text_column, label_column, where)
    return (_text_value(rec[text_column], path, where), _label_key(rec[label_column], path, where), where)


def _read_parquet(path: str, text_column: str, label_column: str):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    _check_columns(path, pf.schema_arrow.names, text_column, label_column)
    row = 0
    for batch in pf.iter_batches(columns=[text_column, label_column], batch_size=8192):
        for text, label in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            row += 1
            where = {"row": row}
            yield _text_value(text, path, where), _label_key(label, path, where), where


def read_file(path: str, text_column: str = "text", label_column: str = "label") -> list[tuple[str, str, dict]]:
    """(text, label key, location) for every record of one local file."""
    if not os.path.isfile(path):
        raise ClassifyDataError(path, "no such file")
    ext = _base_ext(path)
    try:
        if ext in (".csv", ".tsv"):
            return list(_read_csv(path, text_column, label_column, "\t" if ext == ".tsv" else ","))
        if ext in (".jsonl", ".ndjson", ".json"):
            return list(_read_jsonl(path, text_column, label_column))
        if ext == ".parquet":
            return list(_read_parquet(path, text_column, label_column))
    except ClassifyDataError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, EOFError) as e:
        raise ClassifyDataError(path, f"cannot read the file ({type(e).__name__}: {e})") from None
    except Exception as e:  # pyarrow's errors (ArrowInvalid, ...) for a corrupt or non-Parquet file
        if type(e).__module__.startswith("pyarrow"):
            raise ClassifyDataError(path, f"cannot read the file as Parquet ({e})") from None
        raise
    raise ClassifyDataError(path, f"unknown file type {ext or '(no extension)'!r}; expected one of "
                                  f"{', '.join(EXTENSIONS)} (optionally .gz, except Parquet)")


def _find_split_files(folder: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for split, stems in SPLIT_NAMES.items():
        matches = []
        for stem in stems:
            for ext in EXTENSIONS:
                matches += glob.glob(os.path.join(glob.escape(folder), f"{stem}{ext}"))
                if ext != ".parquet":
                    matches += glob.glob(os.path.join(glob.escape(folder), f"{stem}{ext}.gz"))
        if len(matches) > 1:
            raise ClassifyDataError(folder, f"several files for the {split} split: "
                                            f"{sorted(os.path.basename(m) for m in matches)}; keep one")
        if matches:
            found[split] = matches[0]
    if "train" not in found:
        present = sorted(os.listdir(folder))
        raise ClassifyDataError(folder, f"no train file (train.csv, train.jsonl, train.parquet, ...); "
                                        f"files present: {present}")
    return found


def _parse_hf_spec(spec: str) -> tuple[str, dict]:
    name, _, opts = spec[len("hf:"):].partition("#")
    options = {}
    for item in filter(None, opts.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in ("config", "revision"):
            raise ClassifyDataError(spec, f"unknown option {item!r} (hf:NAME#config=C[,revision=R])")
        options[key] = value
    if not name:
        raise ClassifyDataError(spec, "no dataset name after hf:")
    return name, options


def _read_hub(spec: str, text_column: str, label_column: str) -> tuple[dict, list[str] | None]:
    """Raw records of a hub dataset's splits, and the ClassLabel names if the label column has them."""
    name, options = _parse_hf_spec(spec)
    try:
        import datasets

        ds = datasets.load_dataset(name, options.get("config"), revision=options.get("revision"))
    except Exception as e:  # offline, unknown name, no cache: one clear line instead of a hub traceback
        offline = any(os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = (" (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: only cached datasets load)" if offline else
                " (no network or no such dataset? download it where there is a network, or pass local files)")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ClassifyDataError(spec, f"cannot load Hugging Face dataset {name!r}: {type(e).__name__}: "
                                      f"{first[:300]}{hint}") from None
    class_names = None
    splits = {}
    for split in ("train", "validation", "test"):
        if split not in ds:
            continue
        d = ds[split]
        where0 = f"{spec}[{split}]"
        _check_columns(where0, d.column_names, text_column, label_column)
        feature = d.features.get(label_column)
        if getattr(feature, "names", None):
            class_names = list(feature.names)
        records = []
        for i, (text, label) in enumerate(zip(d[text_column], d[label_column]), 1):
            where = {"row": i}
            records.append((_text_value(text, where0, where), label, where))
        if records and all(r[1] == MISSING_LABEL for r in records):
            continue  # hidden labels: not usable for evaluation
        splits[split] = [(t, _named_label(lbl, class_names, where0, w), w) for t, lbl, w in records]
    return splits, class_names


def _named_label(label, class_names, path, where) -> str:
    if class_names is not None and isinstance(label, int) and 0 <= label < len(class_names):
        return class_names[label]
    return _label_key(label, path, where)


def _sort_labels(keys) -> list[str]:
    keys = set(keys)
    try:
        return sorted(keys, key=int)
    except ValueError:
        return sorted(keys)


def _to_split(name: str, records, source: str, label2id: dict[str, int]) -> Split:
    labels = []
    for _, key, where in records:
        if key not in label2id:
            raise ClassifyDataError(source, f"label {key!r} in the {name} split is not a train label "
                                            f"(train labels: {list(label2id)})", **where)
        labels.append(label2id[key])
    return Split(name, [r[0] for r in records], labels, source)


def load_classification_data(data: str, text_column: str = "text", label_column: str = "label",
                             test: str | None = None, valid_fraction: float = 0.1,
                             seed: int = 0) -> ClassificationData:
    """Read `data` (a file, a folder of split files or `hf:NAME`) and optionally a separate `test` source
    into train / validation / test splits with integer labels. See the module docstring for the rules."""
    if not 0.0 < valid_fraction < 1.0:
        raise ClassifyDataError(data, f"valid_fraction must be in (0, 1), got {valid_fraction}")
    notes: list[str] = []
    raw: dict[str, list] = {}
    sources: dict[str, str] = {}
    class_names = None
    if data.startswith("hf:"):
        raw, class_names = _read_hub(data, text_column, label_column)
        if "train" not in raw:
            raise ClassifyDataError(data, "the dataset has no labelled train split")
        sources = {k: f"{data}[{k}]" for k in raw}
    elif os.path.isdir(data):
        for split, path in _find_split_files(data).items():
            raw[split], sources[split] = read_file(path, text_column, label_column), path
    else:
        raw["train"], sources["train"] = read_file(data, text_column, label_column), data
    if test is not None:
        if "test" in raw:
            notes.append(f"test split from {test} (given with --test) instead of {sources['test']}")
        if test.startswith("hf:"):
            hub, _ = _read_hub(test, text_column, label_column)
            if "test" not in hub:
                raise ClassifyDataError(test, "the dataset has no labelled test split")
            raw["test"], sources["test"] = hub["test"], f"{test}[test]"
        else:
            raw["test"], sources["test"] = read_file(test, text_column, label_column), test

    for split, records in raw.items():
        if not records:
            raise ClassifyDataError(sources[split], f"the {split} split is empty (no records)")
    train_keys = {r[1] for r in raw["train"]}
    label_names = _sort_labels(train_keys)
    if class_names is not None:  # a hub ClassLabel: keep its order (label id i = names[i]) for present names
        label_names = [n for n in class_names if n in train_keys] + _sort_labels(train_keys - set(class_names))
    if len(label_names) < 2:
        raise ClassifyDataError(sources["train"], f"the train split has a single class {label_names!r}: "
                                                  "nothing to classify")
    label2id = {name: i for i, name in enumerate(label_names)}

    train = _to_split("train", raw["train"], sources["train"], label2id)
    if "validation" in raw:
        validation = _to_split("validation", raw["validation"], sources["validation"], label2id)
    else:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_valid = max(1, round(valid_fraction * len(order)))
        if n_valid >= len(order):
            raise ClassifyDataError(sources["train"], f"the train split has {len(order)} records: too few to hold "
                                                      f"out a validation split of {valid_fraction:.0%}")
        held, kept = sorted(order[:n_valid]), sorted(order[n_valid:])
        validation = Split("validation", [train.texts[i] for i in held], [train.labels[i] for i in held],
                           f"{sources['train']} (seeded {valid_fraction:g} split, seed {seed})")
        train = Split("train", [train.texts[i] for i in kept], [train.labels[i] for i in kept],
                      f"{sources['train']} (rest of the split)")
        notes.append(f"no validation split: held out {n_valid} of {len(order)} train records "
                     f"(valid_fraction {valid_fraction:g}, seed {seed})")
    test_split = _to_split("test", raw["test"], sources["test"], label2id) if "test" in raw else None
    if test_split is None:
        notes.append("no test split: the final report is on the validation split")
    return ClassificationData(train, validation, test_split, label_names, notes)
