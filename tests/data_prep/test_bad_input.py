"""Bad input has a defined behaviour: a document is repaired or dropped and counted, a record is skipped with a
warning naming `file:line` (also in bad_records.jsonl), or the run stops with a clear message naming the path.
Never a bare traceback, never a silently wrong shard: the good documents around the bad ones are all there,
exactly.

Texts are checked exactly where WordPiece ids cannot tell (it drops U+FFFD and control characters itself): a
spy on the tokenizer records the cleaned text each document reaches it with.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import re
import resource

import numpy as np
import pytest

from pipeline.data.prepared import PreparedDataset
from pipeline.data.validate import validate
from pipeline.data_prep import readers
from pipeline.data_prep.cleaning import CleanConfig, clean, decode, split_long
from pipeline.data_prep.prepare import PrepareConfig, PrepareError, prepare
from pipeline.data_prep.readers import BadFileError
from pipeline.data_prep.sources import PlanError, parse_spec, plan_pieces
from pipeline.tokenization import PROBES, Encoder, load_tokenizer


@pytest.fixture(scope="module")
def tok(wordpiece_dir):
    return load_tokenizer(wordpiece_dir)


def train_docs(out) -> list[list[int]]:
    ds = PreparedDataset(str(out), "train", verify="full")
    return [ds[i].tolist() for i in range(len(ds))]


def assert_docs(tok, docs, texts) -> None:
    expected = tok.encode_batch(texts)
    if docs != expected:
        assert [tok.decode(d) for d in docs] == [tok.decode(e) for e in expected]
    assert docs == expected


def read_manifest(out) -> dict:
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def read_bad_records(out) -> list[dict]:
    with open(os.path.join(out, "bad_records.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_prepare(out, inputs, tokenizer, **kw) -> dict:
    cfg = PrepareConfig(inputs=[str(i) for i in inputs], output=str(out), tokenizer=tokenizer,
                        valid_fraction=0.0, progress=False, **kw)
    return prepare(cfg)


def junk_bytes(n: int, seed: int = 0) -> bytes:
    """Binary junk on one line: random bytes without newlines."""
    junk = random.Random(seed).randbytes(n).replace(b"\n", b"x")
    text, repaired = decode(junk)
    assert repaired and re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", text)  # invalid UTF-8 and control chars
    return junk


# ---------------------------------------------------------------------------------------------------------
# one run over a corpus of bad documents and records, through the command line
# ---------------------------------------------------------------------------------------------------------

BAD_TXT = [  # (bytes of the line, what happens)
    (b"Good document one before the bad ones.", "kept"),  # 1
    (b"", None),
    (b"Caf\xe9 au lait: a Latin-1 byte in an otherwise fine document.", "invalid_utf8"),  # 3
    (b"", None),
    ("\u00a0\u2003\u3000".encode(), "empty"),  # 5: whitespace, but not ASCII whitespace: a document, dropped
    (b"", None),
    (b"Has a NUL\x00 byte inside, and a bell\x07 too.", "control_chars"),  # 7
    (b"", None),
    (None, "binary"),  # 9: junk
    (b"", None),
    (b"Good document two after the bad ones.", "kept"),  # 11, no newline at the end
]
BAD_JSONL = [
    b'{"text": "JSON good one."}',  # 1
    b"{not json",  # 2
    b"[1, 2]",  # 3
    b'{"other": "no text field"}',  # 4
    b'{"text": 42}',  # 5
    b'{"text": " \\n\\t "}',  # 6 whitespace-only text: dropped (empty), not a bad record
    b'{"text": "JSON bad \xff UTF-8 inside."}',  # 7 repaired
    b"",  # 8 blank line: nothing
    b'{"text": "JSON good two."}',  # 9
]
EXPECTED_TEXTS = [  # what reaches the tokenizer, in order
    "Good document one before the bad ones.\n",
    "Caf\ufffd au lait: a Latin-1 byte in an otherwise fine document.\n",
    "Has a NUL byte inside, and a bell  too.\n",
    "Good document two after the bad ones.",
    "Line doc one.\n",
    "Line doc two.\n",
    "JSON good one.",
    "JSON bad \ufffd UTF-8 inside.",
    "JSON good two.",
]


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> tuple[list[str], dict]:
    d = tmp_path_factory.mktemp("bad")
    paths = {}
    lines = [junk_bytes(5000) if b is None else b for b, _ in BAD_TXT]
    (d / "bad.txt").write_bytes(b"\n".join(lines))
    (d / "empty.txt").write_bytes(b"")
    (d / "ws_lines.txt").write_bytes(b"Line doc one.\n   \t \n\nLine doc two.\n")
    (d / "empty.jsonl").write_bytes(b"")
    (d / "bad.jsonl").write_bytes(b"\n".join(BAD_JSONL) + b"\n")
    (d / "empty.json").write_bytes(b"")
    for name in ("bad.txt", "empty.txt", "ws_lines.txt", "empty.jsonl", "bad.jsonl", "empty.json"):
        paths[name] = str(d / name)
    inputs = [paths["bad.txt"], paths["empty.txt"], paths["ws_lines.txt"] + "#text_mode=lines", paths["empty.jsonl"],
              paths["bad.jsonl"], paths["empty.json"]]
    return inputs, paths


@pytest.fixture(scope="module")
def bad_run(bad_corpus, tmp_path_factory, wordpiece_dir):
    from tests.conftest import run_cli

    inputs, paths = bad_corpus
    out = tmp_path_factory.mktemp("bad_out") / "ds"
    proc = run_cli(*[a for i in inputs for a in ("--input", i)], "--output", out, "--tokenizer", wordpiece_dir,
                   "--valid-fraction", "0", "--no-progress", check=False)
    return proc, out, paths


def test_bad_documents_run_succeeds_without_traceback(bad_run):
    proc, out, _ = bad_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert validate(str(out)) == []  # every shard, index and count is consistent


def test_bad_documents_stats(bad_run):
    _, out, _ = bad_run
    st = read_manifest(out)["stats"]
    assert st["documents_read"] == 14
    assert st["documents"] == len(EXPECTED_TEXTS)
    assert st["dropped"] == {"empty": 4, "binary": 1}  # NBSP paragraph, 2 blank/whitespace lines, JSON " \n\t "
    assert st["repaired"] == {"invalid_utf8": 3, "control_chars": 2}  # the binary document counts in both
    assert st["bad_records"] == {"binary": 1, "invalid_json": 1, "not_an_object": 1, "missing_field": 1,
                                 "field_not_string": 1}
    assert st["skipped_files"] == 0


def test_bad_documents_good_ones_all_present_and_exact(bad_run, tok):
    _, out, _ = bad_run
    assert_docs(tok, train_docs(out), EXPECTED_TEXTS)


def test_bad_records_named_by_file_and_line(bad_run):
    proc, out, paths = bad_run
    expected = [(f"{paths['bad.txt']}:9", "binary"), (f"{paths['bad.jsonl']}:2", "invalid_json"),
                (f"{paths['bad.jsonl']}:3", "not_an_object"), (f"{paths['bad.jsonl']}:4", "missing_field"),
                (f"{paths['bad.jsonl']}:5", "field_not_string")]
    records = read_bad_records(out)
    assert [(r["where"], r["reason"]) for r in records] == expected
    assert read_manifest(out)["bad_records"]["count"] == len(expected)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert [re.match(r"WARNING (.*): skipped record \((\w+):", w).groups() for w in warnings] == expected
    assert "field 'text' is a int" in proc.stderr and "a JSON list, not an object" in proc.stderr
    assert "no field 'text'" in proc.stderr


def test_cleaned_texts_reach_the_tokenizer_exactly(bad_corpus, tmp_path, wordpiece_dir, monkeypatch):
    """U+FFFD kept in place of invalid bytes, NUL removed, other control characters made spaces."""
    seen = []
    real = Encoder.__call__

    def spy(self, texts):
        if list(texts) != list(PROBES):  # the tokenizer's fingerprint encodes these
            seen.extend(texts)
        return real(self, texts)

    monkeypatch.setattr(Encoder, "__call__", spy)
    inputs, _ = bad_corpus
    run_prepare(tmp_path / "out", inputs, wordpiece_dir)
    assert seen == EXPECTED_TEXTS


# ---------------------------------------------------------------------------------------------------------
# a 50 MB line
# ---------------------------------------------------------------------------------------------------------

WORDS = ["word", "the", "cat", "dog", "house", "river", "green", "music"]  # one WordPiece token each


@pytest.mark.parametrize("spacing", [
    50,  # 1M single-token words padded with spaces: 50 MB, quick to tokenize
    pytest.param(5, marks=pytest.mark.slow),  # 'word '-like: 10M tokens
])
def test_single_50mb_line(tmp_path, tok, wordpiece_dir, cli, spacing):
    if spacing == 5:
        words, block = ["word"], "word "
    else:
        words, block = WORDS, "".join(w.ljust(spacing) for w in WORDS)
    reps = 50_000_000 // len(block)
    path = tmp_path / "line.txt"
    with open(path, "w") as f:
        step = max(1, (1 << 20) // len(block))
        for i in range(0, reps, step):
            f.write(block * min(step, reps - i))
        f.write("\n")
    assert path.stat().st_size == 50_000_001
    out = tmp_path / "out"
    proc = cli("--input", path, "--output", out, "--tokenizer", wordpiece_dir, "--max-doc-chars", "100000",
               "--valid-fraction", "0", "--no-progress", timeout=600)
    assert "Traceback" not in proc.stderr
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux; max over children so far
    assert peak < 1.5 * (1 << 30), f"peak RSS {peak / 2**20:.0f} MiB"

    ds = PreparedDataset(str(out), "train")
    ids = [tok.encode(w)[0] for w in words]
    assert all(len(tok.encode(w)) == 1 for w in words)
    lengths = ds.doc_lengths()
    # pieces of at most max_doc_chars (ASCII: bytes == chars), cut at a space in the second half of the window
    per_word = len(block) // len(words)
    assert lengths.max() <= 100_000 // per_word
    assert (lengths[:-1] >= 50_000 // per_word - 1).all()
    assert len(ds) == len(lengths) > 400
    # consecutive, nothing lost or duplicated: the pieces back to back are the line's words in order
    stream = ds.tokens(0, ds.n_tokens)
    assert ds.n_tokens == reps * len(words)
    assert np.array_equal(stream, np.tile(np.array(ids, stream.dtype), reps))
    st = read_manifest(out)["stats"]
    # split_long counts documents that were split (here the one line), as for JSON records; a whitespace-only
    # remainder (the padding after the last word) is dropped as empty
    assert st["repaired"] == {"split_long": 1}
    assert st["documents"] == len(ds) == st["documents_read"] - st["dropped"].get("empty", 0)
    assert st["dropped"] in ({}, {"empty": 1}) and st["bad_records"] == {}


# ---------------------------------------------------------------------------------------------------------
# inputs that cannot be used: all reported at once, exit code 2
# ---------------------------------------------------------------------------------------------------------

def _write_parquet(path, **columns) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_invalid_settings_all_reported_at_once(tmp_path, cli):
    """Settings are checked before any work; every problem is listed, each naming its key (exit 2)."""
    src = tmp_path / "in.txt"
    src.write_text("a document\n", encoding="utf-8")
    proc = cli("--input", src, "--output", tmp_path / "out", "--workers", "0", "--valid-fraction", "1.5",
               "--unit-mb", "-1", "--no-progress", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "3 problems" in proc.stderr and "Traceback" not in proc.stderr
    for key in ("workers:", "valid_fraction:", "unit_mb:"):
        assert key in proc.stderr
    assert not (tmp_path / "out").exists()


def test_unusable_inputs_all_reported_at_once(tmp_path, wordpiece_dir, cli):
    (tmp_path / "good.txt").write_text("A good document.\n")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "unknown_only").mkdir()
    (tmp_path / "unknown_only" / "README.md").write_text("not an input\n")
    (tmp_path / "junk.parquet").write_bytes(random.Random(3).randbytes(4000))
    _write_parquet(tmp_path / "nocol.parquet", body=["a", "b"])
    specs = {
        "missing": (str(tmp_path / "missing.txt"), "no such file or directory"),
        "glob": (str(tmp_path / "nothing" / "*.jsonl"), "glob matches no files"),
        "emptydir": (str(tmp_path / "emptydir"), "directory has no input files"),
        "unknown_only": (str(tmp_path / "unknown_only"), "directory has no input files"),
        "junk": (str(tmp_path / "junk.parquet"), "unreadable Parquet file"),
        "nocol": (str(tmp_path / "nocol.parquet"), "Parquet file has no column 'text' (columns: ['body'])"),
    }
    args = ["--input", str(tmp_path / "good.txt")]
    for spec, _ in specs.values():
        args += ["--input", spec]
    proc = cli(*args, "--output", tmp_path / "out", "--tokenizer", wordpiece_dir, "--no-progress", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for spec, message in specs.values():
        assert f"{spec}: {message}" in proc.stderr, (spec, proc.stderr)
    assert str(tmp_path / "good.txt") + ":" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing planned, nothing written


@pytest.mark.parametrize("case", ["missing", "glob", "emptydir", "junk_parquet", "nocol_parquet", "text_field"])
def test_each_unusable_input_message(tmp_path, case):
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not really parquet")
    _write_parquet(tmp_path / "t.parquet", content=["a"])
    spec, message = {
        "missing": (f"{tmp_path}/nope.jsonl", f"{tmp_path}/nope.jsonl: no such file or directory"),
        "glob": (f"{tmp_path}/*.zzz", f"{tmp_path}/*.zzz: glob matches no files"),
        "emptydir": (f"{tmp_path}/emptydir", f"{tmp_path}/emptydir: directory has no input files"),
        "junk_parquet": (f"{tmp_path}/junk.parquet", f"{tmp_path}/junk.parquet: unreadable Parquet file"),
        "nocol_parquet": (f"{tmp_path}/t.parquet", f"{tmp_path}/t.parquet: Parquet file has no column 'text'"),
        "text_field": (f"{tmp_path}/t.parquet#field=body", "no column 'body' (columns: ['content']); pick one with"),
    }[case]
    with pytest.raises(PlanError) as e:
        plan_pieces([parse_spec(spec, 0, "text", "paragraphs")], None)
    assert message in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# JSON records with problems, in a file cut into many byte ranges
# ---------------------------------------------------------------------------------------------------------

def test_bad_records_absolute_lines_across_byte_ranges(tmp_path, tok, wordpiece_dir, capsys):
    bad_lines = {3: (b"{not json", "invalid_json"), 97: (b"[1, 2, 3]", "not_an_object"),
                 98: (b'{"txt": "typo"}', "missing_field"), 201: (b'{"text": 3.5}', "field_not_string"),
                 333: (b"{\"text\": \"unterminated", "invalid_json"), 400: (b"17", "not_an_object")}
    lines, good = [], []
    for i in range(1, 401):
        if i in bad_lines:
            lines.append(bad_lines[i][0])
        else:
            good.append(f"Record number {i} is fine.")
            lines.append(json.dumps({"text": good[-1], "i": i}).encode())
    jpath = tmp_path / "records.jsonl"
    jpath.write_bytes(b"\n".join(lines))  # the last (bad) line has no newline

    # plain text: junk paragraphs at known lines, some in later ranges
    text_lines, junk_at, good_paras = [], [], []
    for k in range(60):
        if k % 13 == 5:
            junk_at.append(len(text_lines) + 1)
            text_lines.append(junk_bytes(300, seed=k))
        else:
            good_paras.append(f"Paragraph {k} first line.\nParagraph {k} second line.")
            text_lines += [f"Paragraph {k} first line.".encode(), f"Paragraph {k} second line.".encode()]
        text_lines.append(b"")
    tpath = tmp_path / "paras.txt"
    tdata = b"\n".join(text_lines)
    tpath.write_bytes(tdata)

    out = tmp_path / "out"
    manifest = run_prepare(out, [jpath, tpath], wordpiece_dir, unit_mb=0.002)
    with open(out / "plan.json") as f:
        plan = json.load(f)
    starts = sorted({p["start"] for u in plan["units"] for p in u["pieces"] if p["path"] == str(jpath)})
    assert len(starts) > 5  # the bad lines fall in several ranges

    expected = [(f"{jpath}:{n}", reason) for n, (_, reason) in sorted(bad_lines.items())]
    expected += [(f"{tpath}:{n}", "binary") for n in junk_at]
    assert [(r["where"], r["reason"]) for r in read_bad_records(out)] == expected
    assert manifest["stats"]["bad_records"] == {"invalid_json": 2, "not_an_object": 2, "missing_field": 1,
                                                "field_not_string": 1, "binary": len(junk_at)}
    assert_docs(tok, train_docs(out), good + good_paras)

    # live warnings: `file:line` in a file's first range; in later ranges the range's byte and its local line
    # (the absolute line is only known once all ranges are counted, in bad_records.jsonl)
    err = capsys.readouterr().err
    warned = re.findall(r"WARNING (\S+?)(?::(\d+)|: line (\d+) of the range starting at byte (\d+)): skipped record "
                        r"\((\w+):", err)
    assert len(warned) == len(expected)
    data = {str(jpath): jpath.read_bytes(), str(tpath): tdata}
    got = []
    for path, line, local, byte, reason in warned:
        if line:
            got.append((f"{path}:{line}", reason))
        else:
            before = data[path][:int(byte) - 1].count(b"\n") + 1  # lines starting before the range's first line
            got.append((f"{path}:{before + int(local)}", reason))
    assert sorted(got) == sorted(expected)


# ---------------------------------------------------------------------------------------------------------
# files that cannot be read at all
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def corrupt_files(tmp_path):
    import zstandard

    before = [f"Before document {i}." for i in range(5)]
    after = [f"After record {i}." for i in range(4)]
    (tmp_path / "before.txt").write_text("\n\n".join(before) + "\n")
    gz_docs = "".join(f"Compressed document number {i} with a few words.\n\n" for i in range(3000)).encode()
    raw = gzip.compress(gz_docs)
    (tmp_path / "corrupt.txt.gz").write_bytes(raw[: len(raw) // 2])
    zst = zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": f"Zstd record {i}."}) + "\n" for i in range(3000)).encode())
    (tmp_path / "trunc.jsonl.zst").write_bytes(zst[: len(zst) * 2 // 3])
    with open(tmp_path / "after.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in after)
    # the truncated gzip yields many documents before the error: they must not end up in a shard
    n = 0
    with pytest.raises(EOFError):
        with gzip.open(tmp_path / "corrupt.txt.gz", "rt") as f:
            for _ in f:
                n += 1
    assert n > 100
    names = ("before.txt", "corrupt.txt.gz", "trunc.jsonl.zst", "after.jsonl")
    return [str(tmp_path / n) for n in names], before, after


def test_corrupt_compressed_file_stops_the_run(tmp_path, corrupt_files, wordpiece_dir, cli):
    inputs, _, _ = corrupt_files
    out = tmp_path / "out"
    proc = cli(*[a for i in inputs for a in ("--input", i)], "--output", out, "--tokenizer", wordpiece_dir,
               "--valid-fraction", "0", "--no-progress", check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{inputs[1]}: corrupt or unreadable (EOFError" in proc.stderr
    assert "--on-bad-file skip" in proc.stderr
    assert not (out / "manifest.json").exists()
    assert not (out / "units" / "000000.json").exists()
    assert not [n for n in os.listdir(out / "train") if n.endswith(".bin")]  # no shard, not even a partial one


def test_corrupt_compressed_file_skipped(tmp_path, corrupt_files, tok, wordpiece_dir, cli):
    inputs, before, after = corrupt_files
    out = tmp_path / "out"
    proc = cli(*[a for i in inputs for a in ("--input", i)], "--output", out, "--tokenizer", wordpiece_dir,
               "--valid-fraction", "0", "--no-progress", "--on-bad-file", "skip")
    assert "Traceback" not in proc.stderr
    assert f"skipping unreadable file {inputs[1]}: corrupt or unreadable (EOFError" in proc.stderr
    assert f"skipping unreadable file {inputs[2]}: corrupt zstd file: truncated" in proc.stderr
    st = read_manifest(out)["stats"]
    assert st["skipped_files"] == 2
    assert st["documents_read"] == st["documents"] == len(before) + len(after)  # the unit was redone without them
    records = read_bad_records(out)
    assert [(r["where"], r["reason"]) for r in records] == [(inputs[1], "skipped_file"), (inputs[2], "skipped_file")]
    assert_docs(tok, train_docs(out), before + after)  # none of the corrupt files' documents
    assert validate(str(out)) == []


@pytest.mark.parametrize("content,message", [
    ('[{"text": "one"}, {"text": "two"}, ', "truncated JSON array (no closing ']' after line 1)"),
    ('[\n{"text": "one"},\n{"text": "tw', "invalid JSON at line 3"),
    ('[\n{"text": "one"}\n{"text": "two"}]', "invalid JSON at line 3: expected ',' or ']'"),  # missing comma
    ('[{"text": "one"}]\n[{"text": "two"}]\n', "data at line 2, after the array's closing ']'"),  # two arrays
    ('{"text": "an object, not an array"}', None),  # sniffed as JSON Lines: one good record
])
def test_truncated_or_malformed_json_array(tmp_path, wordpiece_dir, tok, content, message):
    (tmp_path / "good.txt").write_text("Good text.\n")
    (tmp_path / "arr.json").write_text(content)
    inputs = [tmp_path / "good.txt", tmp_path / "arr.json"]
    if message is None:
        run_prepare(tmp_path / "out", inputs, wordpiece_dir)
        assert_docs(tok, train_docs(tmp_path / "out"), ["Good text.", "an object, not an array"])
        return
    with pytest.raises(PrepareError) as e:
        run_prepare(tmp_path / "out", inputs, wordpiece_dir)
    assert f"{tmp_path / 'arr.json'}: {message}" in str(e.value)
    assert "Traceback" not in str(e.value)
    assert not (tmp_path / "out" / "manifest.json").exists()
    m = run_prepare(tmp_path / "out2", inputs, wordpiece_dir, on_bad_file="skip")
    assert m["stats"]["skipped_files"] == 1
    assert_docs(tok, train_docs(tmp_path / "out2"), ["Good text."])


# ---------------------------------------------------------------------------------------------------------
# truncated zstd files (python-zstandard's reader reports them as a clean end of data)
# ---------------------------------------------------------------------------------------------------------

def _zstd_variants() -> dict[str, tuple[bytes, bytes, set]]:
    """name -> (compressed, plain, cut points that leave a complete, shorter stream)."""
    import zstandard

    data = "".join(f"line {i} of a document, {i * 7919 % 1000}\n" for i in range(20000)).encode()
    skippable = (0x184D2A50).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"  # as pzstd writes
    frames = [zstandard.ZstdCompressor(level=1).compress(data[i:i + 100_000]) for i in range(0, len(data), 100_000)]
    one = zstandard.ZstdCompressor().compress(data)
    rle = b"a" * 3_000_000
    noise = random.Random(0).randbytes(300_000)
    return {
        "default": (one, data, set()),
        "checksum_no_size": (zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(data),
                             data, set()),
        "frames": (b"".join(frames), data, set(np.cumsum([len(f) for f in frames]).tolist())),
        "skippable": (skippable + one + skippable, data, {len(skippable), len(skippable) + len(one)}),
        "rle": (zstandard.ZstdCompressor().compress(rle), rle, set()),
        "incompressible": (zstandard.ZstdCompressor().compress(noise), noise, set()),
        "empty": (zstandard.ZstdCompressor().compress(b""), b"", set()),
    }


def test_zstd_truncation_detected(tmp_path):
    """Every prefix of a valid file that ends inside a frame is reported; complete files (several frames,
    skippable frames, checksums, no content size, RLE and raw blocks) read whole."""
    rng = random.Random(7)
    for name, (blob, plain, complete) in _zstd_variants().items():
        path = tmp_path / f"{name}.zst"
        path.write_bytes(blob)
        assert readers._zstd_truncated(str(path)) is None, name
        with readers.open_binary(str(path), "zst") as f:
            assert f.read() == plain, name
        cuts = set(range(1, min(len(blob), 30))) | {len(blob) - k for k in range(1, min(len(blob), 30))}
        cuts |= {rng.randrange(1, len(blob)) for _ in range(30)}
        for cut in sorted(cuts):
            path.write_bytes(blob[:cut])
            reason = readers._zstd_truncated(str(path))
            if cut in complete:
                assert reason is None, (name, cut)
                continue
            assert reason and "truncated" in reason, (name, cut)
            with pytest.raises(BadFileError, match="corrupt zstd file: truncated"):
                readers.open_binary(str(path), "zst")


def test_truncated_zstd_json_array_is_a_plan_error(tmp_path):
    import zstandard

    blob = zstandard.ZstdCompressor().compress(json.dumps([{"text": f"doc {i}"} for i in range(5000)]).encode())
    (tmp_path / "a.json.zst").write_bytes(blob[:-10])
    with pytest.raises(PlanError, match=re.escape(f"{tmp_path / 'a.json.zst'}: cannot read (")):
        plan_pieces([parse_spec(str(tmp_path / "a.json.zst"), 0, "text", "paragraphs")], None)


def test_not_zstd_data_is_a_bad_file(tmp_path, wordpiece_dir):
    (tmp_path / "junk.txt.zst").write_bytes(b"this is not a zstd stream " * 20)
    (tmp_path / "good.txt").write_text("Fine.\n")
    with pytest.raises(PrepareError, match=re.escape(f"{tmp_path / 'junk.txt.zst'}: corrupt zstd stream")):
        run_prepare(tmp_path / "out", [tmp_path / "good.txt", tmp_path / "junk.txt.zst"], wordpiece_dir)


# ---------------------------------------------------------------------------------------------------------
# cleaning.py directly
# ---------------------------------------------------------------------------------------------------------

CFG = CleanConfig(max_doc_chars=1000, max_junk_fraction=0.1)


def test_clean_good_text_untouched():
    text = "A normal document.\nWith\ttabs and\r\nCRLF lines, accents (naïve), CJK 日本語."
    assert clean(text, CFG) == ([text], None, [])


def test_clean_invalid_utf8():
    text, repaired = decode(b"caf\xe9 and cr\xc3\xa8me")
    assert (text, repaired) == ("caf\ufffd and cr\u00e8me", True)
    assert clean(text, CFG, utf8_repaired=True) == ([text], None, ["invalid_utf8"])
    assert decode("crème".encode()) == ("crème", False)


def test_clean_control_characters():
    text = "Some text\x00 with a NUL, a bell\x07, an escape\x1b, a DEL\x7f and a form feed\x0c;\ttab,\nLF, CR\r stay."
    assert clean(text, CFG) == (
        ["Some text with a NUL, a bell , an escape , a DEL  and a form feed ;\ttab,\nLF, CR\r stay."], None,
        ["control_chars"])


def test_clean_junk_fraction_threshold():
    # more than max_junk_fraction of the (cleaned) text is junk: dropped as binary
    assert clean("a" * 90 + "\ufffd" * 10, CFG, utf8_repaired=True)[1] is None  # 10 of 100: at the limit, kept
    assert clean("a" * 89 + "\ufffd" * 11, CFG, utf8_repaired=True) == ([], "binary", ["invalid_utf8"])
    assert clean("a" * 90 + "\x01" * 10, CFG)[1] is None
    assert clean("a" * 89 + "\x01" * 11, CFG) == ([], "binary", ["control_chars"])
    # NULs are removed first, so the fraction is of what is left: 10 junk in 90 characters
    assert clean("a" * 90 + "\x00" * 10, CFG) == ([], "binary", ["control_chars"])
    # U+FFFD that was in valid UTF-8 (e.g. a JSON string) counts as junk too, without an invalid_utf8 repair
    assert clean("\ufffd" * 20 + "a" * 80, CFG) == ([], "binary", [])
    assert clean("a" * 89 + "\ufffd" * 11, CleanConfig(max_doc_chars=1000, max_junk_fraction=0.5))[1] is None
    # pure junk and mixed junk
    assert clean("\ufffd\x01\x02", CFG, utf8_repaired=True) == ([], "binary", ["invalid_utf8", "control_chars"])


def test_clean_empty_and_whitespace():
    assert clean("", CFG) == ([], "empty", [])
    assert clean(" \t\r\n \u00a0\u3000", CFG) == ([], "empty", [])
    assert clean("\x00\x00", CFG) == ([], "binary", ["control_chars"])  # all junk: binary, not empty
    assert clean("\x00 \n", CFG)[1] == "binary"


def test_clean_long_document_split():
    words = " ".join(f"w{i}" for i in range(2000))  # ~11k characters
    pieces, reason, repairs = clean(words, CFG)
    assert reason is None and repairs == ["split_long"]
    assert "".join(pieces) == words
    assert all(len(p) <= 1000 for p in pieces)
    assert all(p[0] == " " for p in pieces[1:])  # cut at whitespace: the next piece starts with it
    assert all(len(p) > 500 for p in pieces[:-1])  # cut in the second half of the window


def test_split_long_rules():
    assert split_long("short", 10) == ["short"]
    assert split_long("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]  # no whitespace: hard cuts at the limit
    # whitespace only in the first half of the window: hard cut
    assert split_long("ab " + "x" * 20, 10) == ["ab xxxxxxx", "x" * 10, "x" * 3]
    # the last whitespace (space or newline) in the second half of the window
    assert split_long("aaaaaa bb\ncc dddd", 10) == ["aaaaaa bb", "\ncc dddd"]
    assert split_long("aaaaaaa b cccccccc", 10) == ["aaaaaaa b", " cccccccc"]
    # whitespace-only pieces are dropped
    assert split_long("a" * 10 + " " * 30 + "b", 10) == ["a" * 10, "   b"]
    rng = random.Random(11)
    for _ in range(300):
        n = rng.randint(1, 300)
        text = "".join(rng.choice("ab \n") for _ in range(n))
        m = rng.randint(2, 40)
        pieces = split_long(text, m)
        assert all(0 < len(p) <= m and not p.isspace() for p in pieces)
        # nothing but whitespace-only pieces is lost, and order is kept
        assert "".join(pieces).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")
