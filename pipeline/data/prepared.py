"""Read a prepared dataset (docs/data_format.md): random access to documents and tokens, memory-mapped.

    ds = PreparedDataset("data/wiki", split="train", tokenizer="bert-base-uncased")
    len(ds), ds.n_tokens        # documents and tokens in the split
    ds[i]                       # document i: a read-only numpy view of its token ids (zero-copy)
    ds.tokens(a, b)             # tokens a..b of the split as one stream (documents back to back)
    ds.doc_lengths()            # tokens per document, int64
    ds.token_counts()           # training-token count per vocabulary id (for MLM masking smoothing)

Opening checks the format version, the tokenizer (when given), and every shard's size and index bounds;
`verify="full"` also checks every sha256 (rank 0 of a training job does this once).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Iterator

import numpy as np

from pipeline import shards as fmt
from pipeline.fileio import file_digest


class DatasetError(ValueError):
    """The prepared dataset is missing, corrupt, of an unknown version, or made with another tokenizer."""


def _rebuild_hint(path: str) -> str:
    return (f"re-run the preparation command recorded in {os.path.join(path, 'manifest.json')} ('command') into "
            f"the same --output: it re-verifies every unit and redoes the damaged ones")


class PreparedDataset:
    def __init__(self, path: str, split: str = "train", tokenizer=None, verify: str = "size", max_open: int = 64):
        if verify not in ("none", "size", "full"):
            raise ValueError(f"verify must be 'none', 'size' or 'full', not {verify!r}")
        self.path = os.path.abspath(path)
        manifest_path = os.path.join(self.path, "manifest.json")
        if not os.path.exists(manifest_path):
            hint = (" (a plan.json is there: the preparation has not finished or not been joined; run "
                    f"`python launch/prepare_data.py join {path}`)") if os.path.exists(
                os.path.join(self.path, "plan.json")) else ""
            raise DatasetError(f"{path}: no manifest.json, not a prepared dataset{hint}")
        try:
            with open(manifest_path) as f:
                self.manifest = json.load(f)
        except ValueError as e:
            raise DatasetError(f"{manifest_path}: unreadable manifest ({e})") from None
        version = self.manifest.get("format_version")
        if version != fmt.FORMAT_VERSION:
            raise DatasetError(f"{manifest_path}: format version {version!r}, but this code reads version "
                               f"{fmt.FORMAT_VERSION}; re-prepare the data with this version of the pipeline")
        if split not in self.manifest["shards"]:
            raise DatasetError(f"{path}: no split {split!r} (splits: {list(self.manifest['shards'])})")
        self.split = split
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.tokenizer_info = self.manifest["tokenizer"]
        self.vocab_size = int(self.tokenizer_info["vocab_size"])
        self.special_ids = self.tokenizer_info["special_ids"]
        self.shards = [s for s in self.manifest["shards"][split]]
        docs = np.array([s["docs"] for s in self.shards], np.int64)
        toks = np.array([s["tokens"] for s in self.shards], np.int64)
        self._doc_starts = np.concatenate([[0], np.cumsum(docs)])
        self._tok_starts = np.concatenate([[0], np.cumsum(toks)])
        self.n_docs = int(self._doc_starts[-1])
        self.n_tokens = int(self._tok_starts[-1])
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._max_open = max_open
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)
        self.check(verify)

    # -- checks -----------------------------------------------------------------------------------------------
    def check_tokenizer(self, tokenizer) -> None:
        """Raise unless `tokenizer` (a name/path, a loaded HF tokenizer, a TextTokenizer, or a fingerprint
        string) is the one the dataset was made with."""
        from pipeline.tokenization import TextTokenizer, load_tokenizer

        if isinstance(tokenizer, str) and len(tokenizer) == 64 and all(c in "0123456789abcdef" for c in tokenizer):
            fingerprint, name = tokenizer, "the given fingerprint"
        else:
            if isinstance(tokenizer, str):
                tok = load_tokenizer(tokenizer)
            elif isinstance(tokenizer, TextTokenizer):
                tok = tokenizer
            else:
                tok = TextTokenizer(getattr(tokenizer, "name_or_path", "tokenizer"), "huggingface", tokenizer)
            fingerprint, name = tok.info().fingerprint, tok.name_or_path
        mine = self.tokenizer_info["fingerprint"]
        if fingerprint != mine:
            raise DatasetError(
                f"{self.path} was prepared with tokenizer {self.tokenizer_info['name_or_path']!r} (fingerprint "
                f"{mine[:12]}, vocab {self.vocab_size}), which differs from {name!r} (fingerprint {fingerprint[:12]}): "
                f"token ids would mean different words. Prepare the data with the model's tokenizer "
                f"(--tokenizer), or use the tokenizer the data was made with.")

    def check(self, verify: str = "size") -> None:
        """Raise DatasetError naming what `verify` finds wrong: "size" (sizes and index bounds), "full" (also every
        sha256) or "none" (nothing)."""
        if verify == "none":
            return
        problems = self.verify(full=verify == "full")
        if problems:
            raise DatasetError(f"{self.path} ({self.split}) failed verification: " + "; ".join(problems[:10])
                               + f". To repair, {_rebuild_hint(self.path)}")

    def verify(self, full: bool = True) -> list[str]:
        """Problems found: file sizes, index bounds and order, and (full) sha256 of every file."""
        problems = []
        for s in self.shards:
            problems += [p for kind in ("bin", "idx")
                         if (p := fmt.check_file(self.path, s[kind], s[f"{kind}_bytes"], s[f"{kind}_sha256"], full))]
            if problems:
                continue
            if s["bin_bytes"] != s["tokens"] * self.dtype.itemsize or s["idx_bytes"] != (s["docs"] + 1) * 8:
                problems.append(f"{s['bin']}: sizes disagree with the manifest's document/token counts")
                continue
            idx = np.memmap(os.path.join(self.path, s["idx"]), fmt.INDEX_DTYPE, "r")
            if idx[0] != 0 or idx[-1] != s["tokens"] or (full and s["docs"] and np.any(np.diff(idx) < 0)):
                problems.append(f"{s['idx']}: document offsets inconsistent with {s['bin']}")
            del idx
        return problems

    # -- access -----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_docs

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._open.get(k)
        if arrays is not None:
            self._open.move_to_end(k)
            return arrays
        s = self.shards[k]
        idx = np.memmap(os.path.join(self.path, s["idx"]), fmt.INDEX_DTYPE, "r")
        if s["tokens"]:
            tokens = np.memmap(os.path.join(self.path, s["bin"]), self.dtype, "r", shape=(s["tokens"],))
        else:
            tokens = np.zeros(0, self.dtype)
        self._open[k] = (idx, tokens)
        if len(self._open) > self._max_open:  # each map holds a file descriptor
            self._open.popitem(last=False)
        return idx, tokens

    def _locate(self, i: int) -> tuple[int, int]:
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} out of range ({self.n_docs} documents in {self.split})")
        i %= self.n_docs
        k = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        return k, i - int(self._doc_starts[k])

    def __getitem__(self, i: int) -> np.ndarray:
        k, j = self._locate(int(i))
        idx, tokens = self._shard(k)
        return tokens[idx[j]:idx[j + 1]]

    doc = __getitem__

    def doc_length(self, i: int) -> int:
        k, j = self._locate(int(i))
        idx, _ = self._shard(k)
        return int(idx[j + 1] - idx[j])

    def doc_lengths(self) -> np.ndarray:
        out = np.empty(self.n_docs, np.int64)
        for k in range(len(self.shards)):
            idx, _ = self._shard(k)
            out[self._doc_starts[k]:self._doc_starts[k + 1]] = np.diff(idx)
        return out

    def doc_token_offset(self, i: int) -> int:
        """Position of document i's first token in the split's token stream (see `tokens`)."""
        k, j = self._locate(int(i))
        idx, _ = self._shard(k)
        return int(self._tok_starts[k] + idx[j])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream (all documents back to back, in order). A copy when the
        range crosses shards, else a zero-copy view."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.n_tokens})")
        parts = []
        k = int(np.searchsorted(self._tok_starts, start, side="right")) - 1
        while start < stop:
            _, toks = self._shard(k)
            lo = start - int(self._tok_starts[k])
            hi = min(stop, int(self._tok_starts[k + 1])) - int(self._tok_starts[k])
            parts.append(toks[lo:hi])
            start += hi - lo
            k += 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def iter_docs(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        stop = self.n_docs if stop is None else stop
        for i in range(start, stop):
            yield self[i]

    def iter_tokens(self, chunk: int = 1 << 20) -> Iterator[np.ndarray]:
        """The split's token stream in zero-copy chunks of at most `chunk` ids (never crossing a shard)."""
        for k in range(len(self.shards)):
            _, toks = self._shard(k)
            for a in range(0, len(toks), chunk):
                yield toks[a:a + chunk]

    def token_counts(self) -> np.ndarray:
        """Count of each vocabulary id over the training split (length vocab_size), checksum-verified."""
        tc = self.manifest["token_counts"]
        p = os.path.join(self.path, tc["file"])
        if not os.path.exists(p) or file_digest(p)["sha256"] != tc["sha256"]:
            raise DatasetError(f"{p}: missing or checksum mismatch; {_rebuild_hint(self.path)}")
        return np.load(p)

    def close(self) -> None:
        self._open.clear()

    def __repr__(self) -> str:
        return (f"PreparedDataset({self.path!r}, split={self.split!r}: {self.n_docs:,} documents, "
                f"{self.n_tokens:,} tokens, {len(self.shards)} shards, {self.dtype.name})")
