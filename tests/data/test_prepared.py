"""The reader API of a prepared dataset: documents, token streams across shards, memory maps."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.data.prepared import DatasetError, PreparedDataset
from pipeline.data_prep.prepare import PrepareConfig, prepare
from pipeline.tokenization import load_tokenizer
from tests.conftest import write_text_docs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, sample_texts, wordpiece_dir):
    """~100 KB of real text in ~10 units (shards), 20% of the documents in valid; and the expected ids."""
    d = tmp_path_factory.mktemp("reader")
    docs = ["\n".join(line for line in t.split("\n") if line.strip()) for t in sample_texts[:100]]
    write_text_docs(d / "docs.txt", docs)
    out = d / "out"
    manifest = prepare(PrepareConfig(inputs=[str(d / "docs.txt")], output=str(out), tokenizer=wordpiece_dir,
                                     unit_mb=0.01, valid_fraction=0.2, progress=False))
    tok = load_tokenizer(wordpiece_dir)
    expected = {s: [] for s in ("train", "valid")}
    for shard_t, shard_v in zip(manifest["shards"]["train"], manifest["shards"]["valid"]):
        for split, shard in (("train", shard_t), ("valid", shard_v)):
            ids = np.fromfile(out / shard["bin"], "<u2")
            idx = np.fromfile(out / shard["idx"], "<i8")
            expected[split] += [ids[a:b].tolist() for a, b in zip(idx[:-1], idx[1:])]
    # the shards hold the tokenized input documents, in order
    assert sorted(expected["train"] + expected["valid"]) == sorted(tok.encode_batch(docs))
    return out, manifest, expected


def test_length_and_documents(dataset):
    out, manifest, expected = dataset
    for split in ("train", "valid"):
        ds = PreparedDataset(out, split)
        docs = expected[split]
        assert len(ds) == ds.n_docs == len(docs) == manifest["totals"][split]["documents"]
        assert ds.n_tokens == sum(map(len, docs)) == manifest["totals"][split]["tokens"]
        assert len(ds.shards) == len(manifest["shards"][split]) >= 8
        assert ds.vocab_size == 30522 and ds.dtype == np.dtype("<u2")
        assert ds.special_ids["cls"] == 101
        for i in range(len(ds)):
            assert ds[i].tolist() == docs[i]
            assert ds.doc(i).tolist() == docs[i]
        assert ds[np.int64(3)].tolist() == docs[3]
        assert f"{len(ds):,} documents" in repr(ds) and split in repr(ds)


def test_negative_and_out_of_range_indices(dataset):
    out, _, expected = dataset
    ds = PreparedDataset(out)
    n = len(ds)
    assert ds[-1].tolist() == expected["train"][-1]
    assert ds[-n].tolist() == expected["train"][0]
    assert ds[-5].tolist() == expected["train"][n - 5]
    assert ds.doc_length(-1) == len(expected["train"][-1])
    for bad in (n, n + 10, -n - 1):
        with pytest.raises(IndexError, match="out of range"):
            ds[bad]
        with pytest.raises(IndexError):
            ds.doc_length(bad)
        with pytest.raises(IndexError):
            ds.doc_token_offset(bad)


def test_doc_lengths(dataset):
    out, _, expected = dataset
    ds = PreparedDataset(out)
    lengths = ds.doc_lengths()
    assert lengths.dtype == np.int64
    assert lengths.tolist() == [len(d) for d in expected["train"]]
    assert [ds.doc_length(i) for i in range(len(ds))] == lengths.tolist()


def test_tokens_across_shards(dataset):
    out, _, expected = dataset
    ds = PreparedDataset(out)
    stream = np.array([t for d in expected["train"] for t in d], np.uint16)
    n = ds.n_tokens
    np.testing.assert_array_equal(ds.tokens(0, n), stream)
    bounds = np.cumsum([s["tokens"] for s in ds.shards])
    # ranges around every shard boundary, one spanning several shards, and empty ones
    for b in bounds[:-1]:
        for a, z in ((b - 5, b + 5), (b - 1, b), (b, b + 1), (b - 300, b + 2000)):
            a, z = max(0, int(a)), min(n, int(z))
            np.testing.assert_array_equal(ds.tokens(a, z), stream[a:z])
    np.testing.assert_array_equal(ds.tokens(10, n - 10), stream[10:n - 10])
    assert len(ds.tokens(7, 7)) == 0 and len(ds.tokens(n, n)) == 0
    rng = np.random.default_rng(0)
    for _ in range(100):
        a, z = sorted(int(x) for x in rng.integers(0, n + 1, size=2))
        np.testing.assert_array_equal(ds.tokens(a, z), stream[a:z])
    for a, z in ((-1, 5), (0, n + 1), (10, 5)):
        with pytest.raises(IndexError, match="token range"):
            ds.tokens(a, z)


def test_iterators(dataset):
    out, _, expected = dataset
    ds = PreparedDataset(out)
    whole = ds.tokens(0, ds.n_tokens)
    chunks = list(ds.iter_tokens(chunk=1000))
    assert all(0 < len(c) <= 1000 for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), whole)
    np.testing.assert_array_equal(np.concatenate(list(ds.iter_tokens())), whole)
    # chunks never cross a shard: a new chunk starts at every shard boundary
    starts = set(np.cumsum([0] + [len(c) for c in chunks]).tolist())
    assert set(np.cumsum([s["tokens"] for s in ds.shards]).tolist()) <= starts
    assert [d.tolist() for d in ds.iter_docs()] == expected["train"]
    assert [d.tolist() for d in ds.iter_docs(3, 9)] == expected["train"][3:9]
    assert list(ds.iter_docs(5, 5)) == []


def test_doc_token_offset(dataset):
    out, _, expected = dataset
    ds = PreparedDataset(out)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in expected["train"]])[:-1]])
    assert [ds.doc_token_offset(i) for i in range(len(ds))] == offsets.tolist()
    for i in (0, 1, len(ds) // 2, len(ds) - 1, -1):
        off = ds.doc_token_offset(i)
        np.testing.assert_array_equal(ds.tokens(off, off + ds.doc_length(i)), ds[i])


def test_views_are_read_only(dataset):
    out, _, _ = dataset
    ds = PreparedDataset(out)
    doc = ds[0]
    assert not doc.flags.writeable
    with pytest.raises(ValueError):
        doc[0] = 1
    view = ds.tokens(0, 5)  # within a shard: a zero-copy view
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[:] = 0
    with pytest.raises(ValueError):
        next(ds.iter_tokens())[0] = 1
    assert ds[0][0] == doc[0]  # nothing was written


def test_max_open_lru(dataset):
    out, _, expected = dataset
    ds = PreparedDataset(out, max_open=1)
    order = np.random.default_rng(0).permutation(len(ds))
    for i in order:
        assert ds[int(i)].tolist() == expected["train"][i]
        assert len(ds._open) == 1
    np.testing.assert_array_equal(ds.tokens(0, ds.n_tokens), np.concatenate([np.array(d, np.uint16)
                                                                              for d in expected["train"]]))
    assert ds.doc_lengths().tolist() == [len(d) for d in expected["train"]]

    # least recently used is evicted, not first opened
    ds = PreparedDataset(out, max_open=2)
    first = {k: int(ds._doc_starts[k]) for k in range(3) if ds.shards[k]["docs"]}
    assert len(first) == 3
    ds[first[0]], ds[first[1]], ds[first[0]], ds[first[2]]
    assert list(ds._open) == [0, 2]
    ds.close()
    assert len(ds._open) == 0
    assert ds[first[1]].tolist() == expected["train"][first[1]]


def test_empty_valid_split(tmp_path, sample_texts, wordpiece_dir):
    write_text_docs(tmp_path / "docs.txt", [t.replace("\n", " ") for t in sample_texts[:30]])
    out = tmp_path / "out"
    manifest = prepare(PrepareConfig(inputs=[str(tmp_path / "docs.txt")], output=str(out), tokenizer=wordpiece_dir,
                                     unit_mb=0.01, valid_fraction=0.0, progress=False))
    assert manifest["totals"]["valid"] == {"documents": 0, "tokens": 0}
    valid = PreparedDataset(out, "valid", verify="full")
    assert len(valid) == 0 and valid.n_tokens == 0
    assert len(valid.shards) == len(manifest["shards"]["train"]) >= 2  # empty shards, one per unit
    assert valid.doc_lengths().tolist() == []
    assert len(valid.tokens(0, 0)) == 0
    assert list(valid.iter_tokens()) == [] and list(valid.iter_docs()) == []
    with pytest.raises(IndexError):
        valid[0]
    with pytest.raises(IndexError):
        valid[-1]
    train = PreparedDataset(out, "train", verify="full")
    assert len(train) == 30


def test_bad_arguments(dataset):
    out, manifest, _ = dataset
    with pytest.raises(DatasetError, match=r"no split 'test' \(splits: \['train', 'valid'\]\)"):
        PreparedDataset(out, "test")
    with pytest.raises(ValueError, match="verify must be"):
        PreparedDataset(out, verify="sha")
    # a str path works as well as a Path
    assert len(PreparedDataset(str(out))) == manifest["totals"]["train"]["documents"]
    with open(out / "manifest.json") as f:
        assert json.load(f)["format_version"] == 1
