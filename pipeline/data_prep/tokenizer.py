"""Tokenizers for data preparation: Hugging Face (fast or slow) and SentencePiece, behind one interface.

A prepared dataset records the identity of the tokenizer that made it. The identity is behavioural, not a
path or a serialisation: the vocabulary (id -> token), the special-token ids, and the ids the tokenizer
produces for a fixed set of probe strings (casing, accents, CJK, punctuation, whitespace, special tokens).
So `bert-base-uncased` from the hub and a local copy of the same files agree, and two tokenizers that
share a vocabulary but normalise differently (cased vs uncased) do not.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

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


# Documents are tokenized a group at a time, joined by a special token, up to about this many characters per
# group (see JoinedEncoder; benchmarks/joined_encoding.py measures other sizes: 1-16 K are within noise).
GROUP_CHARS = 4096
# Texts on which joined and per-document encoding must agree before joining is used: the probes, edge cases
# for boundaries (whitespace at either end, punctuation, subword-like and bracket pieces, one character),
# and one text long enough to make several groups.
_JOIN_PROBES = _PROBES + (
    " leading space", "trailing space ", "\n", "x", "  ", "\tTab\n", "word\n", "[", "]", "SEP]", "[SE", "##ing",
    "<", ">", "|", "\u00a0nbsp\u00a0", "\u200bzero width", "中", "é", "Ω", "🙂", "end.", "...", "'quote'",
    "a " * 2500,
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
        return {
            "name_or_path": self.name_or_path,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "special_ids": self.special_ids,
            "vocab_fingerprint": self.vocab_fingerprint,
            "fingerprint": self.fingerprint,
        }


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (ids < 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class TextTokenizer:
    """Encodes documents to ids without special tokens (the trainer adds [CLS]/[SEP] when it builds
    sequences), and decodes ids back to text."""

    def __init__(self, name_or_path: str, kind: str, impl, threads: bool = True):
        self.name_or_path = name_or_path
        self.kind = kind
        self._impl = impl
        self._threads = threads
        self._backend = None  # a fast Hugging Face tokenizer's Rust tokenizer
        if kind == "huggingface":
            self._hf = impl
            if getattr(impl, "is_fast", False):
                backend = impl.backend_tokenizer
                # A private copy without truncation or padding: documents are stored whole.
                from tokenizers import Tokenizer

                self._backend = Tokenizer.from_str(backend.to_str())
                self._backend.no_truncation()
                self._backend.no_padding()
            self.vocab_size = len(impl)
        else:
            self.vocab_size = impl.get_piece_size()
        self.dtype = token_dtype(self.vocab_size)
        self._joined = JoinedEncoder(self._backend, self.dtype) if self._backend is not None else None

    # -- encoding -------------------------------------------------------------------------------------
    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all texts back to back, as self.dtype; each text's id count): what data preparation stores.
        Fast tokenizers join short texts (JoinedEncoder); the result equals `encode_batch`'s."""
        if self._joined is not None:
            return self._joined.flat(texts)
        return ids_to_flat(self.encode_batch(texts), self.dtype)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "huggingface":
            if self._joined is not None:
                return self._joined.per_doc(texts)
            return self._hf(list(texts), add_special_tokens=False)["input_ids"]
        return self._impl.encode(list(texts), out_type=int, num_threads=0 if self._threads else 1)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "huggingface":
            return self._hf.decode(ids)
        return self._impl.decode(ids)

    def worker_spec(self) -> tuple:
        """What a worker process needs to rebuild this tokenizer's encoder (see `worker_tokenizer`)."""
        if self.kind == "huggingface" and self._backend is not None:
            return ("backend", self._backend.to_str(), self.vocab_size, self.name_or_path,
                    self.encode_batch(_PROBES))
        return ("load", self.name_or_path)

    # -- identity ---------------------------------------------------------------------------------------
    def special_ids(self) -> dict:
        if self.kind == "huggingface":
            t = self._hf
            names = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")
            return {n: getattr(t, f"{n}_token_id", None) for n in names}
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
            for tok, i in self._hf.get_vocab().items():
                if 0 <= i < self.vocab_size:
                    pieces[i] = tok
            return pieces
        return [self._impl.id_to_piece(i) for i in range(self.vocab_size)]

    def info(self) -> TokenizerInfo:
        vocab_hash = hashlib.sha256("\n".join(self.vocab()).encode("utf-8", "surrogatepass")).hexdigest()
        special = self.special_ids()
        probes = [self.encode(p) for p in _PROBES]
        ident = json.dumps({"vocab": vocab_hash, "special": special, "probes": probes}, sort_keys=True)
        return TokenizerInfo(
            name_or_path=self.name_or_path,
            kind=self.kind,
            vocab_size=self.vocab_size,
            special_ids=special,
            vocab_fingerprint=vocab_hash,
            fingerprint=hashlib.sha256(ident.encode()).hexdigest(),
        )


def ids_to_flat(ids: list[list[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(all ids back to back as `dtype`, each document's id count) from per-document id lists."""
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.array(list(itertools.chain.from_iterable(ids)), dtype), lengths


def _separators(backend) -> list[tuple[str, int]]:
    """Added tokens that can join documents: special, matched on the raw text only (not normalized, not
    single-word, no stripping of neighbouring whitespace), and with no border (no proper prefix that is also
    a suffix), so that joining never makes an occurrence that no document holds."""
    try:
        added = sorted(backend.get_added_tokens_decoder().items())
    except AttributeError:  # tokenizers too old to list them
        return []
    out = []
    for tid, t in added:
        c = t.content
        if (t.special and not t.normalized and not t.single_word and not t.lstrip and not t.rstrip and c
                and not any(c[:k] == c[-k:] for k in range(1, len(c)))):
            out.append((c, tid))
    return out


def _vocab_probes(backend, n: int = 96) -> tuple[str, ...]:
    """Texts made of the tokenizer's own vocabulary, word-start markers ("##", "▁", "Ġ") taken off: joining
    must give the same ids on them. Fixed probes alone can miss a difference that only shows on words the
    vocabulary knows (ids of "▁foo" and "foo" differ; two unknown words are both [UNK])."""
    size = backend.get_vocab_size(with_added_tokens=False)
    tokens = (backend.id_to_token(i) for i in range(0, size, max(1, size // (3 * n))))
    words = [w for w in (t.removeprefix("##").lstrip("\u2581\u0120") for t in tokens if t) if w.strip()]
    return tuple(" ".join(words[i:i + 3]) for i in range(0, len(words), 3))


class JoinedEncoder:
    """A fast tokenizer's ids for many documents at once, as a flat array and lengths (`flat`).

    Short documents are joined by a special token of the tokenizer (the separator) into groups of about
    GROUP_CHARS characters, and each group is one tokenizer input. A fast tokenizer cuts its input at added
    tokens before it normalizes and pre-tokenizes, and handles the pieces independently, so a group's ids are
    its documents' ids with the separator's id between them. That saves the per-input work of the tokenizer
    and its Python binding (an Encoding object and an id list per document): on 43-token documents, about 7%
    of the tokenizer's time.

    It is used only when it is exact:
    - the separator is chosen (`_separators`) and checked on first use (`sep`): joined and per-document
      encoding of _JOIN_PROBES and of texts made of the vocabulary must agree, else no separator is used (a
      tokenizer that treats input after an added token differently from the start of a text, e.g. Metaspace
      with prepend_scheme="first", fails there);
    - every batch is checked: the separator's text must occur exactly once per join (no document holds it)
      and its id exactly as often; any other batch is encoded document by document."""

    def __init__(self, backend, dtype):
        self._backend = backend
        self._enc = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        self.dtype = np.dtype(dtype)

    @functools.cached_property
    def sep(self) -> tuple[str, int] | None:
        """(text, id) of the separator, or None: joining is off."""
        vocab_probes = _vocab_probes(self._backend)
        for sep in _separators(self._backend):
            if self._agrees([p for p in _JOIN_PROBES + vocab_probes if sep[0] not in p], sep):
                return sep
        return None

    def per_doc(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._enc(list(texts), add_special_tokens=False)]

    def flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        got = self._joined(texts) if len(texts) > 1 and self.sep is not None else None
        return got if got is not None else ids_to_flat(self.per_doc(texts), self.dtype)

    def _agrees(self, texts: list[str], sep: tuple[str, int]) -> bool:
        got = self._joined(texts, sep)
        want = ids_to_flat(self.per_doc(texts), self.dtype)
        return got is not None and all(np.array_equal(a, b) for a, b in zip(got, want))

    def _joined(self, texts: Sequence[str], sep: tuple[str, int] | None = None
                ) -> tuple[np.ndarray, np.ndarray] | None:
        sep_text, sep_id = sep or self.sep
        n = len(texts)
        lens = np.fromiter(map(len, texts), np.int64, n)
        group = (np.cumsum(lens) - lens) // GROUP_CHARS  # a document's group: characters before it // size
        bounds = [0, *(np.flatnonzero(np.diff(group)) + 1).tolist(), n]
        groups = [sep_text.join(texts[a:b]) for a, b in zip(bounds, bounds[1:])]
        n_sep = n - len(groups)
        if sum(map(str.count, groups, itertools.repeat(sep_text))) != n_sep:
            return None  # a document holds the separator's text
        encs = self._enc(groups, add_special_tokens=False)
        flat = np.array(list(itertools.chain.from_iterable([e.ids for e in encs])), np.uint32)
        is_sep = flat == sep_id
        if int(is_sep.sum()) != n_sep:
            return None
        # token t's document: separators before it, plus groups started at or before it (but the first)
        group_start = np.zeros(len(flat) + 1, np.int64)
        np.add.at(group_start, np.cumsum(np.fromiter(map(len, encs), np.int64, len(encs)))[:-1], 1)
        doc = np.cumsum(is_sep) - is_sep + np.cumsum(group_start[:-1])
        keep = ~is_sep
        lengths = np.bincount(doc[keep], minlength=n)
        if len(lengths) != n:
            return None
        return flat[keep].astype(self.dtype), lengths


class BackendEncoder:
    """The encode half of a fast Hugging Face TextTokenizer, rebuilt from its serialised Rust tokenizer.
    Data-prep workers use it: importing transformers in every worker costs seconds of start-up per
    process, which on a short run is a large share of the wall time.

    `probe_ids` are the driver's ids for the fingerprint's probe strings: the rebuilt tokenizer must produce
    the same ones, else it raises TokenizerLoadError (a tokenizers version that serialises or loads
    differently must not write shards with other ids than the fingerprint in the manifest vouches for)."""

    kind = "huggingface"

    def __init__(self, backend_json: str, vocab_size: int, name_or_path: str, probe_ids: list | None = None):
        from tokenizers import Tokenizer

        self._backend = Tokenizer.from_str(backend_json)
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.name_or_path = name_or_path
        self._joined = JoinedEncoder(self._backend, self.dtype)
        self.encode_batch = self._joined.per_doc
        self.encode_flat = self._joined.flat
        if probe_ids is not None:
            got = self.encode_batch(_PROBES)
            if got != [list(p) for p in probe_ids]:
                bad = next(i for i, (a, b) in enumerate(zip(got, probe_ids)) if a != list(b))
                raise TokenizerLoadError(
                    f"tokenizer {name_or_path}: rebuilt in a worker process, it encodes probe {_PROBES[bad]!r} as "
                    f"{got[bad]} instead of the main process's {list(probe_ids[bad])}; run with --workers 1, or "
                    f"check that every process uses the same tokenizers version")


def _single_threaded() -> None:
    """Keep this process's tokenizer on one core (data-prep workers are one process per core). Must run before
    the Rust thread pool is first used in the process."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("RAYON_NUM_THREADS", "1")


def worker_tokenizer(spec: tuple, threads: bool):
    """Rebuild a tokenizer in a worker process from `TextTokenizer.worker_spec()`."""
    if not threads:
        _single_threaded()
    if spec[0] == "backend":
        return BackendEncoder(*spec[1:])
    return load_tokenizer(spec[1], threads=threads)


# tokenizer_config.json classes that `load_tokenizer` builds without AutoTokenizer, and where each lives in
# transformers 5. For these, AutoTokenizer.from_pretrained(folder) ends in `<class>.from_pretrained(folder)`
# (the class named in tokenizer_config.json, "Fast" dropped; PreTrainedTokenizerFast is TokenizersBackend),
# so calling that directly builds the same tokenizer. What it saves is the import of AutoTokenizer, which
# imports torch through transformers' configuration code: 2.5-3 s, plus about 0.5 s at interpreter exit.
_DIRECT_CLASSES = {
    "BertTokenizer": ("transformers.models.bert.tokenization_bert", "BertTokenizer"),
    "BertTokenizerFast": ("transformers.models.bert.tokenization_bert", "BertTokenizer"),
    "DistilBertTokenizer": ("transformers.models.distilbert.tokenization_distilbert", "DistilBertTokenizer"),
    "DistilBertTokenizerFast": ("transformers.models.distilbert.tokenization_distilbert", "DistilBertTokenizer"),
    "PreTrainedTokenizerFast": ("transformers.tokenization_utils_tokenizers", "TokenizersBackend"),
    "TokenizersBackend": ("transformers.tokenization_utils_tokenizers", "TokenizersBackend"),
}
# config.json model types for which AutoTokenizer follows tokenizer_config.json's class (others can override
# it: see MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS in transformers' tokenization_auto.py).
_DIRECT_MODEL_TYPES = (None, "", "bert", "distilbert")


def _direct_class(folder: str):
    """The tokenizer class AutoTokenizer would pick for a local folder, imported without AutoTokenizer; None
    unless the folder is one whose choice is known without running AutoTokenizer's rules: it holds a
    tokenizer.json, its tokenizer_config.json names one of `_DIRECT_CLASSES`, nothing asks for remote code,
    and config.json (optional) has a BERT model type. Everything else goes through AutoTokenizer."""
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return None
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            tconf = json.load(f)
        conf = {}
        if os.path.exists(os.path.join(folder, "config.json")):
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                conf = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(tconf, dict) or not isinstance(conf, dict) or "auto_map" in tconf or "auto_map" in conf:
        return None
    target = _DIRECT_CLASSES.get(tconf.get("tokenizer_class"))
    if target is None or conf.get("model_type") not in _DIRECT_MODEL_TYPES:
        return None
    import importlib

    try:
        # transformers 4 has no TokenizersBackend, and its BertTokenizer is the slow one that AutoTokenizer
        # does not pick: there, and in any version that moved these classes, use AutoTokenizer.
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        cls = getattr(importlib.import_module(target[0]), target[1])
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, TokenizersBackend) else None


def load_tokenizer(name_or_path: str, threads: bool = True) -> TextTokenizer:
    """Load a Hugging Face tokenizer (hub name or local folder) or a SentencePiece `.model` file.

    `threads=False` keeps the tokenizer on one core (data-prep workers are one process per core).
    """
    if not threads:
        _single_threaded()
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

    loader = _direct_class(name_or_path) if os.path.isdir(name_or_path) else None
    if loader is None:
        from transformers import AutoTokenizer as loader
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = loader.from_pretrained(name_or_path)
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
# Loading a Hugging Face tokenizer costs the data-prep driver about 2 s (transformers' import, then the
# fingerprint's vocabulary walk), while its worker processes, started already, wait for the plan that
# needs the fingerprint. On 2 cores that was most of the fixed cost of a run. What the driver needs from the
# tokenizer is small and a pure function of the tokenizer's files and the library versions: the identity
# (TokenizerInfo) and the serialised Rust tokenizer the workers encode with. So it is cached, keyed by a
# hash of every file of the folder but weights, and the transformers and tokenizers versions. A hit still
# encodes the probe strings with the rebuilt tokenizer and checks them against the cached ids.

CACHE_FORMAT = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt", ".gguf")


def identity_cache_dir() -> str:
    """$PIPELINE_CACHE_DIR/tokenizers, else $XDG_CACHE_HOME (default ~/.cache)/distil-pipeline/tokenizers."""
    root = os.environ.get("PIPELINE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "distil-pipeline")
    return os.path.join(root, "tokenizers")


def _identity_key(folder: str) -> str | None:
    """Hash of the folder's non-weight files (names and bytes) and the library versions; None when the
    folder cannot be read or a version is unknown (no caching then)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        versions = [version("transformers"), version("tokenizers")]
        names = sorted(n for n in os.listdir(folder)
                       if not n.endswith(_WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(folder, n)))
        h = hashlib.sha256(json.dumps([CACHE_FORMAT, versions]).encode())
        for n in names:
            with open(os.path.join(folder, n), "rb") as f:
                data = f.read()
            h.update(f"{n}\0{len(data)}\0".encode())
            h.update(data)
    except (OSError, PackageNotFoundError):
        return None
    return h.hexdigest()


class CachedTokenizer(BackendEncoder):
    """A fast Hugging Face tokenizer rebuilt from the identity cache: encodes, and knows its identity and
    worker spec, but cannot decode (data preparation never decodes; `validate` loads the real one)."""

    def __init__(self, entry: dict, name_or_path: str):
        super().__init__(entry["backend"], entry["vocab_size"], name_or_path, entry["probe_ids"])
        self._entry = entry

    def info(self) -> TokenizerInfo:
        i = self._entry["info"]
        return TokenizerInfo(name_or_path=self.name_or_path, kind="huggingface", vocab_size=i["vocab_size"],
                             special_ids=i["special_ids"], vocab_fingerprint=i["vocab_fingerprint"],
                             fingerprint=i["fingerprint"])

    def worker_spec(self) -> tuple:
        return ("backend", self._entry["backend"], self.vocab_size, self.name_or_path, self._entry["probe_ids"])


def load_prep_tokenizer(name_or_path: str, threads: bool = True):
    """The tokenizer for data preparation: `load_tokenizer`, or for a local folder holding a fast tokenizer
    its identity-cache entry when there is one (see above). A cache that cannot be read or written is
    ignored: it only ever saves time."""
    if not threads:
        _single_threaded()
    if name_or_path.endswith(".model") or not os.path.isdir(name_or_path):
        return load_tokenizer(name_or_path, threads=threads)
    key = _identity_key(name_or_path)
    path = os.path.join(identity_cache_dir(), f"{key}.json") if key else None
    path_abs = os.path.abspath(name_or_path)
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                entry = json.load(f)
            if entry.get("format") == CACHE_FORMAT:
                return CachedTokenizer(entry, path_abs)
        except (OSError, ValueError, KeyError, TypeError, TokenizerLoadError):
            pass  # unreadable or stale: load the real tokenizer and rewrite the entry
    tok = load_tokenizer(name_or_path, threads=threads)
    spec = tok.worker_spec()
    if path and spec[0] == "backend":
        entry = {"format": CACHE_FORMAT, "backend": spec[1], "vocab_size": spec[2], "probe_ids": spec[4],
                 "info": tok.info().to_json()}
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(entry, f)
            os.replace(tmp, path)
        except OSError:
            pass
    return tok
