"""Inputs: parse input specs and plan them into work units (readers.py streams documents out of a unit).

An input spec is a path, directory or glob of local files, `hf:NAME` (a Hugging Face dataset, streamed),
or `disk:FOLDER` (a `save_to_disk` folder; a folder holding `dataset_info.json`/`state.json` is recognised
without the prefix). Per-input options follow a `#`: `data/*.jsonl#field=content`,
`hf:wikimedia/wikipedia#config=20231101.en,split=train`, `books/#text_mode=lines`.

Planning is a pure function of the inputs (sorted file lists, sizes, Parquet row groups, dataset shards)
and the unit size, never of the worker or task count: that is what makes the output byte-identical for any
`--workers` and any SLURM array size. Large uncompressed text and JSON Lines files are cut into byte ranges;
a document belongs to the range holding its first line (see `read_text_range`), so ranges read
independently give exactly the documents of one sequential read. Small files are grouped into one unit.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from .readers import BadFileError, load_dataset_source, open_binary
FORMATS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
           ".parquet": "parquet"}
COMPRESSION = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}
COMPRESSION_RATIO_GUESS = 3  # planning estimate of decompressed bytes per compressed byte
SPEC_OPTIONS = {"field", "text_mode", "format", "config", "split"}


class PlanError(ValueError):
    """One or more inputs cannot be used; the message lists every problem."""


@dataclass
class Source:
    index: int
    spec: str
    kind: str  # "files", "disk" or "hf"
    location: str
    field: str = "text"
    text_mode: str = "paragraphs"
    format: str | None = None
    config: str | None = None
    split: str = "train"

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def parse_spec(spec: str, index: int, default_field: str, default_text_mode: str) -> Source:
    location, _, opts = spec.partition("#")
    options = {}
    if opts:
        for item in opts.split(","):
            key, eq, value = item.partition("=")
            if not eq or key not in SPEC_OPTIONS:
                raise PlanError(
                    f"input {spec!r}: bad option {item!r}; options are key=value from {sorted(SPEC_OPTIONS)}"
                )
            options[key] = value
    if location.startswith("hf:"):
        kind, location = "hf", location[3:]
    elif location.startswith("disk:"):
        kind, location = "disk", location[5:]
    elif os.path.isdir(location) and any(
        os.path.exists(os.path.join(location, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    ):
        kind = "disk"
    else:
        kind = "files"
    src = Source(index=index, spec=spec, kind=kind, location=location,
                 field=options.get("field", default_field),
                 text_mode=options.get("text_mode", default_text_mode),
                 format=options.get("format"), config=options.get("config"),
                 split=options.get("split", "train"))
    if src.text_mode not in ("paragraphs", "lines"):
        raise PlanError(f"input {spec!r}: text_mode must be 'paragraphs' or 'lines', not {src.text_mode!r}")
    if src.format not in (None, "text", "jsonl", "json", "parquet"):
        raise PlanError(f"input {spec!r}: format must be one of text, jsonl, json, parquet")
    return src


# ---------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------

def _file_format(path: str, forced: str | None) -> tuple[str | None, str | None]:
    """(format, compression) from the file name; format None for an unknown extension."""
    base, ext = os.path.splitext(path)
    compression = COMPRESSION.get(ext.lower())
    if compression:
        ext = os.path.splitext(base)[1]
    return forced or FORMATS.get(ext.lower()), compression


def _expand_files(src: Source, problems: list[str], notes: list[str]) -> list[str]:
    loc = src.location
    if os.path.isdir(loc):
        found, skipped = [], []
        for root, dirs, files in os.walk(loc):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                path = os.path.join(root, name)
                (found if (src.format or _file_format(path, None)[0]) else skipped).append(path)
        if skipped:
            notes.append(f"{loc}: skipped {len(skipped)} file(s) with unknown extensions (e.g. {skipped[0]}); "
                         f"name them explicitly or add #format=text to read them")
        if not found:
            problems.append(f"{src.spec}: directory has no input files ({', '.join(FORMATS)}, optionally .gz/.zst)")
        return sorted(found)
    if any(c in loc for c in "*?["):
        found = sorted(p for p in glob.glob(loc, recursive=True) if os.path.isfile(p))
        if not found:
            problems.append(f"{src.spec}: glob matches no files")
        return found
    if not os.path.exists(loc):
        problems.append(f"{src.spec}: no such file or directory")
        return []
    return [loc]


def _sniff_json_array(path: str, compression: str | None) -> bool:
    with open_binary(path, compression) as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def plan_pieces(sources: list[Source], unit_bytes: int | None) -> tuple[list[dict], list[str], int]:
    """Every input as a list of pieces (a file byte range, Parquet row groups, dataset rows or a dataset
    shard), each with an estimated size; plus planning notes and the unit size used. Raises PlanError
    listing every unusable input."""
    problems: list[str] = []
    notes: list[str] = []
    entries = []  # (source, format, path, compression, size, extra)
    for src in sources:
        if src.kind == "files":
            entries += [e for path in _expand_files(src, problems, notes)
                        if (e := _file_entry(src, path, problems)) is not None]
        elif (e := _dataset_entry(src, problems)) is not None:
            entries.append(e)
    if problems:
        raise PlanError("cannot use these inputs:\n  - " + "\n  - ".join(problems))
    if not entries:
        raise PlanError("no inputs given")
    if unit_bytes is None:
        unit_bytes = auto_unit_bytes(sum(e[4] * (COMPRESSION_RATIO_GUESS if e[3] else 1) for e in entries))
    return [p for e in entries for p in _pieces(*e, unit_bytes)], notes, unit_bytes


def _file_entry(src: Source, path: str, problems: list[str]) -> tuple | None:
    fmt, compression = _file_format(path, src.format)
    fmt = fmt or "text"
    if fmt == "parquet" and compression:
        problems.append(f"{path}: compressed Parquet files are not supported (Parquet compresses itself)")
        return None
    try:
        size = os.path.getsize(path)
    except OSError as e:
        problems.append(f"{path}: cannot stat ({e.strerror})")
        return None
    extra = {}
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
        except Exception as e:
            problems.append(f"{path}: unreadable Parquet file ({type(e).__name__}: {e})")
            return None
        if src.field not in meta.schema.names:
            problems.append(f"{path}: Parquet file has no column {src.field!r} (columns: {meta.schema.names}); "
                            f"pick one with #field=NAME or --text-field")
            return None
        extra["row_groups"] = [(meta.row_group(i).num_rows, meta.row_group(i).total_byte_size)
                               for i in range(meta.num_row_groups)]
    elif fmt == "json":
        try:
            fmt = "json" if _sniff_json_array(path, compression) else "jsonl"
        except (OSError, EOFError, BadFileError) as e:
            problems.append(f"{path}: cannot read ({e})")
            return None
    return src, fmt, path, compression, size, extra


def _dataset_entry(src: Source, problems: list[str]) -> tuple | None:
    """A disk: or hf: input: its rows (disk) or shards (hf)."""
    try:
        ds = load_dataset_source(src)
        n_shards = int(getattr(ds, "num_shards", None) or getattr(ds, "n_shards", 1) or 1)
    except Exception as e:
        if src.kind == "disk":
            problems.append(f"{src.spec}: cannot load_from_disk ({type(e).__name__}: {e})")
        else:
            first = str(e).splitlines()[0] if str(e) else ""
            problems.append(
                f"{src.spec}: could not open Hugging Face dataset {src.location!r} (config={src.config}, "
                f"split={src.split}) in streaming mode: {type(e).__name__}: {first}. Without internet, "
                f"download it elsewhere (datasets.load_dataset(...).save_to_disk(FOLDER)) and pass "
                f"disk:FOLDER, or point hf: at a local folder of data files")
        return None
    if src.kind == "hf":
        return src, "hf", src.location, None, 0, {"n_shards": n_shards}
    if src.field not in ds.column_names:
        problems.append(f"{src.spec}: dataset has no column {src.field!r} (columns: {ds.column_names}); "
                        f"pick one with #field=NAME or --text-field")
        return None
    return src, "disk", os.path.abspath(src.location), None, int(ds.data.nbytes), {"rows": len(ds)}


def _pieces(src: Source, fmt: str, path: str, compression: str | None, size: int, extra: dict,
            unit_bytes: int) -> list[dict]:
    """The pieces of one input: byte ranges of uncompressed text and JSON Lines files, groups of Parquet row
    groups, row ranges of a dataset, dataset shards; anything else (compressed, a JSON array) read whole."""
    base = {"source": src.index, "format": fmt, "path": path}
    pieces = []
    if fmt in ("text", "jsonl") and not compression:
        n = max(1, -(-size // unit_bytes))
        for i in range(n):
            start, end = i * unit_bytes, min(size, (i + 1) * unit_bytes)
            pieces.append({**base, "start": start, "end": end if i < n - 1 else None, "est_bytes": end - start})
    elif fmt == "parquet":
        group, est, row0 = [], 0, 0
        for i, (rows, nbytes) in enumerate(extra["row_groups"]):
            if group and est + nbytes > unit_bytes:
                pieces.append({**base, "row_groups": group, "first_row": row0, "est_bytes": est})
                row0 += sum(extra["row_groups"][g][0] for g in group)
                group, est = [], 0
            group.append(i)
            est += nbytes
        if group or not pieces:
            pieces.append({**base, "row_groups": group, "first_row": row0, "est_bytes": est})
    elif fmt == "disk":
        rows = extra["rows"]
        per_row = max(1, size // max(rows, 1))
        step = max(1, unit_bytes // per_row)
        for a in range(0, max(rows, 1), step):
            b = min(rows, a + step)
            pieces.append({**base, "rows": [a, b], "est_bytes": (b - a) * per_row})
    elif fmt == "hf":
        for k in range(extra["n_shards"]):
            pieces.append({**base, "shard": k, "n_shards": extra["n_shards"], "est_bytes": unit_bytes})
    else:
        pieces.append({**base, "compression": compression, "start": 0, "end": None,
                       "est_bytes": size * (COMPRESSION_RATIO_GUESS if compression else 1)})
    return pieces


def auto_unit_bytes(total_bytes: int) -> int:
    """At least ~64 units for load balance, each between 1 MiB and 64 MiB, a power of two.
    Depends on the corpus only, so the output does not depend on the worker count."""
    mib = 1 << 20
    target = max(mib, min(64 * mib, total_bytes // 64))
    return 1 << (target.bit_length() - 1)


def group_units(pieces: list[dict], unit_bytes: int) -> list[dict]:
    """Consecutive pieces grouped until a unit holds about `unit_bytes`; each unit becomes one shard."""
    units, current, est = [], [], 0
    for p in pieces:
        if current and est + p["est_bytes"] > unit_bytes:
            units.append(current)
            current, est = [], 0
        current.append(p)
        est += p["est_bytes"]
    if current:
        units.append(current)
    return [{"id": i, "pieces": u, "est_bytes": sum(p["est_bytes"] for p in u)} for i, u in enumerate(units)]
