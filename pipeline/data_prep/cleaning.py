"""What happens to bad text, in one place (the table in docs/data_prep.md mirrors this module).

Every document goes through `clean()`:
- bytes that are not valid UTF-8 are replaced with U+FFFD            -> repaired: invalid_utf8
- NUL bytes are removed; other control characters (C0 but tab/newline/CR, and DEL) become spaces
                                                                       -> repaired: control_chars
- a document more than `max_junk_fraction` junk (U+FFFD or control characters): binary junk
                                                                       -> dropped: binary
- a document with nothing but whitespace                              -> dropped: empty
- a document longer than `max_doc_chars` is cut into consecutive pieces at whitespace
  (the trainer packs consecutive documents anyway)                    -> repaired: split_long
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class CleanConfig:
    max_doc_chars: int = 1_000_000
    max_junk_fraction: float = 0.1


def decode(raw: bytes) -> tuple[str, bool]:
    """UTF-8 decode; returns (text, repaired)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def needs_no_cleaning(text: str, max_doc_chars: int) -> bool:
    """True when `clean` would return `[text]` unchanged with no repair (valid UTF-8 given): no control
    character, no U+FFFD, not empty or whitespace-only, not too long. The workers' per-document fast path: most
    documents are like this, and the test compares it with `clean` on every kind of text."""
    return (len(text) <= max_doc_chars and _CONTROL.search(text) is None and _REPLACEMENT not in text
            and not text.isspace() and text != "")


def ready_text(payload: bytes | str, max_doc_chars: int) -> str | None:
    """The document as text when it goes to the tokenizer as it is (valid UTF-8 that `needs_no_cleaning`), else
    None: then `decode` and `clean` decide. The workers' fast path."""
    if payload.__class__ is bytes:
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return payload if needs_no_cleaning(payload, max_doc_chars) else None


_CONTROL_BYTES = bytes(range(0x00, 0x09)) + b"\x0b\x0c" + bytes(range(0x0e, 0x20)) + b"\x7f"  # _CONTROL in UTF-8
_REPLACEMENT_BYTES = _REPLACEMENT.encode()


def ready_texts(docs: list[bytes], max_doc_chars: int) -> list[str] | None:
    """The documents as texts when every one is `ready_text` (almost always), else None. Checked in a few
    passes over all of them, each in C rather than a Python call per document: decoding, then their bytes
    for control characters and U+FFFD (in UTF-8, ASCII bytes are ASCII characters and U+FFFD has one
    encoding), their lengths, and whitespace-only ones."""
    try:
        texts = list(map(bytes.decode, docs))
    except UnicodeDecodeError:
        return None
    joined = b"".join(docs)
    if (len(joined.translate(None, _CONTROL_BYTES)) == len(joined) and _REPLACEMENT_BYTES not in joined
            and max(map(len, texts), default=0) <= max_doc_chars and all(texts) and not any(map(str.isspace, texts))):
        return texts
    return None


def clean(text: str, cfg: CleanConfig, utf8_repaired: bool = False) -> tuple[list[str], str | None, list[str]]:
    """Returns (pieces, dropped_reason, repairs). `pieces` is empty when the document is dropped."""
    repairs = ["invalid_utf8"] if utf8_repaired else []
    junk = text.count(_REPLACEMENT) if utf8_repaired or _REPLACEMENT in text else 0
    if _CONTROL.search(text) is not None:
        n_before = len(text)
        text = text.replace("\x00", "")
        junk += n_before - len(text)
        text, n_sub = _CONTROL.subn(" ", text)
        junk += n_sub
        repairs.append("control_chars")
    if junk and junk > cfg.max_junk_fraction * max(len(text), 1):
        return [], "binary", repairs
    if not text or text.isspace():
        return [], "empty", repairs
    if len(text) <= cfg.max_doc_chars:
        return [text], None, repairs
    repairs.append("split_long")
    return split_long(text, cfg.max_doc_chars), None, repairs


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut `text` into pieces of at most `max_chars`, at the last whitespace before the limit when there
    is one in the second half of the window (else hard at the limit). Whitespace-only pieces are dropped."""
    pieces = []
    start = 0
    n = len(text)
    while n - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(" ", start + max_chars // 2, end), text.rfind("\n", start + max_chars // 2, end))
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [p for p in pieces if p and not p.isspace()]
