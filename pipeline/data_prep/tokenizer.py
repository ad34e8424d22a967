"""Tokenizers for data preparation: Hugging Face (fast or slow) and SentencePiece, behind one interface.

A prepared dataset records the identity of the tokenizer that made it. The identity is behavioural, not a
path or a serialisation: the vocabulary (id -> token), the special-token ids, and the ids the tokenizer
produces for a fixed set of probe strings (casing, accents, CJK, punctuation, whitespace, special tokens).
So `bert-base-uncased` from the hub and a local copy of the same files agree, and two tokenizers that
share a vocabulary but normalise differently (cased vs uncased) do not.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pipeline.fileio import atomic_write

# Probe strings for the behavioural fingerprint. Changing them changes every fingerprint: don't.
_PROBES = (
    "Hello, World! The quick brown fox jumps over the lazy dog.",
    "HELLO world MiXeD CaSe",
    "naïve café résumé Ångström Straße façade",
    "日本語のテキストと中文文本",
    "don't can't won't 3.14159 $1,000,000 e-mail @user #tag",
    "  multiple   spaces\tand\ttabs\nand\nnewlines  ",
    "unbelievably antidisestablishmentarianism pneumonoultramicroscopic",
    "[CLS] [SEP] [MASK] [PAD] <s> </s> <mask> <pad> <unk>",
    "emoji 🙂🚀 and symbols © ® ™ — – … «»",
)


class TokenizerLoadError(RuntimeError):
    """The tokenizer could not be loaded; the message says what was tried and how to fix it."""


@dataclass
class TokenizerInfo:
    """What a prepared dataset records about its tokenizer (see docs/data_format.md)."""

    name_or_path: str
    kind: str  # "huggingface" or "sentencepiece"
    vocab_size: int
    special_ids: dict = field(default_factory=dict)
    vocab_fingerprint: str = ""
    fingerprint: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (ids < 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def single_threaded() -> None:
    """Keep this process's tokenizer on one core (data-prep workers are one process per core). Must run before
    the Rust thread pool is first used in the process."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("RAYON_NUM_THREADS", "1")


class Encoder:
    """Ids of a batch of texts, without special tokens (the trainer adds [CLS]/[SEP] when it builds
    sequences): one call of the tokenizer per batch. Picklable, so that data-preparation workers get it from
    the process that loaded the tokenizer. For a fast Hugging Face tokenizer it holds the Rust
    `tokenizers.Tokenizer` alone (a private copy without truncation or padding: documents are stored whole),
    so a worker needs neither transformers nor torch."""

    def __init__(self, kind: str, impl, threads: bool = True):
        self.kind = kind  # "fast" (tokenizers.Tokenizer), "slow" (a transformers tokenizer) or "sentencepiece"
        self.impl = impl
        self.threads = threads

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "fast":
            encode = getattr(self.impl, "encode_batch_fast", None) or self.impl.encode_batch  # fast: no offsets
            return [e.ids for e in encode(list(texts), add_special_tokens=False)]
        if self.kind == "slow":
            return self.impl(list(texts), add_special_tokens=False)["input_ids"]
        return self.impl.encode(list(texts), out_type=int, num_threads=0 if self.threads else 1)


def flat_ids(ids: list[list[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(all ids back to back as `dtype`, each document's id count) from per-document id lists."""
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lengths.sum())), lengths


class TextTokenizer:
    """A loaded tokenizer: encodes (`encoder`), decodes, and knows its identity (`info`)."""

    def __init__(self, name_or_path: str, kind: str, impl, threads: bool = True):
        self.name_or_path = name_or_path
        self.kind = kind
        self._impl = impl
        if kind == "huggingface":
            if getattr(impl, "is_fast", False):
                from tokenizers import Tokenizer

                backend = Tokenizer.from_str(impl.backend_tokenizer.to_str())
                backend.no_truncation()
                backend.no_padding()
                self.encoder = Encoder("fast", backend, threads)
            else:
                self.encoder = Encoder("slow", impl, threads)
            self.vocab_size = len(impl)
        else:
            self.encoder = Encoder("sentencepiece", impl, threads)
            self.vocab_size = impl.get_piece_size()
        self.dtype = token_dtype(self.vocab_size)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoder(texts)

    def encode(self, text: str) -> list[int]:
        return self.encoder([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        return self._impl.decode([int(i) for i in ids])

    # -- identity ---------------------------------------------------------------------------------------
    def special_ids(self) -> dict:
        if self.kind == "huggingface":
            names = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")
            return {n: getattr(self._impl, f"{n}_token_id", None) for n in names}
        sp = self._impl

        def piece(p):
            i = sp.piece_to_id(p)
            return i if i != sp.unk_id() and sp.id_to_piece(i) == p else None

        ids = {
            "pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(),
            "cls": piece("[CLS]"), "sep": piece("[SEP]"),
            "mask": piece("[MASK]") if piece("[MASK]") is not None else piece("<mask>"),
        }
        return {k: (None if v is None or v < 0 else int(v)) for k, v in ids.items()}

    def vocab(self) -> list[str]:
        if self.kind == "huggingface":
            pieces = [""] * self.vocab_size
            for tok, i in self._impl.get_vocab().items():
                if 0 <= i < self.vocab_size:
                    pieces[i] = tok
            return pieces
        return [self._impl.id_to_piece(i) for i in range(self.vocab_size)]

    def info(self) -> TokenizerInfo:
        vocab_hash = hashlib.sha256("\n".join(self.vocab()).encode("utf-8", "surrogatepass")).hexdigest()
        special = self.special_ids()
        probes = self.encode_batch(_PROBES)
        ident = json.dumps({"vocab": vocab_hash, "special": special, "probes": probes}, sort_keys=True)
        return TokenizerInfo(name_or_path=self.name_or_path, kind=self.kind, vocab_size=self.vocab_size,
                             special_ids=special, vocab_fingerprint=vocab_hash,
                             fingerprint=hashlib.sha256(ident.encode()).hexdigest())


def load_tokenizer(name_or_path: str, threads: bool = True) -> TextTokenizer:
    """Load a Hugging Face tokenizer (hub name or local folder) or a SentencePiece `.model` file.

    `threads=False` keeps the tokenizer on one core (data-prep workers are one process per core).
    """
    if not threads:
        single_threaded()
    if name_or_path.endswith(".model"):
        if not os.path.isfile(name_or_path):
            raise TokenizerLoadError(f"SentencePiece model file not found: {name_or_path}")
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=name_or_path)
        except Exception as e:  # sentencepiece raises plain RuntimeError/OSError with C++ text
            raise TokenizerLoadError(
                f"{name_or_path} is not a readable SentencePiece model ({e}). "
                "Pass the .model file written by spm.SentencePieceTrainer.train."
            ) from None
        return TextTokenizer(os.path.abspath(name_or_path), "sentencepiece", sp, threads=threads)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        local = os.path.isdir(name_or_path)
        hint = (
            f"the folder {name_or_path} holds no tokenizer files (tokenizer.json or vocab.txt + "
            "tokenizer_config.json); save one there with tokenizer.save_pretrained(folder)"
            if local
            else f"'{name_or_path}' is neither a local folder nor reachable on the Hugging Face hub. "
            "Offline, pass a local folder holding the tokenizer (tokenizer.save_pretrained(folder) on a "
            "machine with internet), or pre-populate the HF cache and set HF_HUB_OFFLINE=1"
        )
        raise TokenizerLoadError(f"could not load tokenizer {name_or_path!r}: {hint}. ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    path = os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path
    return TextTokenizer(path, "huggingface", tok, threads=threads)



# -- identity cache ----------------------------------------------------------------------------------------
# transformers' AutoTokenizer imports torch (through its configuration code): 2-4 s of start-up, which on a
# 100 MB corpus is a large share of a preparation's wall time. What preparation needs from a tokenizer is
# small and a pure function of the tokenizer's files and the library versions: its identity (TokenizerInfo)
# and, for a fast tokenizer, the serialised Rust tokenizer that encodes. So for a local folder it is cached,
# keyed by a hash of the folder's files (weights excluded) and the transformers and tokenizers versions. A hit
# encodes the probe strings with the rebuilt tokenizer and checks them against the cached ids.

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
        if entry["format"] != CACHE_FORMAT or encoder(_PROBES) != entry["probe_ids"]:
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
                 "probe_ids": tok.encode_batch(_PROBES)}
        try:
            with atomic_write(path, "w") as f:
                json.dump(entry, f)
        except OSError:
            pass
    return PrepTokenizer(info, tok.encoder)
