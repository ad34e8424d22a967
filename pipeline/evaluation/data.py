"""Labelled data for fine-tuning, read with `datasets.load_dataset`, checked, and turned into splits with a
`labels` column.

A source is one of:
- `hf:NAME[#config=C][,revision=R]`: a Hugging Face hub dataset (`hf:nyu-mll/glue#config=mnli`,
  `hf:stanfordnlp/imdb`, `hf:rajpurkar/squad`), from the hub or the local datasets cache;
- a file: CSV (`.csv`), TSV (`.tsv`, read without quote handling as GLUE's files need), JSON / JSON Lines
  (`.json`, `.jsonl`; SQuAD's own nested `{"data": [...]}` file too) or Parquet, optionally `.gz`;
- a folder of such files named after their split: `train.*`, `validation.*` (or `valid.*`, `dev.*`),
  `test.*`, and any other split by its name (`validation_matched.tsv`, `validation_mismatched.tsv`).

Rules: train is required; without any validation split, a seeded `valid_fraction` of train becomes one; a split
whose labels are all -1 (GLUE's hidden test labels) is left out, with a note. Classification labels may be
strings or integers; the label set comes from train (a hub ClassLabel's names and order when there is one),
and a validation or test label that train does not have is an error. Regression labels are numbers.

Every problem is a `DataError` naming the file (or hub split), the column and, where it applies, the row
(1-based, in the order of the file's records).

Our own code beyond `load_dataset`: resolving a folder into split files, reading SQuAD's nested JSON, and the
checks, which `datasets` does not make (a missing column is a KeyError deep inside a map there).
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field

SPLIT_ALIASES = {"valid": "validation", "dev": "validation"}
EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json",
              ".parquet": "parquet"}
HIDDEN_LABEL = -1  # GLUE publishes test splits with labels set to -1
TASK_KINDS = ("classification", "regression")


class DataError(ValueError):
    """Labelled data cannot be used; the message names the source, the column and the row where they apply."""

    def __init__(self, source: str, reason: str, column: str | None = None, row: int | None = None):
        where = "".join([f" column {column!r}" if column else "", f" row {row}" if row is not None else ""])
        super().__init__(f"{source}:{where}{':' if where else ''} {reason}")
        self.source, self.reason, self.column, self.row = source, reason, column, row


# ------------------------------------------------------------------------------------------------- sources


def parse_hub_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`hf:NAME#config=C,revision=R` -> (NAME, {"config": C, "revision": R})."""
    name, _, opts = spec[len("hf:"):].partition("#")
    options = {}
    for item in filter(None, opts.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in ("config", "revision") or not value:
            raise DataError(spec, f"unknown option {item!r} (write hf:NAME#config=C[,revision=R])")
        options[key] = value
    if not name:
        raise DataError(spec, "no dataset name after hf:")
    return name, options


def _ext(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(name)[1].lower()


def split_files(folder: str) -> dict[str, str]:
    """{split name: file} of a folder; `valid` and `dev` are names of `validation`."""
    found: dict[str, list[str]] = {}
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if not os.path.isfile(path) or _ext(entry) not in EXTENSIONS:
            continue
        stem = entry[:-3] if entry.endswith(".gz") else entry
        stem = os.path.splitext(stem)[0]
        found.setdefault(SPLIT_ALIASES.get(stem, stem), []).append(path)
    for split, paths in found.items():
        if len(paths) > 1:
            raise DataError(folder, f"several files for the {split} split: "
                                    f"{[os.path.basename(p) for p in paths]}; keep one")
    if "train" not in found:
        raise DataError(folder, "no train file (train.csv, train.tsv, train.jsonl, train.parquet, ...); "
                                f"files present: {sorted(os.listdir(folder))}")
    return {split: paths[0] for split, paths in found.items()}


def _squad_nested(path: str):
    """Rows of a SQuAD-format file (`{"data": [{"title", "paragraphs": [{"context", "qas"}]}]}`), one per
    question, or None when the file is not in that format."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        head = f.read(1)
        while head.isspace():
            head = f.read(1)
        if head != "{":
            return None
        try:
            doc = json.loads(head + f.read())
        except json.JSONDecodeError:
            return None  # JSON Lines: the datasets reader takes it
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        return None
    rows = []
    for article in doc["data"]:
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                answers = qa.get("answers", [])
                rows.append({"id": str(qa["id"]), "title": article.get("title", ""), "context": para["context"],
                             "question": qa["question"],
                             "answers": {"text": [a["text"] for a in answers],
                                         "answer_start": [int(a["answer_start"]) for a in answers]}})
    return rows


def load_file(path: str):
    """One local file as a `datasets.Dataset`."""
    import datasets

    if not os.path.isfile(path):
        raise DataError(path, "no such file")
    ext = _ext(path)
    if ext not in EXTENSIONS:
        raise DataError(path, f"unknown file type {ext or '(no extension)'!r}; expected one of "
                              f"{', '.join(EXTENSIONS)} (optionally .gz)")
    if os.path.getsize(path) == 0:
        raise DataError(path, "the file is empty")
    try:
        if ext == ".json":
            rows = _squad_nested(path)
            if rows is not None:
                return datasets.Dataset.from_list(rows)
        kwargs = {"delimiter": "\t", "quoting": 3} if ext == ".tsv" else {}  # 3: csv.QUOTE_NONE
        return datasets.load_dataset(EXTENSIONS[ext], data_files={"train": path}, split="train", **kwargs)
    except DataError:
        raise
    except Exception as e:  # parse errors of pandas / pyarrow / json, wrapped by datasets
        if "corresponds to no data" in str(e):  # a header and no record
            raise DataError(path, "the split is empty (no records)") from None
        cause = e.__cause__ or e.__context__ or e
        raise DataError(path, f"cannot read the file as {EXTENSIONS[ext].upper()} ({type(cause).__name__}: "
                              f"{_first_line(cause)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def load_hub(spec: str) -> dict:
    """{split: Dataset} of a hub dataset."""
    name, options = parse_hub_spec(spec)
    try:
        import datasets

        dd = datasets.load_dataset(name, options.get("config"), revision=options.get("revision"))
    except Exception as e:  # offline, unknown name, no cache: one clear line instead of a hub traceback
        offline = any(os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = (" (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: only cached datasets load)" if offline else
                " (no network or no such dataset? download it where there is a network, or pass local files)")
        raise DataError(spec, f"cannot load Hugging Face dataset {name!r}: {type(e).__name__}: "
                              f"{_first_line(e)}{hint}") from None
    return dict(dd.items())


def load_raw(data: str, test: str | None = None) -> tuple[dict, dict[str, str]]:
    """({split: Dataset}, {split: where it came from}) of a source, with `test` replacing its test split."""
    if data.startswith("hf:"):
        raw = load_hub(data)
        origins = {s: f"{data}[{s}]" for s in raw}
    elif os.path.isdir(data):
        files = split_files(data)
        raw = {s: load_file(p) for s, p in files.items()}
        origins = dict(files)
    else:
        raw, origins = {"train": load_file(data)}, {"train": data}
    if "train" not in raw:
        raise DataError(data, f"no train split (splits: {sorted(raw)})")
    if test is not None:
        if test.startswith("hf:"):
            hub = load_hub(test)
            if "test" not in hub:
                raise DataError(test, f"no test split (splits: {sorted(hub)})")
            raw["test"], origins["test"] = hub["test"], f"{test}[test]"
        else:
            raw["test"], origins["test"] = load_file(test), test
    return raw, origins


# -------------------------------------------------------------------------------------------- checked splits


@dataclass
class TaskData:
    """Checked splits with their model inputs' text columns and an int (classification) or float (regression)
    `labels` column. `eval_splits` are the splits scored after training, the first one choosing the best epoch."""

    splits: dict  # name -> datasets.Dataset
    kind: str  # "classification" or "regression"
    text_columns: tuple[str, ...]  # one (single texts) or two (text pairs)
    label_names: list[str] | None  # classification: names of label ids 0..n-1
    origins: dict[str, str]
    notes: list[str] = field(default_factory=list)

    @property
    def eval_splits(self) -> list[str]:
        names = [s for s in self.splits if s != "train"]
        return sorted(names, key=lambda s: (not s.startswith("validation"), s != "validation", s))

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.label_names)

    def summary(self) -> dict:
        return {"kind": self.kind, "text_columns": list(self.text_columns), "labels": self.label_names,
                "sizes": {s: len(d) for s, d in self.splits.items()}, "sources": self.origins, "notes": self.notes}


def check_columns(ds, origin: str, columns: dict[str, str]) -> None:
    """`columns` maps column name -> the option that chose it; a missing one is a DataError saying so."""
    for column, option in columns.items():
        if column not in ds.column_names:
            hint = (" (a single-text dataset? drop --text-pair-column)" if option == "--text-pair-column" else
                    f" (choose another with {option})")
            raise DataError(origin, f"no such column; columns present: {ds.column_names}{hint}", column=column)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _label_key(v) -> str:
    if isinstance(v, float) and v.is_integer():  # pandas reads an int column with gaps as floats
        v = int(v)
    return str(v).strip()


def _sort_keys(keys) -> list[str]:
    try:
        return sorted(keys, key=int)
    except ValueError:
        return sorted(keys)


def _check_texts(ds, origin: str, text_columns) -> None:
    for column in text_columns:
        for i, v in enumerate(ds[column], 1):
            if not isinstance(v, str):
                what = "empty (null)" if v is None else f"{v!r}, not a string"
                raise DataError(origin, f"the text is {what}", column=column, row=i)


def _infer_kind(values) -> str:
    if all(_is_number(v) for v in values) and any(isinstance(v, float) and not v.is_integer() for v in values):
        return "regression"
    return "classification"


def prepare(raw: dict, origins: dict[str, str], text_column: str, label_column: str,
            text_pair_column: str | None = None, kind: str = "auto", valid_fraction: float = 0.1,
            seed: int = 0) -> TaskData:
    """Check the splits and give them a `labels` column (see the module docstring for the rules)."""
    import datasets

    text_columns = (text_column,) + ((text_pair_column,) if text_pair_column else ())
    options = {text_column: "--text-column", label_column: "--label-column"}
    if text_pair_column:
        options[text_pair_column] = "--text-pair-column"
    notes: list[str] = []
    splits: dict = {}
    for name, ds in raw.items():
        origin = origins[name]
        check_columns(ds, origin, options)
        if len(ds) == 0:
            raise DataError(origin, "the split is empty (no records)")
        labels = ds[label_column]
        if name != "train" and all(v == HIDDEN_LABEL for v in labels):
            notes.append(f"{name} split left out: its labels are hidden (all {HIDDEN_LABEL})")
            continue
        for i, v in enumerate(labels, 1):
            if v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip()):
                raise DataError(origin, "the label is empty", column=label_column, row=i)
        _check_texts(ds, origin, text_columns)
        splits[name] = ds

    train_labels = splits["train"][label_column]
    if kind == "auto":
        kind = _infer_kind(train_labels)
    if kind not in TASK_KINDS:
        raise DataError(origins["train"], f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")

    label_names = None
    if kind == "regression":
        for name, ds in splits.items():
            for i, v in enumerate(ds[label_column], 1):
                if not _is_number(v):
                    raise DataError(origins[name], f"the label {v!r} is not a number: a regression task needs "
                                                   "numeric labels (or use --task classification)",
                                    column=label_column, row=i)
        convert = float
    else:
        for i, v in enumerate(train_labels, 1):
            if isinstance(v, float) and not v.is_integer():
                raise DataError(origins["train"], f"the label {v!r} is a fractional number: scores need a "
                                                  "regression task (--task regression)", column=label_column, row=i)
        feature = splits["train"].features.get(label_column)
        keys = {_label_key(v) for v in train_labels}
        if len(keys) < 2:
            raise DataError(origins["train"], f"the train split has a single label {sorted(keys)}: nothing to "
                                              "classify", column=label_column)
        if getattr(feature, "names", None):  # a ClassLabel: ids and names fixed by the dataset
            label_names = list(feature.names)
            label2id = {str(i): i for i in range(len(label_names))}
        else:
            label_names = _sort_keys(keys)
            label2id = {k: i for i, k in enumerate(label_names)}
        for name, ds in splits.items():
            for i, v in enumerate(ds[label_column], 1):
                if _label_key(v) not in label2id:
                    raise DataError(origins[name], f"the label {v!r} is not one of the train labels "
                                                   f"{label_names}", column=label_column, row=i)
        convert = (lambda v: label2id[_label_key(v)])  # noqa: E731

    drop = [c for c in ("labels",) if c != label_column]
    for name, ds in list(splits.items()):
        ds = ds.remove_columns([c for c in drop if c in ds.column_names])
        values = [convert(v) for v in ds[label_column]]
        ds = ds.remove_columns([label_column]).add_column(
            "labels", values, feature=datasets.Value("float32" if kind == "regression" else "int64"))
        splits[name] = ds

    if not any(s != "train" and s.startswith("validation") for s in splits):
        if not 0.0 < valid_fraction < 1.0:
            raise DataError(origins["train"], f"valid_fraction must be in (0, 1), got {valid_fraction}")
        n = len(splits["train"])
        n_valid = max(1, round(valid_fraction * n))
        if n_valid >= n:
            raise DataError(origins["train"], f"the train split has {n} records: too few to hold out a "
                                              f"validation split of {valid_fraction:.0%}")
        held = splits["train"].train_test_split(test_size=n_valid, seed=seed, shuffle=True)
        splits["train"], splits["validation"] = held["train"], held["test"]
        origins = {**origins, "validation": f"{origins['train']} (seeded {valid_fraction:g} of it, seed {seed})"}
        notes.append(f"no validation split: held out {n_valid} of {n} train records "
                     f"(valid_fraction {valid_fraction:g}, seed {seed})")
    return TaskData(splits, kind, text_columns, label_names, origins, notes)


def load_task_data(data: str, text_column: str = "text", label_column: str = "label",
                   text_pair_column: str | None = None, kind: str = "auto", test: str | None = None,
                   valid_fraction: float = 0.1, seed: int = 0) -> TaskData:
    """Read `data` (a file, a folder of split files or hf:NAME) and an optional separate `test` source into
    checked splits. See the module docstring."""
    raw, origins = load_raw(data, test)
    return prepare(raw, origins, text_column, label_column, text_pair_column, kind, valid_fraction, seed)
