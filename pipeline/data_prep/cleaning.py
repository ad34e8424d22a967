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
