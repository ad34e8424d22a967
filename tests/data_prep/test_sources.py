"""Every input kind, alone and mixed into one dataset, with the exact documents expected in the exact order;
the byte-range readers against one sequential read; unit planning; offline failures of hub names.

Content checks compare the stored token ids with the tokenizer's ids of the expected texts (whitespace,
including newlines inside a document, does not change WordPiece ids). `valid_fraction=0` keeps every
document in the training split, in input order.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import random
import re

import pytest

from pipeline.data.prepared import PreparedDataset
from pipeline.data_prep import readers
from pipeline.data_prep.prepare import PrepareConfig, make_plan, prepare
from pipeline.data_prep.readers import PieceStats, read_jsonl_range, read_text_range
from pipeline.data_prep.sources import PlanError, Source, auto_unit_bytes, group_units, parse_spec, plan_pieces
from pipeline.tokenization import load_tokenizer

MiB = 1 << 20


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(wordpiece_dir):
    return load_tokenizer(wordpiece_dir)


@pytest.fixture(scope="module")
def paragraphs(sample_texts) -> list[str]:
    """Real multi-line English paragraphs (no blank line inside), from the embedded sample."""
    out = []
    for t in sample_texts:
        for p in re.split(r"\n\s*\n", t):
            p = p.strip()
            if p and len(p) > 40:
                out.append(p)
    assert len(out) > 200
    return out


@pytest.fixture(scope="module")
def sentences(paragraphs) -> list[str]:
    """Single-line documents (for lines mode, JSON and tables)."""
    return [" ".join(p.split()) for p in paragraphs]


def train_docs(out) -> list[list[int]]:
    ds = PreparedDataset(str(out), "train", verify="full")
    assert len(PreparedDataset(str(out), "valid")) == 0
    return [ds[i].tolist() for i in range(len(ds))]


def run_prepare(out, inputs, tokenizer, **kw):
    cfg = PrepareConfig(inputs=[str(i) for i in inputs], output=str(out), tokenizer=tokenizer,
                        valid_fraction=0.0, progress=False, **kw)
    manifest = prepare(cfg)
    return manifest, train_docs(out)


def assert_docs(tok, docs: list[list[int]], texts: list[str]) -> None:
    expected = tok.encode_batch(texts)
    assert all(expected), "a test text tokenizes to nothing"
    if docs != expected:  # readable diff first
        assert [tok.decode(d) for d in docs] == [tok.decode(e) for e in expected]
    assert docs == expected


def plan_of(out) -> dict:
    with open(os.path.join(out, "plan.json")) as f:
        return json.load(f)


def write_paragraphs(path, docs, newline="\n", trailing=True, seed=0) -> None:
    """Documents separated by one or more blank lines, some of them whitespace-only."""
    rng = random.Random(seed)
    seps = ["\n\n", "\n\n\n", "\n   \n", "\n\t\n\n", "\n \n  \n"]
    text = ""
    for i, d in enumerate(docs):
        text += d
        if i < len(docs) - 1:
            text += rng.choice(seps)
    if trailing:
        text += "\n"
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))


def write_lines(path, docs) -> None:
    path.write_text("".join(d + "\n" for d in docs), encoding="utf-8")


def write_jsonl(path, docs, field="text", opener=open) -> None:
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}) + "\n")


def zst_compress(data: bytes, frames: int = 1) -> bytes:
    import zstandard

    step = -(-len(data) // frames)
    return b"".join(zstandard.ZstdCompressor().compress(data[i:i + step]) for i in range(0, len(data), step))


# ---------------------------------------------------------------------------------------------------------
# plain text
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("newline,trailing", [("\n", True), ("\r\n", True), ("\n", False), ("\r\n", False)])
def test_text_paragraphs(tmp_path, tok, wordpiece_dir, paragraphs, newline, trailing):
    docs = paragraphs[:40]
    path = tmp_path / "p.txt"
    write_paragraphs(path, docs, newline=newline, trailing=trailing)
    # tiny units: the file is cut into many byte ranges, each read independently
    manifest, got = run_prepare(tmp_path / "out", [path], wordpiece_dir, unit_mb=0.004)
    assert len(plan_of(tmp_path / "out")["units"]) > 3
    assert_docs(tok, got, docs)
    st = manifest["stats"]
    assert st["documents"] == len(docs) and st["dropped"] == {} and st["repaired"] == {}


def test_text_paragraphs_leading_blank_lines_and_no_trailing_newline(tmp_path, tok, wordpiece_dir):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\n\n  \nFirst doc\nstill first.\n\n\n\nSecond doc.\n \nThird doc, no newline at the end")
    _, got = run_prepare(tmp_path / "out", [path], wordpiece_dir)
    assert_docs(tok, got, ["First doc still first.", "Second doc.", "Third doc, no newline at the end"])


@pytest.mark.parametrize("how", ["option", "spec"])
def test_text_lines_mode(tmp_path, tok, wordpiece_dir, sentences, how):
    docs = sentences[:60]
    path = tmp_path / "l.txt"
    # blank lines in lines mode are empty documents: dropped and counted
    text = "".join(d + ("\n\n" if i % 10 == 9 else "\n") for i, d in enumerate(docs))
    path.write_text(text, encoding="utf-8")
    if how == "option":
        manifest, got = run_prepare(tmp_path / "out", [path], wordpiece_dir, text_mode="lines", unit_mb=0.003)
    else:
        manifest, got = run_prepare(tmp_path / "out", [f"{path}#text_mode=lines"], wordpiece_dir, unit_mb=0.003)
    assert len(plan_of(tmp_path / "out")["units"]) > 2
    assert_docs(tok, got, docs)
    assert manifest["stats"]["dropped"] == {"empty": 6}


def test_text_mode_per_input_overrides_default(tmp_path, tok, wordpiece_dir, paragraphs, sentences):
    lines, paras = sentences[:5], paragraphs[10:14]
    write_lines(tmp_path / "l.txt", lines)
    write_paragraphs(tmp_path / "p.txt", paras)
    _, got = run_prepare(tmp_path / "out", [tmp_path / "l.txt", f"{tmp_path / 'p.txt'}#text_mode=paragraphs"],
                         wordpiece_dir, text_mode="lines")
    assert_docs(tok, got, lines + paras)


# ---------------------------------------------------------------------------------------------------------
# directories and globs
# ---------------------------------------------------------------------------------------------------------

def test_directory_recursive_sorted_hidden_and_unknown_skipped(tmp_path, tok, wordpiece_dir, caplog):
    tree = tmp_path / "tree"
    (tree / "a" / "deep").mkdir(parents=True)
    (tree / ".git").mkdir()
    write_paragraphs(tree / "b.txt", ["Bee one.", "Bee two."])
    write_paragraphs(tree / "A.txt", ["Capital A document."])
    write_jsonl(tree / "a" / "z.jsonl", ["Zed record one.", "Zed record two."])
    with gzip.open(tree / "a" / "deep" / "c.txt.gz", "wt") as f:
        f.write("Deep compressed doc.\n\nDeep second.\n")
    (tree / ".hidden.txt").write_text("hidden file, must not be read\n")
    (tree / ".git" / "config.txt").write_text("inside a hidden folder, must not be read\n")
    (tree / "README.md").write_text("unknown extension, must not be read\n")
    (tree / "notes").write_text("no extension, must not be read\n")
    caplog.set_level(logging.WARNING, logger="pipeline.data_prep")
    _, got = run_prepare(tmp_path / "out", [tree], wordpiece_dir)
    # sorted by path: A.txt < a/deep/c.txt.gz < a/z.jsonl < b.txt
    assert_docs(tok, got, ["Capital A document.", "Deep compressed doc.", "Deep second.", "Zed record one.",
                           "Zed record two.", "Bee one.", "Bee two."])
    files = list(plan_of(tmp_path / "out")["files"])
    assert [os.path.relpath(p, tree) for p in files] == ["A.txt", "a/deep/c.txt.gz", "a/z.jsonl", "b.txt"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(tree) in w and "skipped 2 file(s) with unknown extensions" in w and "README.md" in w
               for w in warnings), warnings


def test_globs(tmp_path, tok, wordpiece_dir):
    g = tmp_path / "g"
    (g / "sub").mkdir(parents=True)
    write_paragraphs(g / "b.txt", ["Glob bee."])
    write_paragraphs(g / "a.txt", ["Glob ay."])
    write_paragraphs(g / "sub" / "c.txt", ["Glob sub cee."])
    write_jsonl(g / "x.jsonl", ["not matched by the glob"])
    _, got = run_prepare(tmp_path / "o1", [f"{g}/*.txt"], wordpiece_dir)
    assert_docs(tok, got, ["Glob ay.", "Glob bee."])
    _, got = run_prepare(tmp_path / "o2", [f"{g}/**/*.txt"], wordpiece_dir)
    assert_docs(tok, got, ["Glob ay.", "Glob bee.", "Glob sub cee."])


# ---------------------------------------------------------------------------------------------------------
# compressed text and JSON Lines
# ---------------------------------------------------------------------------------------------------------

def test_compressed_text_and_jsonl(tmp_path, tok, wordpiece_dir, paragraphs, sentences):
    a, b, c, d, e = paragraphs[:5], sentences[5:10], paragraphs[10:15], sentences[15:20], paragraphs[20:25]
    write_paragraphs(tmp_path / "tmp.txt", a)
    with gzip.open(tmp_path / "a.txt.gz", "wb") as f:
        f.write((tmp_path / "tmp.txt").read_bytes())
    write_jsonl(tmp_path / "b.jsonl.gz", b, opener=gzip.open)
    write_paragraphs(tmp_path / "tmp.txt", c)
    # several zstd frames back to back (what pzstd and concatenated archives produce)
    (tmp_path / "c.txt.zst").write_bytes(zst_compress((tmp_path / "tmp.txt").read_bytes(), frames=3))
    write_jsonl(tmp_path / "tmp.jsonl", d)
    (tmp_path / "d.jsonl.zst").write_bytes(zst_compress((tmp_path / "tmp.jsonl").read_bytes()))
    write_paragraphs(tmp_path / "tmp.txt", e, newline="\r\n")
    (tmp_path / "e.txt.zstd").write_bytes(zst_compress((tmp_path / "tmp.txt").read_bytes()))
    inputs = [tmp_path / n for n in ("a.txt.gz", "b.jsonl.gz", "c.txt.zst", "d.jsonl.zst", "e.txt.zstd")]
    _, got = run_prepare(tmp_path / "out", inputs, wordpiece_dir, unit_mb=0.001)
    assert_docs(tok, got, a + b + c + d + e)
    pieces = [p for u in plan_of(tmp_path / "out")["units"] for p in u["pieces"]]
    # a compressed stream cannot be seeked into: each file is one piece, read from the start
    assert [(os.path.basename(p["path"]), p["compression"], p["start"], p["end"]) for p in pieces] == [
        ("a.txt.gz", "gz", 0, None), ("b.jsonl.gz", "gz", 0, None), ("c.txt.zst", "zst", 0, None),
        ("d.jsonl.zst", "zst", 0, None), ("e.txt.zstd", "zst", 0, None)]


# ---------------------------------------------------------------------------------------------------------
# JSON Lines and JSON arrays
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["option", "spec"])
def test_jsonl_custom_field(tmp_path, tok, wordpiece_dir, sentences, monkeypatch, how):
    monkeypatch.setattr(readers, "CHUNK", 64)  # lines longer than a read chunk
    docs = sentences[:50]
    with open(tmp_path / "d.jsonl", "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"content": d, "text": f"decoy {i}", "meta": {"n": i}}) + "\n")
    if how == "option":
        manifest, got = run_prepare(tmp_path / "out", [tmp_path / "d.jsonl"], wordpiece_dir, text_field="content",
                                    unit_mb=0.002)
    else:
        manifest, got = run_prepare(tmp_path / "out", [f"{tmp_path / 'd.jsonl'}#field=content"], wordpiece_dir,
                                    unit_mb=0.002)
    assert len(plan_of(tmp_path / "out")["units"]) > 2
    assert_docs(tok, got, docs)
    assert manifest["stats"]["bad_records"] == {}


def test_json_array(tmp_path, tok, wordpiece_dir, paragraphs, monkeypatch):
    monkeypatch.setattr(readers, "CHUNK", 100)  # the incremental parser refills its buffer many times
    docs = paragraphs[:30]
    (tmp_path / "a.json").write_text(json.dumps([{"text": d, "n": i} for i, d in enumerate(docs)], indent=2))
    (tmp_path / "b.json").write_text("  \n" + json.dumps([{"text": d} for d in docs[:3]]))  # leading whitespace
    manifest, got = run_prepare(tmp_path / "out", [tmp_path / "a.json", tmp_path / "b.json"], wordpiece_dir)
    assert_docs(tok, got, docs + docs[:3])
    formats = [p["format"] for u in plan_of(tmp_path / "out")["units"] for p in u["pieces"]]
    assert formats == ["json", "json"]
    assert manifest["stats"]["bad_records"] == {}


def test_json_file_that_is_json_lines(tmp_path, tok, wordpiece_dir, sentences):
    docs = sentences[:40]
    write_jsonl(tmp_path / "records.json", docs)
    _, got = run_prepare(tmp_path / "out", [tmp_path / "records.json"], wordpiece_dir, unit_mb=0.002)
    assert_docs(tok, got, docs)
    pieces = [p for u in plan_of(tmp_path / "out")["units"] for p in u["pieces"]]
    assert {p["format"] for p in pieces} == {"jsonl"} and len(pieces) > 2  # sniffed, then split into ranges


# ---------------------------------------------------------------------------------------------------------
# Parquet, save_to_disk folders, hf: local folders
# ---------------------------------------------------------------------------------------------------------

def test_parquet_row_groups_grouped_into_units(tmp_path, tok, wordpiece_dir, sentences):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = sentences[:60]
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": list(range(60)), "text": docs}), path, row_group_size=10)
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 6
    rg_bytes = [meta.row_group(i).total_byte_size for i in range(6)]
    unit_mb = 2.5 * max(rg_bytes) / MiB  # about two row groups per unit
    manifest, got = run_prepare(tmp_path / "out", [path], wordpiece_dir, unit_mb=unit_mb)
    assert_docs(tok, got, docs)
    plan = plan_of(tmp_path / "out")
    pieces = [p for u in plan["units"] for p in u["pieces"]]
    assert 2 <= len(plan["units"]) < 6
    assert [g for p in pieces for g in p["row_groups"]] == list(range(6))  # every row group once, in order
    assert [p["first_row"] for p in pieces] == [10 * p["row_groups"][0] for p in pieces]
    for p in pieces:
        assert p["est_bytes"] <= plan["settings"]["unit_bytes"] or len(p["row_groups"]) == 1
    assert manifest["stats"]["units"] == len(plan["units"])


def _save_dataset(path, texts, **extra):
    import datasets

    datasets.Dataset.from_dict({"text": texts, **extra}).save_to_disk(str(path))


@pytest.mark.parametrize("prefix", ["", "disk:"])
def test_save_to_disk_folder(tmp_path, tok, wordpiece_dir, sentences, prefix):
    docs = sentences[:50]
    _save_dataset(tmp_path / "ds", docs, n=list(range(50)))
    # small units: the rows are read in several pieces
    _, got = run_prepare(tmp_path / "out", [f"{prefix}{tmp_path / 'ds'}"], wordpiece_dir, unit_mb=0.002)
    assert_docs(tok, got, docs)
    plan = plan_of(tmp_path / "out")
    assert plan["sources"][0]["kind"] == "disk"
    pieces = [p for u in plan["units"] for p in u["pieces"]]
    assert len(pieces) > 2
    assert [p["rows"] for p in pieces] == [[a, b] for (a, b) in zip([0] + [p["rows"][1] for p in pieces[:-1]],
                                                                        [p["rows"][1] for p in pieces])]
    assert pieces[-1]["rows"][1] == 50


def test_dataset_dict_split(tmp_path, tok, wordpiece_dir, sentences):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": sentences[:3]}),
                               "validation": datasets.Dataset.from_dict({"text": sentences[3:8]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    _, got = run_prepare(tmp_path / "o1", [f"{tmp_path / 'dd'}#split=validation"], wordpiece_dir)
    assert_docs(tok, got, sentences[3:8])
    _, got = run_prepare(tmp_path / "o2", [f"disk:{tmp_path / 'dd'}"], wordpiece_dir)  # default split: train
    assert_docs(tok, got, sentences[:3])
    with pytest.raises(PlanError, match=r"split 'test' not in \['train', 'validation'\]; choose with #split"):
        plan_pieces([parse_spec(f"{tmp_path / 'dd'}#split=test", 0, "text", "paragraphs")], None)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_hf_local_folder(tmp_path, tok, wordpiece_dir, sentences, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "hfdata"
    folder.mkdir()
    parts = [sentences[:7], sentences[7:12]]
    for name, docs in zip(("part-a", "part-b"), parts):
        if kind == "jsonl":
            write_jsonl(folder / f"{name}.jsonl", docs)
        else:
            pq.write_table(pa.table({"text": docs}), folder / f"{name}.parquet")
    _, got = run_prepare(tmp_path / "out", [f"hf:{folder}"], wordpiece_dir)
    assert_docs(tok, got, parts[0] + parts[1])
    pieces = [p for u in plan_of(tmp_path / "out")["units"] for p in u["pieces"]]
    assert [(p["format"], p["shard"], p["n_shards"]) for p in pieces] == [("hf", 0, 2), ("hf", 1, 2)]


# ---------------------------------------------------------------------------------------------------------
# every kind mixed into one dataset, through the command line
# ---------------------------------------------------------------------------------------------------------

def test_every_input_kind_mixed_in_input_order(tmp_path, tok, wordpiece_dir, paragraphs, sentences, cli):
    """One CLI run with --text-mode lines and --text-field content as defaults, overridden per input."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(1)
    pool = list(range(len(sentences)))
    rng.shuffle(pool)

    def take(n, src=sentences):
        return [src[pool.pop()] for _ in range(n)]

    inputs, expected = [], []

    def add(spec, docs):
        inputs.append(str(spec))
        expected.append(docs)

    d = take(25)
    write_lines(tmp_path / "lines.txt", d)
    add(tmp_path / "lines.txt", d)  # default: --text-mode lines
    d = take(12, paragraphs)
    write_paragraphs(tmp_path / "paras.txt", d, newline="\r\n")
    add(f"{tmp_path / 'paras.txt'}#text_mode=paragraphs", d)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    d1, d2 = take(4), take(3)
    write_lines(tree / "sub" / "x.txt", d2)
    with open(tree / "one.jsonl", "w") as f:
        f.writelines(json.dumps({"content": t}) + "\n" for t in d1)
    (tree / "skip.csv").write_text("a,b\n")
    add(tree, d1 + d2)  # one.jsonl < sub/x.txt
    d1, d2 = take(3), take(3)
    (tmp_path / "g").mkdir()
    write_lines(tmp_path / "g" / "g2.txt", d2)
    write_lines(tmp_path / "g" / "g1.txt", d1)
    add(tmp_path / "g" / "g*.txt", d1 + d2)
    d = take(5)
    with gzip.open(tmp_path / "comp.txt.gz", "wt") as f:
        f.writelines(t + "\n" for t in d)
    add(tmp_path / "comp.txt.gz", d)
    d = take(5)
    (tmp_path / "comp.jsonl.zst").write_bytes(zst_compress("".join(json.dumps({"content": t}) + "\n"
                                                                    for t in d).encode()))
    add(tmp_path / "comp.jsonl.zst", d)
    d = take(6)
    write_jsonl(tmp_path / "custom.jsonl", d, field="body")
    add(f"{tmp_path / 'custom.jsonl'}#field=body", d)
    d = take(4)
    (tmp_path / "array.json").write_text(json.dumps([{"content": t} for t in d], indent=1))
    add(tmp_path / "array.json", d)
    d = take(4)
    write_jsonl(tmp_path / "records.json", d, field="content")
    add(tmp_path / "records.json", d)
    d = take(30)
    pq.write_table(pa.table({"content": d}), tmp_path / "t.parquet", row_group_size=6)
    add(tmp_path / "t.parquet", d)
    d = take(6)
    datasets.Dataset.from_dict({"content": d}).save_to_disk(str(tmp_path / "disk1"))
    add(tmp_path / "disk1", d)
    d = take(6)
    datasets.Dataset.from_dict({"content": d}).save_to_disk(str(tmp_path / "disk2"))
    add(f"disk:{tmp_path / 'disk2'}", d)
    d = take(2)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": take(2)}),
                          "test": datasets.Dataset.from_dict({"content": d})}).save_to_disk(str(tmp_path / "dd"))
    add(f"{tmp_path / 'dd'}#split=test", d)
    d = take(5)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "data.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in d))
    add(f"hf:{tmp_path / 'hf'}", d)

    out = tmp_path / "out"
    proc = cli(*[a for spec in inputs for a in ("--input", spec)], "--output", out,
               "--tokenizer", wordpiece_dir, "--text-mode", "lines", "--text-field", "content",
               "--valid-fraction", "0", "--unit-mb", "0.002", "--no-progress")
    assert "Traceback" not in proc.stderr
    assert re.search(r"tree: skipped 1 file\(s\) with unknown extensions \(e\.g\. .*skip\.csv\)", proc.stderr)
    got = train_docs(out)
    flat = [t for docs in expected for t in docs]
    assert_docs(tok, got, flat)
    with open(out / "manifest.json") as f:
        manifest = json.load(f)
    assert [s["spec"] for s in manifest["sources"]] == inputs
    assert manifest["settings"]["text_mode"] == "lines" and manifest["settings"]["text_field"] == "content"
    assert manifest["stats"]["documents"] == len(flat)
    assert manifest["stats"]["bad_records"] == {} and manifest["stats"]["dropped"] == {}
    assert len(manifest["shards"]["train"]) > 5
    # pieces follow input order
    plan = plan_of(out)
    order = [p["source"] for u in plan["units"] for p in u["pieces"]]
    assert order == sorted(order) and set(order) == set(range(len(inputs)))


# ---------------------------------------------------------------------------------------------------------
# byte-range readers: ranges read independently == one sequential read
# ---------------------------------------------------------------------------------------------------------

_WORDS = ["alpha", "beta", "γάμμα", "日本語", "naïve", "x", "longerwordthanchunk", "é"]


def _random_text(rng: random.Random) -> bytes:
    lines = []
    for _ in range(rng.randint(0, 30)):
        r = rng.random()
        if r < 0.25:
            line = ""
        elif r < 0.4:
            line = rng.choice([" ", "\t", " \t ", "   ", " " * rng.randint(7, 25)])  # whitespace-only, some > CHUNK
        elif r < 0.55:
            line = rng.choice(_WORDS) * rng.randint(2, 8)  # longer than CHUNK
        else:
            line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 5)))
        lines.append(line + ("\r\n" if rng.random() < 0.3 else "\n"))
    text = "".join(lines)
    if text and rng.random() < 0.4:  # no newline at the end
        text = text.rstrip("\r\n") + rng.choice(["", "tail", "  "])
    return text.encode("utf-8")


def _cuts(rng: random.Random, size: int) -> list[int]:
    if size < 2:
        return []
    r = rng.random()
    if r < 0.1:
        return list(range(1, size))  # every byte starts a range
    return sorted(rng.sample(range(1, size), rng.randint(1, min(8, size - 1))))


def _n_lines(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _read_ranges(data: bytes, cuts: list[int], read):
    """(items with absolute line numbers, total lines) over the ranges [0,c1), [c1,c2), ..., [ck, EOF)."""
    bounds = [0] + cuts
    items, offset = [], 0
    for i, start in enumerate(bounds):
        end = bounds[i + 1] if i + 1 < len(bounds) else None
        stats = PieceStats()
        for item in read(io.BytesIO(data), start, end, stats):
            items.append(item(offset))
        offset += stats.lines
    return items, offset


def _text_oracle(data: bytes, mode: str, chunk: int) -> list[tuple[bytes, int]]:
    """Documents by the documented rules, for documents that are never cut."""
    lines = re.findall(rb"[^\n]*\n|[^\n]+$", data)
    if mode == "lines":
        return [(line, i) for i, line in enumerate(lines)]
    docs, buf, first = [], b"", 0
    for i, line in enumerate(lines):
        # a blank line is whitespace-only and complete; one longer than a read chunk counts as text
        blank = line.endswith(b"\n") and line.isspace() and len(line) <= chunk
        if blank:
            if buf:
                docs.append((buf, first))
            buf = b""
            continue
        if not buf:
            first = i
        buf += line
    if buf:
        docs.append((buf, first))
    return docs


@pytest.mark.parametrize("mode", ["paragraphs", "lines"])
def test_read_text_range_equals_sequential_read(monkeypatch, mode):
    monkeypatch.setattr(readers, "CHUNK", 7)
    rng = random.Random(1234 if mode == "paragraphs" else 4321)
    for case in range(400):
        data = _random_text(rng)
        max_doc = rng.choice([1 << 20, 1 << 20, rng.randint(4, 40)])

        def read(f, start, end, stats):
            return ((lambda off, d=d, l=l, c=c: (d, off + l, c))
                    for d, l, c in read_text_range(f, start, end, mode, max_doc, stats))

        seq, seq_lines = _read_ranges(data, [], read)
        assert seq_lines == _n_lines(data), (case, data)
        if max_doc == 1 << 20:
            assert [(d, l) for d, l, _ in seq] == _text_oracle(data, mode, 7), (case, data)
        else:
            # cut pieces are at most max_doc bytes and, back to back, are exactly the uncut documents
            assert all(len(d) <= max_doc for d, _, _ in seq), (case, data)
            uncut = _text_oracle(data, mode, 7)
            assert b"".join(d for d, _, _ in seq) == b"".join(d for d, _ in uncut), (case, data)
            assert {l for _, l, _ in seq} == {l for _, l in uncut}, (case, data)
        cuts = _cuts(rng, len(data))
        got, lines = _read_ranges(data, cuts, read)
        assert got == seq, (case, data, cuts, max_doc)
        assert lines == _n_lines(data), (case, data, cuts)


def _random_jsonl(rng: random.Random) -> bytes:
    out = []
    for _ in range(rng.randint(0, 25)):
        r = rng.random()
        if r < 0.45:
            line = json.dumps({"text": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 6))),
                               "n": rng.randint(0, 9)}, ensure_ascii=rng.random() < 0.5).encode()
        elif r < 0.5:
            line = b'{"text": "bad \xff\xfe utf8"}'
        elif r < 0.6:
            line = rng.choice([b"", b"  ", b"\t"])
        elif r < 0.7:
            line = b"{not json"
        elif r < 0.75:
            line = b"[1, 2]"
        elif r < 0.8:
            line = b'{"other": "no text"}'
        elif r < 0.85:
            line = b'{"text": 12}'
        else:
            line = json.dumps({"text": "long " * rng.randint(3, 12)}).encode()
        out.append(line + (b"\r\n" if rng.random() < 0.3 else b"\n"))
    data = b"".join(out)
    if data and rng.random() < 0.4:
        data = data.rstrip(b"\r\n")
    return data


def _jsonl_oracle(data: bytes, field: str = "text"):
    docs, bad = [], []
    for i, line in enumerate(re.findall(rb"[^\n]*\n|[^\n]+$", data)):
        if not line.strip():
            continue
        try:
            text, rep = line.decode("utf-8"), False
        except UnicodeDecodeError:
            text, rep = line.decode("utf-8", errors="replace"), True
        try:
            obj = json.loads(text)
        except ValueError:
            bad.append(("invalid_json", i))
            continue
        if not isinstance(obj, dict):
            bad.append(("not_an_object", i))
        elif field not in obj:
            bad.append(("missing_field", i))
        elif not isinstance(obj[field], str):
            bad.append(("field_not_string", i))
        else:
            docs.append((obj[field], i, rep))
    return docs, bad


def test_read_jsonl_range_equals_sequential_read(monkeypatch):
    monkeypatch.setattr(readers, "CHUNK", 7)
    rng = random.Random(99)
    for case in range(400):
        data = _random_jsonl(rng)
        max_rec = rng.choice([1 << 20, 1 << 20, rng.randint(10, 60)])
        bad: list = []

        def read(f, start, end, stats):
            calls = []

            def on_bad(reason, loc, detail):
                calls.append((reason, loc))

            for text, loc, rep in read_jsonl_range(f, start, end, "text", max_rec, stats, on_bad):
                for reason, bloc in calls:  # bad records before this document, in file order
                    yield lambda off, r=reason, b=bloc: ("bad", r, off + b)
                calls.clear()
                yield lambda off, t=text, l=loc, r=rep: ("doc", t, off + l, r)
            for reason, bloc in calls:
                yield lambda off, r=reason, b=bloc: ("bad", r, off + b)

        seq, seq_lines = _read_ranges(data, [], read)
        assert seq_lines == _n_lines(data), (case, data)
        if max_rec == 1 << 20:
            docs, bad = _jsonl_oracle(data)
            assert [x[1:] for x in seq if x[0] == "doc"] == docs, (case, data)
            assert [x[1:] for x in seq if x[0] == "bad"] == bad, (case, data)
        cuts = _cuts(rng, len(data))
        got, lines = _read_ranges(data, cuts, read)
        assert got == seq, (case, data, cuts, max_rec)
        assert lines == _n_lines(data), (case, data, cuts)


def test_read_text_range_on_a_real_file_with_default_chunk(tmp_path, paragraphs):
    """The same property with the real CHUNK, a real buffered file and a document longer than CHUNK."""
    big = ("word " * (readers.CHUNK // 5 + 1000)).strip()
    docs = paragraphs[:50] + [big] + paragraphs[50:80]
    path = tmp_path / "p.txt"
    write_paragraphs(path, docs, newline="\r\n")
    size = path.stat().st_size
    rng = random.Random(5)

    def read_all(cuts):
        bounds = [0] + cuts
        got, lines = [], 0
        for i, start in enumerate(bounds):
            end = bounds[i + 1] if i + 1 < len(bounds) else None
            st = PieceStats()
            with readers.open_binary(str(path), None) as f:
                got += [(d, lines + l) for d, l, _ in read_text_range(f, start, end, "paragraphs", 1 << 30, st)]
            lines += st.lines
        return got, lines

    seq, n = read_all([])
    assert [d.decode().replace("\r\n", "\n").strip() for d, _ in seq] == docs
    assert n == path.read_bytes().count(b"\n")
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, size), 6))
        assert read_all(cuts) == (seq, n)


# ---------------------------------------------------------------------------------------------------------
# planning: unit size and grouping depend on the inputs only
# ---------------------------------------------------------------------------------------------------------

def test_auto_unit_bytes():
    assert auto_unit_bytes(0) == MiB
    assert auto_unit_bytes(1000) == MiB
    assert auto_unit_bytes(64 * MiB) == MiB
    assert auto_unit_bytes(128 * MiB) == 2 * MiB
    assert auto_unit_bytes(64 * 3 * MiB) == 2 * MiB  # 3 MiB rounded down to a power of two
    assert auto_unit_bytes(64 * 64 * MiB) == 64 * MiB
    assert auto_unit_bytes(1 << 50) == 64 * MiB
    prev = 0
    for total in [0, 1, MiB, 100 * MiB, 777 * MiB, 5000 * MiB, 1 << 40]:
        u = auto_unit_bytes(total)
        assert u & (u - 1) == 0 and MiB <= u <= 64 * MiB and u >= prev
        prev = u


def test_group_units():
    pieces = [{"n": i, "est_bytes": b} for i, b in enumerate([5, 5, 5, 20, 1, 1, 0, 10])]
    units = group_units(pieces, 10)
    assert [[p["n"] for p in u["pieces"]] for u in units] == [[0, 1], [2], [3], [4, 5, 6], [7]]
    assert [u["id"] for u in units] == list(range(5))
    assert [u["est_bytes"] for u in units] == [10, 5, 20, 2, 10]
    assert group_units(pieces, 10) == units  # a pure function
    assert group_units([], 10) == []
    assert [len(u["pieces"]) for u in group_units(pieces, 1)] == [1, 1, 1, 1, 1, 2, 1]  # 0-byte piece joins


def test_plan_independent_of_workers_and_array(tmp_path, tok, paragraphs):
    for i in range(3):
        write_paragraphs(tmp_path / f"f{i}.txt", paragraphs[i * 30:(i + 1) * 30])
    plans = []
    for workers, count in [(1, 1), (8, 1), (3, 4)]:
        cfg = PrepareConfig(inputs=[f"{tmp_path}/*.txt"], output=str(tmp_path / "out"), tokenizer="unused",
                            workers=workers, array_count=count, unit_mb=0.003, command=["same"])
        plans.append(make_plan(cfg, tok))
    assert len(plans[0]["units"]) > 3
    for p in plans[1:]:
        assert p["plan_id"] == plans[0]["plan_id"] and p["units"] == plans[0]["units"]
    # and byte ranges tile each file exactly
    pieces = [p for u in plans[0]["units"] for p in u["pieces"]]
    for i in range(3):
        path = str(tmp_path / f"f{i}.txt")
        mine = [p for p in pieces if p["path"] == path]
        assert mine[0]["start"] == 0 and mine[-1]["end"] is None
        assert all(a["end"] == b["start"] for a, b in zip(mine, mine[1:]))


def test_parse_spec_options():
    s = parse_spec("data/x.jsonl#field=content,text_mode=lines,format=jsonl", 3, "text", "paragraphs")
    assert (s.index, s.kind, s.location, s.field, s.text_mode, s.format) == (3, "files", "data/x.jsonl", "content",
                                                                            "lines", "jsonl")
    s = parse_spec("hf:org/name#config=en,split=validation", 0, "text", "paragraphs")
    assert (s.kind, s.location, s.config, s.split) == ("hf", "org/name", "en", "validation")
    assert parse_spec("disk:/x/y", 0, "body", "lines").field == "body"
    with pytest.raises(PlanError, match="bad option 'colour=red'"):
        parse_spec("a.txt#colour=red", 0, "text", "paragraphs")
    with pytest.raises(PlanError, match="text_mode must be"):
        parse_spec("a.txt#text_mode=words", 0, "text", "paragraphs")
    with pytest.raises(PlanError, match="format must be"):
        parse_spec("a.txt#format=csv", 0, "text", "paragraphs")
    assert isinstance(s, Source)


# ---------------------------------------------------------------------------------------------------------
# names that need the Hugging Face hub, offline
# ---------------------------------------------------------------------------------------------------------

def test_hf_hub_dataset_offline_is_a_clear_error(tmp_path, wordpiece_dir, cli):
    proc = cli("--input", "hf:some-org/some-dataset", "--output", tmp_path / "out", "--tokenizer", wordpiece_dir,
               "--no-progress", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "some-org/some-dataset" in proc.stderr
    assert "save_to_disk" in proc.stderr and "disk:" in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_tokenizer_hub_name_offline_is_a_clear_error(tmp_path, cli):
    (tmp_path / "a.txt").write_text("hello world\n")
    proc = cli("--input", tmp_path / "a.txt", "--output", tmp_path / "out", "--tokenizer", "bert-base-cased",
               "--no-progress", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "could not load tokenizer 'bert-base-cased'" in proc.stderr
    assert "save_pretrained" in proc.stderr
    assert not (tmp_path / "out").exists()
