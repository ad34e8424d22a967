"""The tokenizer as data preparation uses it: its identity and its encoder, loaded through transformers once and
then from a cache (below), and the flat arrays of ids a batch of documents becomes."""
from __future__ import annotations

import hashlib
import itertools
import json
import os

import numpy as np

from pipeline.fileio import atomic_write
from pipeline.tokenization import PROBES, Encoder, TokenizerInfo, load_tokenizer, single_threaded, token_dtype


def flat_ids(ids: list[list[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(all ids back to back as `dtype`, each document's id count) from per-document id lists."""
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lengths.sum())), lengths


# -- identity cache ----------------------------------------------------------------------------------------
# transformers' AutoTokenizer imports torch (through its configuration code): seconds of start-up, a measurable
# share of a preparation's wall time (docs/benchmarks/data_prep.md, ours / ours_cold). What preparation needs from
# a tokenizer is small and a pure function of the tokenizer's files and the library versions: its identity
# (TokenizerInfo) and, for a fast tokenizer, the serialised Rust tokenizer that encodes. So for a local folder it is
# cached, keyed by a hash of the folder's files (weights excluded) and the transformers and tokenizers versions. A
# hit encodes the probe strings with the rebuilt tokenizer and checks them against the cached ids.

CACHE_FORMAT = 2
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt", ".gguf")


class PrepTokenizer:
    """What data preparation needs of a tokenizer: its identity (`info()`) and its `encoder`."""

    def __init__(self, info: TokenizerInfo, encoder: Encoder, from_cache: bool = False):
        self._info = info
        self.encoder = encoder
        self.from_cache = from_cache
        self.name_or_path = info.name_or_path
        self.vocab_size = info.vocab_size
        self.dtype = token_dtype(info.vocab_size)

    def info(self) -> TokenizerInfo:
        return self._info


def identity_cache_dir() -> str:
    """$PIPELINE_CACHE_DIR/tokenizers, else $XDG_CACHE_HOME (default ~/.cache)/distil-pipeline/tokenizers."""
    root = os.environ.get("PIPELINE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "distil-pipeline")
    return os.path.join(root, "tokenizers")


def _identity_key(folder: str) -> str | None:
    """Hash of the folder's non-weight files (names and bytes) and the library versions; None when the folder
    cannot be read or a version is unknown (no caching then)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        h = hashlib.sha256(json.dumps([CACHE_FORMAT, version("transformers"), version("tokenizers")]).encode())
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not name.endswith(_WEIGHT_SUFFIXES):
                with open(path, "rb") as f:
                    data = f.read()
                h.update(f"{name}\0{len(data)}\0".encode() + data)
    except (OSError, PackageNotFoundError):
        return None
    return h.hexdigest()


def _from_cache(path: str, name_or_path: str, threads: bool) -> PrepTokenizer | None:
    """The cached tokenizer, or None when the entry is missing, unreadable or encodes the probes otherwise."""
    from tokenizers import Tokenizer

    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
        encoder = Encoder("fast", Tokenizer.from_str(entry["backend"]), threads)
        if entry["format"] != CACHE_FORMAT or encoder(PROBES) != entry["probe_ids"]:
            return None
        return PrepTokenizer(TokenizerInfo(**{**entry["info"], "name_or_path": name_or_path}), encoder, True)
    except Exception:  # unreadable, stale or from another tokenizers version: load the real tokenizer
        return None


def load_prep_tokenizer(name_or_path: str, threads: bool = True) -> PrepTokenizer:
    """The tokenizer for data preparation: `load_tokenizer`'s identity and encoder, or for a local folder
    holding a fast tokenizer its identity-cache entry (see above). A cache that cannot be read or written is
    ignored: it only ever saves time."""
    if not threads:
        single_threaded()
    key = None if name_or_path.endswith(".model") or not os.path.isdir(name_or_path) else _identity_key(name_or_path)
    path = os.path.join(identity_cache_dir(), f"{key}.json") if key else None
    if path and os.path.isfile(path):
        cached = _from_cache(path, os.path.abspath(name_or_path), threads)
        if cached is not None:
            return cached
    tok = load_tokenizer(name_or_path, threads=threads)
    info = tok.info()
    if path and tok.encoder.kind == "fast":
        entry = {"format": CACHE_FORMAT, "backend": tok.encoder.impl.to_str(), "info": info.to_json(),
                 "probe_ids": tok.encode_batch(PROBES)}
        try:
            with atomic_write(path, "w") as f:
                json.dump(entry, f)
        except OSError:
            pass
    return PrepTokenizer(info, tok.encoder)
