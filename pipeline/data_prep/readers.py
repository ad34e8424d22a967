"""Reading one piece of a plan: one reader per input format, each yielding (text or raw bytes, location, flag).

    text       read_text_range    documents of a byte range of a plain-text file (blank-line or line separated)
    jsonl      read_jsonl_range   the text field of the JSON Lines records starting in a byte range
    json       read_json_array    the text field of the objects of a top-level JSON array, parsed incrementally
    parquet    the text column, by row group
    disk/hf    the text column of a `save_to_disk` folder / a streamed Hugging Face dataset shard

Compressed files (.gz, .zst) are decompressed on the fly. A file that cannot be read as a whole (corrupt archive,
truncated zstd stream or JSON array, unreadable Parquet) raises BadFileError; a bad record is reported through
`bad(reason, location, detail)` and skipped.
"""
from __future__ import annotations

import gzip
import io
import itertools
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from .cleaning import decode

if TYPE_CHECKING:
    from .sources import Source

CHUNK = 1 << 20  # longest piece of a line read at once: bounds memory for a 50 MB single-line file


class BadFileError(RuntimeError):
    """A whole input file cannot be read (corrupt archive, unreadable Parquet, truncated JSON array)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _zstd_truncated(path: str) -> str | None:
    """Why a zstd file ends inside a frame (an interrupted download or copy), else None.

    python-zstandard's stream reader reports such a file as a clean end of data, which would silently make
    a short shard (gzip raises EOFError instead). Walking the frame and block headers (RFC 8878), seeking
    over block contents, finds it without decompressing. Data that is not zstd is left to the decompressor."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < size:
            f.seek(pos)
            head = f.read(8)
            magic = int.from_bytes(head[:4], "little")
            skippable = 0x184D2A50 <= magic <= 0x184D2A5F  # magic, 4-byte length, data
            if magic != 0xFD2FB528 and not skippable and len(head) >= 4:
                return None
            if len(head) < (8 if skippable else 5):
                return f"truncated: ends inside a frame header (at byte {pos} of {size})"
            if skippable:
                pos += 8 + int.from_bytes(head[4:8], "little")
                continue
            fhd = head[4]
            single = fhd >> 5 & 1
            pos += 5 + (not single) + (0, 1, 2, 4)[fhd & 3] + (single, 2, 4, 8)[fhd >> 6]
            while True:  # blocks: a 3-byte header (last-block flag, type, size), then the content
                f.seek(pos)
                header = f.read(3)
                if len(header) < 3:
                    return f"truncated: ends inside a frame ({size} bytes)"
                h = int.from_bytes(header, "little")
                pos += 3 + (1 if (h >> 1) & 3 == 1 else h >> 3)  # an RLE block stores one byte
                if h & 1:
                    break
            pos += 4 * (fhd >> 2 & 1)  # content checksum
    return None if pos == size else f"truncated: ends inside a frame ({size} bytes)"


def open_binary(path: str, compression: str | None):
    """A binary file object with readline(); decompressing gzip and zstd streams."""
    if compression == "gz":
        return gzip.open(path, "rb")
    if compression == "zst":
        import zstandard

        reason = _zstd_truncated(path)
        if reason:
            raise BadFileError(path, f"corrupt zstd file: {reason}")
        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, buffer_size=CHUNK)
    return open(path, "rb", buffering=CHUNK)


def _lines(f, pos: int) -> Iterator[tuple[int, bytes, bool, bool]]:
    """Yields (line_start, chunk, first, complete): lines read in chunks of at most CHUNK bytes."""
    line_start = pos
    first = True
    while True:
        chunk = f.readline(CHUNK)
        if not chunk:
            return
        complete = chunk.endswith(b"\n")
        yield line_start, chunk, first, complete
        pos += len(chunk)
        if complete:
            line_start = pos
        first = complete


def _cut(buf: bytes, max_bytes: int) -> int:
    """Where to cut a too-long document: the last space/newline in the second half, else a UTF-8 boundary."""
    window = buf[max_bytes // 2:max_bytes]
    cut = max(window.rfind(b" "), window.rfind(b"\n"))
    if cut >= 0:
        return max_bytes // 2 + cut + 1
    cut = max_bytes
    while cut > 0 and (buf[cut] & 0xC0) == 0x80:  # do not cut inside a UTF-8 sequence
        cut -= 1
    return cut or max_bytes


def _seek_line_start(f, start: int, end: int | None) -> int | None:
    """Move `f` to the first line start at or after `start` and return it; None when there is none before
    `end` (the range then owns nothing, and a giant line crossing it is not read to its end)."""
    if start == 0:
        return 0
    f.seek(start - 1)
    pos = start - 1
    while end is None or pos < end:
        c = f.readline(CHUNK)
        pos += len(c)
        if not c or c.endswith(b"\n"):
            return pos
    return None


@dataclass
class PieceStats:
    lines: int = 0  # lines whose first byte lies in the piece's byte range (for absolute line numbers)


def read_text_range(f, start: int, end: int | None, mode: str, max_doc_bytes: int,
                    stats: PieceStats) -> Iterator[tuple[bytes, int, bool]]:
    """Documents of the byte range [start, end) of a text file: yields (bytes, local_line, was_cut).

    Ownership, which makes ranges read independently equal one sequential read:
    - lines mode: a document is a line; the range owns the lines starting in it.
    - paragraphs mode: documents are separated by blank lines. A range that starts inside the file skips
      up to and including the first blank line starting in it; every range stops at the first blank line
      starting at or after its end, finishing the document in progress. So a document belongs to the
      range in which the blank line before it starts.
    A blank line is whitespace only, ends with a newline and is at most CHUNK bytes long (a longer one is
    text). A document longer than `max_doc_bytes` is cut (`_cut`) into pieces; the first piece is flagged.
    `local_line` counts lines from the range's first line start (0-based). A document keeps its final newline.
    """
    pos = _seek_line_start(f, start, end)
    if pos is None:
        return
    paragraphs = mode == "paragraphs"
    skipping = paragraphs and start > 0
    buf, doc_line, doc_cut, line, in_range = bytearray(), 0, False, -1, True
    for line_start, chunk, first, complete in _lines(f, pos):
        if first:
            line += 1
            in_range = end is None or line_start < end
            if in_range:
                stats.lines += 1
            elif not paragraphs:
                break
        if paragraphs:
            blank = first and complete and chunk.isspace()
            if skipping:
                if first and not in_range:
                    break
                skipping = not blank
                continue
            if blank:
                if buf:
                    yield bytes(buf), doc_line, False
                    buf.clear()
                if not in_range:
                    break
                continue
        if not buf:
            doc_line, doc_cut = line, False
        buf += chunk
        while len(buf) > max_doc_bytes:  # flag the first cut only: split_long counts documents
            cut = _cut(buf, max_doc_bytes)
            yield bytes(buf[:cut]), doc_line, not doc_cut
            doc_cut = True
            del buf[:cut]
        if not paragraphs and complete and buf:
            yield bytes(buf), doc_line, False
            buf.clear()
    if buf:
        yield bytes(buf), doc_line, False


def read_jsonl_range(f, start: int, end: int | None, field: str, max_record_bytes: int, stats: PieceStats,
                     bad: Callable[[str, int, str], None]) -> Iterator[tuple[str, int, bool]]:
    """Text fields of the JSON Lines records starting in [start, end): yields (text, local_line, repaired)."""
    pos = _seek_line_start(f, start, end)
    if pos is None:
        return
    buf = bytearray()
    too_long = False
    line_idx = -1
    for line_start, chunk, first, complete in _lines(f, pos):
        if first:
            line_idx += 1
            if end is not None and line_start >= end:
                break
            stats.lines += 1
            too_long = False
            buf.clear()
        if not too_long:
            buf += chunk
            if len(buf) > max_record_bytes:
                too_long = True
                buf.clear()
                bad("record_too_long", line_idx, f"longer than {max_record_bytes} bytes")
        if not complete or too_long:
            continue
        raw = bytes(buf)
        buf.clear()
        if raw.isspace() or not raw:
            continue
        yield from _json_record(*decode(raw), line_idx, field, bad)
    if buf and not too_long and not bytes(buf).isspace():  # last line without a newline
        raw = bytes(buf)
        yield from _json_record(*decode(raw), line_idx, field, bad)


def _json_record(text: str, repaired: bool, loc: int, field: str, bad) -> Iterator[tuple[str, int, bool]]:
    try:
        obj = json.loads(text)
    except ValueError as e:
        bad("invalid_json", loc, str(e))
        return
    if not isinstance(obj, dict):
        bad("not_an_object", loc, f"a JSON {type(obj).__name__}, not an object")
    elif field not in obj:
        bad("missing_field", loc, f"no field {field!r} (fields: {sorted(obj)[:8]})")
    elif not isinstance(obj[field], str):
        bad("field_not_string", loc, f"field {field!r} is a {type(obj[field]).__name__}")
    else:
        yield obj[field], loc, repaired


class _JsonText:
    """A JSON file's text as a sliding buffer that never holds the whole file: `buf[pos:]` is not consumed yet;
    `line` counts the newlines consumed."""

    def __init__(self, f):
        self._f = io.TextIOWrapper(f, encoding="utf-8", errors="replace")
        self.buf, self.pos, self.eof, self.line = "", 0, False, 0
        self.fill()

    def fill(self) -> None:
        """Drop what is consumed and append the next chunk of the file (`eof` once there is none)."""
        chunk = self._f.read(CHUNK)
        self.eof = not chunk
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0

    def next_char(self) -> str | None:
        """Skip whitespace; the next character (not consumed), or None at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.line += self.buf[self.pos] == "\n"
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return None
            self.fill()


def read_json_array(f, path: str, field: str, max_record_bytes: int,
                    bad: Callable[[str, int, str], None]) -> Iterator[tuple[str, int, bool]]:
    """Objects of a top-level JSON array, parsed incrementally (never the whole file in memory).
    A malformed element ends the file with BadFileError: an array has no line to resynchronise on."""
    text, dec = _JsonText(f), json.JSONDecoder()
    if text.next_char() != "[":
        raise BadFileError(path, "not a JSON array (expected '[' at the start)")
    text.pos += 1
    expect_value = True
    while True:
        c = text.next_char()
        if c is None:
            raise BadFileError(path, f"truncated JSON array (no closing ']' after line {text.line + 1})")
        if c == "]":
            text.pos += 1
            if text.next_char() is not None:  # e.g. two arrays concatenated: the second must not be lost silently
                raise BadFileError(path, f"data at line {text.line + 1}, after the array's closing ']' (one JSON "
                                         f"array per .json file; use JSON Lines for concatenated data)")
            return
        if c == "," and not expect_value:
            text.pos += 1
            expect_value = True
            continue
        if not expect_value:
            raise BadFileError(path, f"invalid JSON at line {text.line + 1}: expected ',' or ']' after an array "
                                     f"element")
        try:
            obj, end = dec.raw_decode(text.buf, text.pos)
            if end >= len(text.buf) and not text.eof:
                raise ValueError("value may continue past the buffer")
        except ValueError as e:
            if text.eof:
                raise BadFileError(path, f"invalid JSON at line {text.line + 1}: {e}") from None
            if len(text.buf) - text.pos > max_record_bytes:
                raise BadFileError(path, f"array element at line {text.line + 1} longer than {max_record_bytes} "
                                         f"bytes")
            text.fill()
            continue
        loc = text.line
        text.line += text.buf.count("\n", text.pos, end)
        text.pos = end
        expect_value = False
        if isinstance(obj, dict) and isinstance(obj.get(field), str):
            yield obj[field], loc, "\ufffd" in obj[field]
        else:
            yield from _json_record(json.dumps(obj), False, loc, field, bad)


def load_dataset_source(src: Source):
    """The dataset of a disk: or hf: input (streamed for hf:)."""
    import datasets

    if src.kind == "hf":
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        return datasets.load_dataset(src.location, src.config, split=src.split, streaming=True)
    ds = datasets.load_from_disk(src.location)
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise KeyError(f"split {src.split!r} not in {list(ds)}; choose with #split=NAME")
        ds = ds[src.split]
    return ds


def iter_piece(piece: dict, source: Source, max_doc_bytes: int, max_record_bytes: int, stats: PieceStats,
               bad: Callable[[str, int, str], None]) -> Iterator[tuple[str | bytes, int, bool]]:
    """Documents of one piece: yields (text or raw bytes, location, flag). For text, flag = cut from a
    longer line/document; for JSON, flag = UTF-8 repaired. Location: line (0-based, piece-local for
    byte ranges), Parquet/dataset row, or record number within a dataset shard."""
    fmt, path = piece["format"], piece["path"]
    if fmt in ("text", "jsonl", "json"):
        try:
            with open_binary(path, piece.get("compression")) as f:
                if fmt == "text":
                    yield from read_text_range(f, piece["start"], piece["end"], source.text_mode, max_doc_bytes,
                                               stats)
                elif fmt == "jsonl":
                    yield from read_jsonl_range(f, piece["start"], piece["end"], source.field, max_record_bytes,
                                                stats, bad)
                else:
                    yield from read_json_array(f, path, source.field, max_record_bytes, bad)
        except FileNotFoundError:
            raise BadFileError(path, "file disappeared after planning") from None
        except (EOFError, gzip.BadGzipFile, OSError) as e:
            raise BadFileError(path, f"corrupt or unreadable ({type(e).__name__}: {e})") from None
        except Exception as e:
            if type(e).__module__.startswith("zstd") or "Zstd" in type(e).__name__:
                raise BadFileError(path, f"corrupt zstd stream ({e})") from None
            raise
    elif fmt == "parquet":
        try:
            yield from _column_texts(_parquet_values(piece, source.field), source.field, bad)
        except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
            raise BadFileError(path, f"unreadable Parquet data ({type(e).__name__}: {e})") from None
    elif fmt == "disk":
        ds = load_dataset_source(source).select_columns([source.field])
        a, b = piece["rows"]
        values = itertools.chain.from_iterable(ds[lo:min(b, lo + 1024)][source.field] for lo in range(a, b, 1024))
        yield from _column_texts(zip(values, itertools.count(a)), source.field, bad)
    elif fmt == "hf":
        ds = load_dataset_source(source)
        if piece["n_shards"] > 1:
            ds = ds.shard(num_shards=piece["n_shards"], index=piece["shard"])
        yield from _column_texts(((ex.get(source.field), i) for i, ex in enumerate(ds)), source.field, bad, "missing")
    else:
        raise ValueError(f"unknown piece format {fmt!r}")


def _parquet_values(piece: dict, field: str) -> Iterator[tuple[object, int]]:
    import pyarrow.parquet as pq

    batches = pq.ParquetFile(piece["path"]).iter_batches(batch_size=1024, row_groups=piece["row_groups"],
                                                         columns=[field])
    return zip(itertools.chain.from_iterable(b.column(0).to_pylist() for b in batches),
               itertools.count(piece["first_row"]))


def _column_texts(values: Iterator[tuple[object, int]], field: str, bad, missing: str = "null"
                  ) -> Iterator[tuple[str, int, bool]]:
    """The text values of a column (Parquet, datasets) with their rows; any other value is a bad record."""
    for value, row in values:
        if isinstance(value, str):
            yield value, row, False
        else:
            bad("missing_field" if value is None else "field_not_string", row,
                f"{field!r} is {missing if value is None else type(value).__name__}")


def describe_location(piece: dict, loc: int, line_offset: int | None = None) -> str:
    """'file:line' (1-based) where the absolute line is known, else the byte range and local line."""
    fmt, path = piece["format"], piece["path"]
    if fmt in ("text", "jsonl", "json"):
        if piece.get("start", 0) == 0:
            return f"{path}:{loc + 1}"
        if line_offset is not None:
            return f"{path}:{line_offset + loc + 1}"
        return f"{path}: line {loc + 1} of the range starting at byte {piece['start']}"
    if fmt == "hf":
        return f"hf:{path} shard {piece['shard']} record {loc}"
    return f"{path} row {loc}"
