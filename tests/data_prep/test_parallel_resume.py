"""The output is a function of the inputs and settings only: byte-identical for any worker count, any
byte-range cutting equals one sequential read, and an interrupted run resumes to the same bytes."""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline import shards as fmt
from pipeline.data.prepared import PreparedDataset
from pipeline.data.validate import validate
from pipeline.data_prep.prepare import PrepareConfig, PrepareError, prepare
from pipeline.data_prep.readers import PieceStats, read_jsonl_range, read_text_range
from pipeline.tokenization import load_tokenizer
from tests.conftest import ROOT, run_cli, write_text_docs

# -- helpers -------------------------------------------------------------------------------------------------

def clean_docs(texts: list[str]) -> list[str]:
    return ["\n".join(line for line in t.split("\n") if line.strip()) for t in texts]


def snapshot(out) -> dict:
    """Everything of a dataset that must not depend on how it was made (workers, tasks, interruptions):
    every byte of the shards and counts, and the manifest less its run-specific fields."""
    out = str(out)
    files = {}
    for sub in ("train", "valid", "counts"):
        for name in sorted(os.listdir(os.path.join(out, sub))):
            with open(os.path.join(out, sub, name), "rb") as f:
                files[f"{sub}/{name}"] = f.read()
    for name in ("token_counts.npy", "bad_records.jsonl"):
        with open(os.path.join(out, name), "rb") as f:
            files[name] = f.read()
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    stats = {k: v for k, v in m["stats"].items() if k not in ("seconds", "tokens_per_s", "documents_per_s",
                                                                 "worker_seconds", "tokenizer_seconds")}
    keep = {k: m[k] for k in ("format_version", "plan_id", "dtype", "tokenizer", "split", "settings", "sources",
                              "totals", "shards", "token_counts", "bad_records")}
    return {"files": files, "manifest": keep, "stats": stats}


def assert_same_dataset(a, b) -> None:
    sa, sb = snapshot(a), snapshot(b)
    assert sorted(sa["files"]) == sorted(sb["files"])
    for name in sa["files"]:
        assert sa["files"][name] == sb["files"][name], f"{name} differs"
    assert sa["manifest"] == sb["manifest"]
    assert sa["stats"] == sb["stats"]


def tmp_leftovers(out) -> list[str]:
    return [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if fmt.TMP_MARK in f]


def split_docs(out, split) -> list[list[int]]:
    ds = PreparedDataset(out, split)
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.fixture(scope="module")
def docs(sample_texts) -> list[str]:
    return clean_docs(sample_texts)


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory, docs) -> list[str]:
    """A ~150 KB text file and a ~60 KB JSONL file (several byte ranges each), plus small files: JSONL, a
    lines-mode text file, a gzip JSONL, and a folder of two text files (grouped into shared units)."""
    d = tmp_path_factory.mktemp("mixed")
    write_text_docs(d / "big.txt", docs[:150])
    with open(d / "big.jsonl", "w") as f:
        for t in docs[210:]:
            f.write(json.dumps({"text": t}) + "\n")
    with open(d / "s0.jsonl", "w") as f:
        for t in docs[150:165]:
            f.write(json.dumps({"body": t, "n": 1}) + "\n")
    write_text_docs(d / "s1.txt", docs[165:180], mode="lines")
    with gzip.open(d / "s2.jsonl.gz", "wt") as f:
        for t in docs[180:195]:
            f.write(json.dumps({"text": t}) + "\n")
    (d / "folder").mkdir()
    write_text_docs(d / "folder" / "x.txt", docs[195:202])
    write_text_docs(d / "folder" / "y.txt", docs[202:210])
    return [str(d / "big.txt"), str(d / "s0.jsonl") + "#field=body", str(d / "s1.txt") + "#text_mode=lines",
            str(d / "s2.jsonl.gz"), str(d / "folder"), str(d / "big.jsonl")]


def cli_args(inputs, out, tokenizer, unit_mb, *extra) -> list[str]:
    args = ["--output", str(out), "--tokenizer", tokenizer, "--unit-mb", str(unit_mb), "--valid-fraction", "0.1",
            "--no-progress"]
    for i in inputs:
        args += ["--input", i]
    return args + list(extra)


def cfg(inputs, out, tokenizer, unit_mb, **kw) -> PrepareConfig:
    return PrepareConfig(inputs=list(inputs), output=str(out), tokenizer=tokenizer, unit_mb=unit_mb,
                         valid_fraction=kw.pop("valid_fraction", 0.1), progress=False, **kw)


# -- workers ---------------------------------------------------------------------------------------------------

def test_output_identical_for_any_worker_count(tmp_path, mixed_inputs, wordpiece_dir):
    m1 = prepare(cfg(mixed_inputs, tmp_path / "w1", wordpiece_dir, 0.03, workers=1))
    with open(tmp_path / "w1" / "plan.json") as f:
        plan = json.load(f)
    assert len(plan["units"]) >= 8
    assert any(len(u["pieces"]) > 1 for u in plan["units"])  # small files grouped
    assert any(p.get("start", 0) > 0 for u in plan["units"] for p in u["pieces"])  # byte ranges
    assert m1["totals"]["valid"]["documents"] > 0

    run_cli(*cli_args(mixed_inputs, tmp_path / "w2", wordpiece_dir, 0.03, "--workers", "2"))
    prepare(cfg(mixed_inputs, tmp_path / "w3", wordpiece_dir, 0.03, workers=3))
    assert_same_dataset(tmp_path / "w1", tmp_path / "w2")
    assert_same_dataset(tmp_path / "w1", tmp_path / "w3")
    assert m1["totals"]["train"]["documents"] + m1["totals"]["valid"]["documents"] == 276
    for name in ("w1", "w2", "w3"):
        assert validate(str(tmp_path / name)) == []


def test_workers_start_from_a_process_with_threads_and_a_stale_worker_state(tmp_path, mixed_inputs, wordpiece_dir):
    """Workers are spawned: a parent with threads running (here a Python thread; loading a tokenizer through
    transformers starts native ones) is safe, and a worker never inherits this process's state (it holds a
    stale one here). The dataset equals the one made inline."""
    code = f"""
import sys, threading
sys.path.insert(0, {str(ROOT)!r})
from pipeline.data_prep import prepare as P
threading.Thread(target=threading.Event().wait, args=(60,), daemon=True).start()
P._WORKER = "the state of an earlier inline run"
P.prepare(P.PrepareConfig(inputs={[str(i) for i in mixed_inputs[1:]]!r}, output=sys.argv[1] + "/b",
                          tokenizer={wordpiece_dir!r}, unit_mb=0.03, valid_fraction=0.1, progress=False, workers=2))
"""
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prepare(cfg(mixed_inputs[1:], tmp_path / "ref", wordpiece_dir, 0.03, workers=1))
    assert_same_dataset(tmp_path / "ref", tmp_path / "b")
    assert tmp_leftovers(tmp_path) == []


# -- byte ranges -------------------------------------------------------------------------------------------------

EXTRAS = ["café", "日本語のテキスト", "Ångström 🙂", "naïve — «quoted»"]


def tricky_docs(docs: list[str], seed: int = 0) -> list[str]:
    """Documents with a multi-byte word inserted somewhere."""
    rng = np.random.default_rng(seed)
    out = []
    for i, d in enumerate(docs):
        words = d.split(" ")
        words.insert(int(rng.integers(0, len(words))), EXTRAS[i % len(EXTRAS)])
        out.append(" ".join(words))
    return out


def tricky_text(docs: list[str], seed: int = 0) -> bytes:
    """Documents with multi-byte characters, separated by assorted blank lines (several, whitespace-only,
    CRLF), so byte-range cuts land everywhere: inside characters, lines, separators."""
    rng = np.random.default_rng(seed)
    seps = ["\n\n", "\n\n\n", "\n   \n", "\n\t\n\n", "\r\n\r\n"]
    parts = []
    for d in tricky_docs(docs, seed):
        parts.append(d)
        parts.append(seps[int(rng.integers(0, len(seps)))])
    return ("\n\n\n" + "".join(parts)).encode("utf-8")


def read_range(data: bytes, start: int, end, mode: str, fmt_: str = "text") -> tuple[list, int]:
    stats = PieceStats()
    f = io.BufferedReader(io.BytesIO(data))
    if fmt_ == "text":
        out = [d for d, _, _ in read_text_range(f, start, end, mode, 1 << 20, stats)]
    else:
        out = [t for t, _, _ in read_jsonl_range(f, start, end, "text", 1 << 20, stats, lambda *a: None)]
    return out, stats.lines


@pytest.mark.parametrize("mode", ["paragraphs", "lines", "jsonl"])
def test_read_range_every_cut_point_equals_sequential_read(docs, mode):
    """Two ranges cut at any byte give exactly the documents of one read; so do three at random cuts."""
    if mode == "jsonl":
        data = "".join(json.dumps({"text": t}, ensure_ascii=False) + ("\r\n" if i % 3 else "\n")
                       for i, t in enumerate(tricky_docs([d[:300] for d in docs[:8]]))).encode()
        data += b"\n   \n" + json.dumps({"text": "last, no newline"}).encode()
        fmt_, m = "jsonl", None
    else:
        data = tricky_text([d[:300] for d in docs[:8]])
        fmt_, m = "text", mode
    whole, lines = read_range(data, 0, None, m, fmt_)
    assert len(whole) >= 6
    assert lines == data.count(b"\n") + (not data.endswith(b"\n"))
    for k in range(len(data) + 1):
        a, la = read_range(data, 0, k, m, fmt_)
        b, lb = read_range(data, k, None, m, fmt_)
        assert a + b == whole, f"cut at byte {k}"
        assert la + lb == lines, f"line count with a cut at byte {k}"
    rng = np.random.default_rng(1)
    for _ in range(200):
        x, y = sorted(int(v) for v in rng.integers(0, len(data) + 1, size=2))
        parts = read_range(data, 0, x, m, fmt_)[0] + read_range(data, x, y, m, fmt_)[0] \
            + read_range(data, y, None, m, fmt_)[0]
        assert parts == whole, (x, y)


@pytest.mark.parametrize("mode", ["paragraphs", "lines", "jsonl"])
def test_many_ranges_equal_one_range(tmp_path, docs, wordpiece_dir, mode):
    some = docs[:100]
    if mode == "jsonl":
        path = tmp_path / "in.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i, t in enumerate(tricky_docs(some)):
                f.write(json.dumps({"text": t}, ensure_ascii=i % 2 == 0) + "\n")
        spec = str(path)
    else:
        path = tmp_path / "in.txt"
        text = tricky_text(some)
        if mode == "lines":  # one document per line, some lines blank or whitespace-only
            text = text.replace(b"\r\n", b"\n").replace(b"\n\n\n", b"\n \n")
        path.write_bytes(text)
        spec = f"{path}#text_mode={mode}"
    size = os.path.getsize(path)
    results = {}
    for unit_mb in (100, 0.01, 3001 / (1 << 20)):
        out = tmp_path / f"out-{unit_mb}"
        prepare(cfg([spec], out, wordpiece_dir, unit_mb, valid_fraction=0.2))
        with open(out / "plan.json") as f:
            n_pieces = sum(len(u["pieces"]) for u in json.load(f)["units"])
        assert n_pieces == max(1, -(-size // max(1, int(unit_mb * (1 << 20)))))
        results[unit_mb] = (split_docs(out, "train"), split_docs(out, "valid"))
    one_train, one_valid = results[100]
    assert len(one_train) > 20 and len(one_valid) > 3
    for unit_mb, (train, valid) in results.items():
        assert train == one_train, f"train documents differ with --unit-mb {unit_mb}"
        assert valid == one_valid, f"valid documents differ with --unit-mb {unit_mb}"
    # and the one-range read is the right one: every document of the input, tokenized
    tok = load_tokenizer(wordpiece_dir)
    if mode == "jsonl":
        texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    elif mode == "lines":
        texts = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    else:
        texts = [t for t in re.split(r"\n[ \t\r]*\n", path.read_text(encoding="utf-8")) if t.strip()]
    expected = [e for e in tok.encode_batch(texts) if e]
    assert sorted(one_train + one_valid) == sorted(expected)


# -- resume ------------------------------------------------------------------------------------------------------

def test_resume_after_damage_redoes_only_broken_units(tmp_path, mixed_inputs, wordpiece_dir, caplog, capsys):
    ref, out = tmp_path / "ref", tmp_path / "out"
    prepare(cfg(mixed_inputs, ref, wordpiece_dir, 0.03))
    first = prepare(cfg(mixed_inputs, out, wordpiece_dir, 0.03))
    n_units = len(first["shards"]["train"])
    assert n_units >= 8
    p = {u: fmt.unit_paths(u) for u in range(n_units)}
    # a kill between writing a unit's shards and its record: files complete, record missing
    os.unlink(out / p[1]["record"])
    # a partial shard under its final name: record present, .bin truncated
    with open(out / p[2]["train_bin"], "r+b") as f:
        f.truncate(os.path.getsize(out / p[2]["train_bin"]) - 3)
    # a kill while writing: temporary file with junk, final file and record missing
    os.unlink(out / p[3]["record"])
    os.unlink(out / p[3]["train_bin"])
    (out / (p[3]["train_bin"] + ".tmp-12345")).write_bytes(b"\x07junk" * 100)
    (out / (p[3]["counts"] + ".tmp-999")).write_bytes(b"junk")
    # silent corruption, same size (found by the default full check of completed units)
    data = bytearray((out / p[4]["valid_idx"]).read_bytes())
    data[-1] ^= 0x01
    (out / p[4]["valid_idx"]).write_bytes(bytes(data))
    for name in ("manifest.json", "token_counts.npy"):
        os.unlink(out / name)

    capsys.readouterr()
    caplog.set_level(logging.INFO, logger="pipeline.data_prep")
    prepare(cfg(mixed_inputs, out, wordpiece_dir, 0.03))
    err = capsys.readouterr().err
    assert re.search(r"unit 2: redoing, its files failed verification: train/000002\.bin: \d+ bytes, expected", err)
    assert re.search(r"unit 4: redoing, .*valid/000004\.idx: checksum mismatch", err)
    assert "unit 1:" not in err and "unit 3:" not in err  # no record: simply not done yet
    assert f"from {n_units} units ({n_units - 4} resumed)" in caplog.text
    assert tmp_leftovers(out) == []
    assert_same_dataset(ref, out)
    assert validate(str(out)) == []


def test_size_only_resume_check_keeps_same_size_corruption(tmp_path, mixed_inputs, wordpiece_dir, caplog):
    """--verify-existing size is the documented cheap mode: it trusts a completed unit of the right sizes."""
    out = tmp_path / "out"
    prepare(cfg(mixed_inputs, out, wordpiece_dir, 0.03))
    rel = fmt.unit_paths(0)["train_bin"]
    data = bytearray((out / rel).read_bytes())
    data[10] ^= 0x01
    (out / rel).write_bytes(bytes(data))
    caplog.set_level(logging.INFO, logger="pipeline.data_prep")
    m = prepare(cfg(mixed_inputs, out, wordpiece_dir, 0.03, verify_existing="size"))
    n = len(m["shards"]["train"])
    assert f"({n} resumed)" in caplog.text
    assert (out / rel).read_bytes() == bytes(data)
    assert any("train/000000.bin: checksum mismatch" in p for p in validate(str(out)))
    prepare(cfg(mixed_inputs, out, wordpiece_dir, 0.03))  # the default full check repairs it
    assert f"({n - 1} resumed)" in caplog.text
    assert validate(str(out)) == []


def test_rerun_after_interrupted_join_leaves_no_temporary_files(tmp_path, mixed_inputs, wordpiece_dir):
    """A kill while join writes manifest.json / token_counts.npy leaves their temporary files; re-running the
    same command must finish the dataset and leave it valid."""
    out = tmp_path / "out"
    prepare(cfg(mixed_inputs, out, wordpiece_dir, 0.03))
    os.unlink(out / "manifest.json")
    (out / "manifest.json.tmp-ab12cd").write_text('{"format_version": 1, "shar')
    (out / "token_counts.npy.tmp-x9y8").write_bytes(b"\x93NUMPY")
    (out / "bad_records.jsonl.tmp-zz").write_bytes(b"{")
    prepare(cfg(mixed_inputs, out, wordpiece_dir, 0.03))
    assert tmp_leftovers(out) == []
    assert validate(str(out)) == []


def test_resume_after_sigkill(tmp_path, mixed_inputs, wordpiece_dir):
    """Kill -9 the CLI once its first units are recorded; the same command then finishes the dataset, byte
    for byte as an uninterrupted run, reusing the recorded units."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    unit_mb = 0.005  # ~5 KB units: ~60 of them, so the kill lands mid-run
    args = cli_args(mixed_inputs, out, wordpiece_dir, unit_mb)
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "prepare_data.py"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.isdir(out / "units") and len(os.listdir(out / "units")) >= 2:
                break
            time.sleep(0.005)
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    if not killed or (out / "manifest.json").exists():
        pytest.skip("the run finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL
    done_before = {n for n in os.listdir(out / "units") if n.endswith(".json")}
    assert done_before

    prepare(cfg(mixed_inputs, ref, wordpiece_dir, unit_mb))
    with open(ref / "plan.json") as f:
        n_units = len(json.load(f)["units"])
    assert len(done_before) < n_units
    r = run_cli(*args)
    m = re.search(r"from (\d+) units \((\d+) resumed\)", r.stderr)
    assert m and int(m.group(1)) == n_units
    assert len(done_before) <= int(m.group(2)) < n_units
    assert tmp_leftovers(out) == []
    assert_same_dataset(ref, out)
    assert validate(str(out)) == []


# -- re-running with other settings -----------------------------------------------------------------------------

def test_rerun_with_other_settings_is_refused_then_overwritten(tmp_path, mixed_inputs, wordpiece_dir,
                                                               sentencepiece_model):
    out = tmp_path / "out"
    prepare(cfg(mixed_inputs, out, wordpiece_dir, 0.03))
    before = (out / "manifest.json").read_bytes()

    with pytest.raises(PrepareError, match=r"differs in: tokenizer \(another vocabulary or normalisation\)"):
        prepare(cfg(mixed_inputs, out, sentencepiece_model, 0.03))
    with pytest.raises(PrepareError, match=r"differs in: settings\.unit_bytes, units"):
        prepare(cfg(mixed_inputs, out, wordpiece_dir, 0.05))
    with pytest.raises(PrepareError, match=r"differs in: sources"):
        prepare(cfg(mixed_inputs[:-1], out, wordpiece_dir, 0.03))

    args = cli_args(mixed_inputs, out, wordpiece_dir, 0.05)
    args[args.index("--valid-fraction") + 1] = "0.3"
    r = run_cli(*args, check=False)
    assert r.returncode == 1, r.stderr
    assert "differs in: settings.unit_bytes, settings.valid_fraction, units" in r.stderr
    assert "--overwrite" in r.stderr
    assert (out / "manifest.json").read_bytes() == before  # untouched

    r = run_cli(*args, "--overwrite")
    with open(out / "manifest.json") as f:
        m = json.load(f)
    assert m["settings"]["valid_fraction"] == 0.3
    assert m["settings"]["unit_bytes"] == int(0.05 * (1 << 20))
    n = len(m["shards"]["train"])
    assert sorted(os.listdir(out / "units")) == [f"{u:06d}.json" for u in range(n)]  # old units gone
    assert sorted(os.listdir(out / "train")) == sorted(f"{u:06d}.{e}" for u in range(n) for e in ("bin", "idx"))
    assert validate(str(out)) == []
