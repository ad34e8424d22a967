"""Damaged datasets are caught, by the reader and by `prepare_data.py validate`, with messages that say what
and where; and re-running the preparation repairs them."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from pipeline.data.prepared import DatasetError, PreparedDataset
from pipeline.data.validate import validate
from pipeline.data_prep.prepare import PrepareConfig, prepare
from tests.conftest import run_cli, write_text_docs


def clean_docs(texts: list[str]) -> list[str]:
    return ["\n".join(line for line in t.split("\n") if line.strip()) for t in texts]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, sample_texts, wordpiece_dir):
    d = tmp_path_factory.mktemp("corrupt")
    docs = clean_docs(sample_texts)[:120]
    write_text_docs(d / "docs.txt", docs)
    cfg = PrepareConfig(inputs=[str(d / "docs.txt")], output=str(d / "out"), tokenizer=wordpiece_dir, unit_mb=0.03,
                        valid_fraction=0.2, progress=False)
    manifest = prepare(cfg)
    assert len(manifest["shards"]["train"]) >= 3 and manifest["totals"]["valid"]["documents"] > 0
    assert validate(cfg.output) == []
    return d / "out", cfg


@pytest.fixture
def dataset(prepared, tmp_path):
    """A fresh copy of the prepared dataset to damage."""
    src, _ = prepared
    out = tmp_path / "ds"
    shutil.copytree(src, out)
    return out


def file_bytes(out) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.parent.name in ("train", "valid", "counts")}


def validate_cli(out, *extra):
    return run_cli("validate", out, *extra, check=False)


def test_flipped_byte_found_by_checksums_not_by_sizes(dataset, prepared):
    rel = "train/000001.bin"
    path = dataset / rel
    ids = np.fromfile(path, "<u2")
    pos = len(ids) // 2
    ids[pos] = (int(ids[pos]) + 1) % 30522  # still a valid token id: only the checksum can tell
    ids.tofile(path)

    with pytest.raises(DatasetError) as e:
        PreparedDataset(dataset, verify="full")
    assert f"{rel}: checksum mismatch" in str(e.value) and "re-run the preparation" in str(e.value)
    # documented: the default size check does not read the data, so it does not see this
    ds = PreparedDataset(dataset, verify="size")
    assert len(ds) > 0
    # other splits are not affected
    PreparedDataset(dataset, "valid", verify="full")

    assert any(p.startswith(f"train: {rel}: checksum mismatch") for p in validate(str(dataset)))
    r = validate_cli(dataset)
    assert r.returncode == 1
    assert f"{rel}: checksum mismatch" in r.stderr and "1 problem(s)" in r.stderr
    assert validate_cli(dataset, "--fast").returncode == 0  # sizes and indexes only, as documented

    # the repair the message suggests: re-run the same preparation into the folder
    _, cfg = prepared
    prepare(PrepareConfig(**{**cfg.__dict__, "output": str(dataset)}))
    assert file_bytes(dataset) == file_bytes(prepared[0])
    assert validate(str(dataset)) == []


@pytest.mark.parametrize("rel,split", [("train/000000.bin", "train"), ("train/000002.idx", "train"),
                                       ("valid/000001.idx", "valid"), ("valid/000000.bin", "valid")])
def test_truncated_shard_file(dataset, rel, split):
    path = dataset / rel
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 8)
    other = "valid" if split == "train" else "train"
    with pytest.raises(DatasetError) as e:
        PreparedDataset(dataset, split)  # default verify="size"
    assert f"{rel}: {size - 8} bytes, expected {size} (truncated or replaced)" in str(e.value)
    assert len(PreparedDataset(dataset, other)) > 0  # each split checks its own shards
    r = validate_cli(dataset, "--fast")
    assert r.returncode == 1 and f"{split}: {rel}: {size - 8} bytes, expected {size}" in r.stderr


def test_missing_shard_file(dataset):
    (dataset / "train" / "000002.bin").unlink()
    with pytest.raises(DatasetError, match=r"train/000002\.bin: missing"):
        PreparedDataset(dataset)
    assert "train: train/000002.bin: missing" in validate(str(dataset))


def test_index_inconsistent_with_tokens_same_size(dataset):
    """A wrong last offset in .idx is caught by the cheap default check, without checksums."""
    path = dataset / "train" / "000000.idx"
    idx = np.fromfile(path, "<i8")
    idx[-1] -= 1
    idx.tofile(path)
    with pytest.raises(DatasetError, match=r"train/000000\.idx: document offsets inconsistent with train/000000\.bin"):
        PreparedDataset(dataset, verify="size")
    assert validate_cli(dataset).returncode == 1


def edit_manifest(out, fn) -> None:
    with open(out / "manifest.json") as f:
        m = json.load(f)
    fn(m)
    with open(out / "manifest.json", "w") as f:
        json.dump(m, f)


def test_unknown_format_version(dataset):
    edit_manifest(dataset, lambda m: m.update(format_version=99))
    with pytest.raises(DatasetError, match=r"format version 99, but this code reads version 1"):
        PreparedDataset(dataset)
    r = validate_cli(dataset)
    assert r.returncode == 1 and "format version 99" in r.stderr
    edit_manifest(dataset, lambda m: m.pop("format_version"))
    with pytest.raises(DatasetError, match=r"format version None"):
        PreparedDataset(dataset, verify="none")


def test_unreadable_manifest(dataset):
    (dataset / "manifest.json").write_text('{"format_version": 1, "shards": {"tra')
    with pytest.raises(DatasetError, match="unreadable manifest"):
        PreparedDataset(dataset)


def test_missing_manifest_says_run_join(dataset, tmp_path):
    (dataset / "manifest.json").unlink()
    with pytest.raises(DatasetError) as e:
        PreparedDataset(dataset)
    assert "no manifest.json" in str(e.value)
    assert f"launch/prepare_data.py join {dataset}" in str(e.value)
    r = validate_cli(dataset)
    assert r.returncode == 1 and "join" in r.stderr
    # and join does write it back
    run_cli("join", dataset)
    assert validate(str(dataset)) == []

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as e:
        PreparedDataset(tmp_path / "empty")
    assert "not a prepared dataset" in str(e.value) and "join" not in str(e.value)


def test_altered_token_counts(dataset):
    path = dataset / "token_counts.npy"
    counts = np.load(path)
    counts[1012] += 1  # "." : a plausible, same-size change
    np.save(path, counts)
    ds = PreparedDataset(dataset, verify="full")  # shards are fine
    with pytest.raises(DatasetError, match=r"token_counts\.npy: missing or checksum mismatch"):
        ds.token_counts()
    r = validate_cli(dataset)
    assert r.returncode == 1 and "token_counts.npy" in r.stderr

    path.unlink()
    with pytest.raises(DatasetError, match="missing or checksum mismatch"):
        ds.token_counts()


def test_token_counts_consistent_with_checksum_but_wrong(dataset):
    """Counts that were rewritten with a matching checksum but do not match the tokens: validate recounts."""
    path = dataset / "token_counts.npy"
    counts = np.load(path)
    counts[1012] += 1
    np.save(path, counts)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    edit_manifest(dataset, lambda m: m["token_counts"].update(sha256=digest))
    assert np.array_equal(PreparedDataset(dataset).token_counts(), counts)
    assert "token_counts.npy does not match a recount of the training tokens" in validate(str(dataset))


def test_token_id_outside_vocabulary(dataset):
    """Ids out of the vocabulary written with matching sizes and checksums: validate checks the ids."""
    rel = "valid/000000.bin"
    ids = np.fromfile(dataset / rel, "<u2")
    ids[0] = 40000
    ids.tofile(dataset / rel)
    digest = hashlib.sha256((dataset / rel).read_bytes()).hexdigest()
    edit_manifest(dataset, lambda m: m["shards"]["valid"][0].update(bin_sha256=digest))
    assert f"{rel}: token id 40000 >= vocabulary size 30522" in validate(str(dataset))
