"""Training sequences from prepared data: packed streams and per-document chunks, checked against a plain
re-implementation on real WordPiece data (several shards) and on synthetic edge cases."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.data.prepared import PreparedDataset
from pipeline.data.sequences import SequenceDataset
from pipeline.data_prep.prepare import PrepareConfig, prepare
from tests.conftest import write_text_docs

CLS, SEP, PAD = 101, 102, 0
_BUILT: dict = {}


def build_prepared(tmp_path_factory, sample_texts, wordpiece_dir) -> str:
    """~40 KB of real English (sections of the embedded sample) prepared with bert-base-uncased's WordPiece into
    several shards, 20% in valid. Built once per session and shared by the data tests."""
    if "path" not in _BUILT:
        d = tmp_path_factory.mktemp("sequences")
        docs = ["\n".join(line for line in t.split("\n") if line.strip()) for t in sample_texts[:80]]
        write_text_docs(d / "docs.txt", docs)
        prepare(PrepareConfig(inputs=[str(d / "docs.txt")], output=str(d / "out"), tokenizer=wordpiece_dir,
                              unit_mb=0.01, valid_fraction=0.2, progress=False))
        _BUILT["path"] = str(d / "out")
    return _BUILT["path"]


class ListData:
    """A stand-in for PreparedDataset over documents in memory (only what SequenceDataset reads)."""

    def __init__(self, docs, vocab_size=1000):
        self.docs = [np.asarray(d, np.uint16) for d in docs]
        self.vocab_size = vocab_size
        self.split, self.path = "train", "memory"
        self.special_ids = {"pad": PAD, "unk": 100, "cls": CLS, "sep": SEP, "mask": 103}
        self._stream = np.concatenate(self.docs + [np.zeros(0, np.uint16)])

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return self.docs[i]

    def doc_lengths(self):
        return np.array([len(d) for d in self.docs], np.int64)

    def tokens(self, a, b):
        assert 0 <= a <= b <= len(self._stream)
        return self._stream[a:b]


def reference_packed(docs, L):
    stream = [t for d in docs if len(d) for t in [*map(int, d), SEP]]
    n = len(stream) // (L - 1)
    return [[CLS] + stream[i * (L - 1):(i + 1) * (L - 1)] for i in range(n)]


def reference_document(docs, L):
    out = []
    for d in docs:
        d = list(map(int, d))
        for a in range(0, len(d), L - 2):
            chunk = d[a:a + L - 2]
            out.append([CLS] + chunk + [SEP] + [PAD] * (L - 2 - len(chunk)))
    return out


def make(data, L, mode="packed"):
    return SequenceDataset(data, L, mode, cls_id=CLS, sep_id=SEP, pad_id=PAD)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, sample_texts, wordpiece_dir):
    return build_prepared(tmp_path_factory, sample_texts, wordpiece_dir)


@pytest.mark.parametrize("L", [8, 37, 128, 512])
def test_packed_reproduces_the_stream(prepared, L):
    ds = PreparedDataset(prepared, "train")
    assert len(ds.shards) >= 4
    docs = [ds[i] for i in range(len(ds))]
    seqs = make(ds, L)
    expected = reference_packed(docs, L)
    assert len(seqs) == len(expected) == (ds.n_tokens + len(ds)) // (L - 1)
    got = [seqs[i] for i in range(len(seqs))]
    assert all(s.dtype == np.int64 and s.shape == (L,) for s in got)
    assert [s.tolist() for s in got] == expected
    assert all(s[0] == CLS and PAD not in s[1:] and seqs.length(i) == L for i, s in enumerate(got))
    # concatenated without their [CLS], the samples are the documents joined by [SEP], dropping only a short tail
    body = np.concatenate([s[1:] for s in got])
    stream = np.concatenate([np.append(d.astype(np.int64), SEP) for d in docs])
    np.testing.assert_array_equal(body, stream[:len(body)])
    assert len(stream) - len(body) < L - 1
    # random access in any order, negative indices
    np.testing.assert_array_equal(seqs[-1], got[-1])
    with pytest.raises(IndexError, match="out of range"):
        seqs[len(seqs)]


@pytest.mark.parametrize("L", [8, 64, 300])
def test_document_mode_chunks_and_pads(prepared, L):
    ds = PreparedDataset(prepared, "valid")
    docs = [ds[i] for i in range(len(ds))]
    seqs = make(ds, L, "document")
    expected = reference_document(docs, L)
    assert len(seqs) == len(expected)
    for i, exp in enumerate(expected):
        s = seqs[i]
        assert s.dtype == np.int64 and s.tolist() == exp
        n = seqs.length(i)
        assert s[n - 1] == SEP and np.all(s[n:] == PAD) and np.all(s[:n] != PAD)
    # the chunks of each document, in order, give the document back
    rebuilt, i = [], 0
    for d in docs:
        parts = []
        while sum(map(len, parts)) < len(d):
            parts.append(seqs[i][1:seqs.length(i) - 1])
            i += 1
        rebuilt.append(np.concatenate(parts))
    assert all(np.array_equal(a, b) for a, b in zip(rebuilt, docs)) and i == len(seqs)


def test_synthetic_edge_cases_against_reference():
    """Empty documents, documents of exactly L-1 / L-2 / L tokens, and many random layouts."""
    rng = np.random.default_rng(0)
    layouts = [[[5] * 6, [], [7] * 7, [], [], [9] * 8, [11] * 1], [[3] * 14], [[4] * 7, [6] * 6, [8] * 8]]
    for _ in range(200):
        layouts.append([rng.integers(200, 999, rng.choice([0, 1, 2, 5, 9, 30])) for _ in range(rng.integers(1, 12))])
    checked = 0
    for docs in layouts:
        for L in (8, 9, 10, 16):
            for mode, reference in (("packed", reference_packed), ("document", reference_document)):
                expected = reference(docs, L)
                if not expected:
                    with pytest.raises(ValueError, match="too small|no tokens"):
                        make(ListData(docs), L, mode)
                    continue
                seqs = make(ListData(docs), L, mode)
                assert [seqs[i].tolist() for i in range(len(seqs))] == expected
                checked += 1
    assert checked > 1000
    # empty documents never produce two [SEP]s in a row or empty chunks
    seqs = make(ListData(layouts[0]), 8)
    body = np.concatenate([seqs[i][1:] for i in range(len(seqs))])
    assert not np.any((body[1:] == SEP) & (body[:-1] == SEP))
    assert all(make(ListData(layouts[0]), 8, "document").length(i) > 2 for i in range(4))


def test_large_index_is_vectorised():
    """A million documents index in one pass and sample lookups are binary searches (no per-token Python)."""

    class Big(ListData):
        def __init__(self):
            self.vocab_size, self.split, self.path = 30522, "train", "big"
            self.lengths = np.random.default_rng(1).integers(0, 400, 1_000_000)
            self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])

        def doc_lengths(self):
            return self.lengths

        def tokens(self, a, b):  # token t of the stream has id 1000 + t % 20000: checkable without storing it
            return (1000 + np.arange(a, b) % 20000).astype(np.uint16)

    data = Big()
    packed = make(data, 512)
    assert packed._cum.dtype == np.int64 and len(packed._cum) == np.count_nonzero(data.lengths) + 1
    for i in (0, 1, len(packed) // 2, len(packed) - 1):
        s = packed[i]
        raw = s[1:][s[1:] != SEP]
        first = i * 511 - (np.searchsorted(packed._cum, i * 511, side="right") - 1)
        np.testing.assert_array_equal(raw, 1000 + (first + np.arange(len(raw))) % 20000)
    doc = make(data, 128, "document")
    assert len(doc) == int(((data.lengths + 125) // 126).sum())
    last = doc[len(doc) - 1]
    assert last[doc.length(len(doc) - 1) - 1] == SEP


def test_pickle_reopens_instead_of_copying(prepared):
    """DataLoader workers started by spawn/forkserver get a pickled dataset: it must not carry the shards."""
    seqs = make(PreparedDataset(prepared, "train"), 64)
    for i in range(len(seqs)):  # open every shard's memory map
        seqs[i]
    blob = pickle.dumps(seqs)
    assert len(blob) < 20_000 < seqs.data.n_tokens * 2
    copy = pickle.loads(blob)
    assert isinstance(copy.data, PreparedDataset) and len(copy) == len(seqs)
    for i in (0, 7, len(seqs) - 1):
        np.testing.assert_array_equal(copy[i], seqs[i])


def test_bad_arguments(prepared):
    ds = PreparedDataset(prepared, "valid")
    with pytest.raises(ValueError, match="seq_len must be an integer >= 8, got 7"):
        make(ds, 7)
    with pytest.raises(ValueError, match=r"mode must be one of \('packed', 'document'\), got 'pack'"):
        make(ds, 64, "pack")
    with pytest.raises(ValueError, match="cls_id is None"):
        SequenceDataset(ds, 64, cls_id=None, sep_id=SEP, pad_id=PAD)
    with pytest.raises(ValueError, match=r"sep_id must be an id in \[0, 30522\)"):
        SequenceDataset(ds, 64, cls_id=CLS, sep_id=30522, pad_id=PAD)
    too_long = ds.n_tokens + len(ds) + 2
    with pytest.raises(ValueError, match=rf"{ds.n_tokens} tokens in {len(ds)} non-empty documents make a stream of "
                                         rf"{ds.n_tokens + len(ds)} tokens .* needs {too_long - 1}"):
        make(ds, too_long)
    with pytest.raises(ValueError, match="all empty"):
        make(ListData([[], []]), 16, "document")
