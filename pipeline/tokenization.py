"""Tokenizers: Hugging Face (fast or slow) and SentencePiece, behind one interface, for data preparation,
training and evaluation.

A prepared dataset records the identity of the tokenizer that made it. The identity is behavioural, not a
path or a serialisation: the vocabulary (id -> token), the special-token ids, and the ids the tokenizer
produces for a fixed set of probe strings (casing, accents, CJK, punctuation, whitespace, special tokens).
So `bert-base-uncased` from the hub and a local copy of the same files agree, and two tokenizers that
share a vocabulary but normalise differently (cased vs uncased) do not.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# Probe strings for the behavioural fingerprint. Changing them changes every fingerprint: don't.
PROBES = (
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
        probes = self.encode_batch(PROBES)
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
