"""Fixed-length training sequences cut from a prepared split (whose documents carry no special tokens).

    seqs = SequenceDataset(PreparedDataset(path, "train"), 512, cls_id=101, sep_id=102, pad_id=0)
    len(seqs), seqs[i]          # samples, and sample i: int64 ids of length 512
    seqs.length(i)              # its non-pad tokens

Two ways to cut, both free of per-sample Python work at build time:

- "packed" (default): the split is read as one stream `doc0 [SEP] doc1 [SEP] ...` and sample i is `[CLS]` and
  the stream's tokens `i*(L-1) .. (i+1)*(L-1)`. No padding anywhere, so no attention mask is needed and SDPA
  can use its flash kernel (which takes no mask); documents share a sequence, as in RoBERTa's FULL-SENTENCES.
  The only index is the cumulative length of the documents (one int64 per document).
- "document": every sample stays inside one document: `[CLS] chunk [SEP] [PAD]...` with chunks of at most
  L-2 tokens; a document's last chunk is padded. One int64 start and one int32 length per sample.

Empty documents are skipped in both modes (in packed mode they would put two [SEP] side by side).
"""
from __future__ import annotations

import numpy as np

from .prepared import PreparedDataset

MODES = ("packed", "document")
MIN_SEQ_LEN = 8


class SequenceDataset:
    """Fixed-length training sequences (int64 numpy arrays of length seq_len) from a PreparedDataset split.

    Indexing is a pure function of the split and the arguments, so every rank and data-loader worker that
    opens the same split sees the same sample i; sample order (shuffling) is the loader's business.
    """

    def __init__(self, data: PreparedDataset, seq_len: int, mode: str = "packed", *, cls_id: int, sep_id: int,
                 pad_id: int):
        problems = []
        if not isinstance(seq_len, (int, np.integer)) or seq_len < MIN_SEQ_LEN:
            problems.append(f"seq_len must be an integer >= {MIN_SEQ_LEN}, got {seq_len!r}")
        if mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {mode!r}")
        vocab = getattr(data, "vocab_size", None)
        for name, value in (("cls_id", cls_id), ("sep_id", sep_id), ("pad_id", pad_id)):
            if value is None:
                problems.append(f"{name} is None: the tokenizer has no such special token; give one explicitly")
            elif not isinstance(value, (int, np.integer)) or value < 0 or (vocab is not None and value >= vocab):
                problems.append(f"{name} must be an id in [0, {vocab}), got {value!r}")
        if problems:
            raise ValueError("SequenceDataset: " + "; ".join(problems))
        self.data = data
        self.seq_len = int(seq_len)
        self.mode = mode
        self.cls_id, self.sep_id, self.pad_id = int(cls_id), int(sep_id), int(pad_id)
        lengths = np.asarray(data.doc_lengths(), np.int64)
        n_tokens = int(lengths.sum())
        where = f"split {getattr(data, 'split', '?')!r} of {getattr(data, 'path', data)!r}"
        nonempty = lengths[lengths > 0]
        if mode == "packed":
            # Stream position p of document d (among non-empty ones) is token p - d of data.tokens(): every
            # earlier document added exactly one [SEP]. So the cumulative sum is all the index we need.
            self._cum = np.concatenate([[0], np.cumsum(nonempty + 1)]).astype(np.int64)
            stream = int(self._cum[-1])
            self._n = stream // (self.seq_len - 1)
            if self._n == 0:
                raise ValueError(
                    f"{where} is too small for one packed sample: {n_tokens} tokens in {len(nonempty)} non-empty "
                    f"documents make a stream of {stream} tokens with separators, and seq_len={self.seq_len} needs "
                    f"{self.seq_len - 1} (plus [CLS]). Use a shorter seq_len or more data.")
        else:
            chunk = self.seq_len - 2
            doc_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            keep = lengths > 0
            doc_start, doc_len = doc_start[keep], lengths[keep]
            n_chunks = (doc_len + chunk - 1) // chunk
            self._n = int(n_chunks.sum())
            if self._n == 0:
                raise ValueError(f"{where} has no tokens ({len(lengths)} documents, all empty): document mode "
                                 f"needs at least one non-empty document")
            first = np.cumsum(n_chunks) - n_chunks
            doc_of = np.repeat(np.arange(len(doc_len)), n_chunks)
            k = np.arange(self._n, dtype=np.int64) - np.repeat(first, n_chunks)
            self._starts = doc_start[doc_of] + k * chunk
            self._lens = np.minimum(chunk, doc_len[doc_of] - k * chunk).astype(np.int32)
        self.n_tokens = n_tokens  # tokens of the split (without special tokens)

    def __len__(self) -> int:
        return self._n

    def _index(self, i) -> int:
        i = int(i)
        if not -self._n <= i < self._n:
            raise IndexError(f"sample {i} out of range ({self._n} samples)")
        return i % self._n

    def length(self, i: int) -> int:
        """Non-pad tokens of sample i (seq_len in packed mode)."""
        i = self._index(i)
        return self.seq_len if self.mode == "packed" else int(self._lens[i]) + 2

    def __getitem__(self, i: int) -> np.ndarray:
        i = self._index(i)
        L = self.seq_len
        out = np.empty(L, np.int64)
        out[0] = self.cls_id
        if self.mode == "document":
            a, n = int(self._starts[i]), int(self._lens[i])
            out[1:n + 1] = self.data.tokens(a, a + n)
            out[n + 1] = self.sep_id
            out[n + 2:] = self.pad_id
            return out
        s, e = i * (L - 1), (i + 1) * (L - 1)
        cum = self._cum
        d0 = int(np.searchsorted(cum, s, side="right")) - 1
        d1 = int(np.searchsorted(cum, e - 1, side="right")) - 1
        seps = cum[d0 + 1:d1 + 2] - 1  # the [SEP] closing each document that the window touches
        seps = seps[seps < e] - s
        body = out[1:]
        is_sep = np.zeros(L - 1, bool)
        is_sep[seps] = True
        body[is_sep] = self.sep_id
        body[~is_sep] = self.data.tokens(s - d0, s - d0 + (L - 1) - len(seps))
        return out

    # Workers started by spawn/forkserver (Python >= 3.14's default on Linux) receive a pickled copy. A pickled
    # np.memmap is a full in-memory copy of the shard, so send the dataset's address instead and re-open it.
    def __getstate__(self):
        state = self.__dict__.copy()
        if isinstance(self.data, PreparedDataset):
            state["data"] = ("PreparedDataset", self.data.path, self.data.split)
        return state

    def __setstate__(self, state):
        data = state["data"]
        if isinstance(data, tuple) and data and data[0] == "PreparedDataset":
            state["data"] = PreparedDataset(data[1], data[2], verify="none")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"SequenceDataset({self.mode}, seq_len={self.seq_len}: {self._n:,} samples from "
                f"{self.n_tokens:,} tokens)")
