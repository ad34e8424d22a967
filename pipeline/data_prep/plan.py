"""The plan of a dataset: its inputs, settings, tokenizer identity and work units, written first to OUT/plan.json.
Every task of a run (and every re-run into the same folder) must compute the same plan: that is what makes the
output independent of the worker and task counts, and what resuming checks."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time

from pipeline import shards as fmt
from pipeline.fileio import atomic_write

from .config import PrepareConfig, PrepareError
from .sources import group_units, parse_spec, plan_pieces
from .tokenizer import PrepTokenizer

log = logging.getLogger(__name__)


def _plan_settings(cfg: PrepareConfig, unit_bytes: int) -> dict:
    return {"text_field": cfg.text_field, "text_mode": cfg.text_mode, "valid_fraction": cfg.valid_fraction,
            "split_seed": cfg.split_seed, "unit_bytes": unit_bytes, "max_doc_chars": cfg.max_doc_chars,
            "max_record_bytes": cfg.max_record_mb << 20, "max_junk_fraction": cfg.max_junk_fraction,
            "on_bad_file": cfg.on_bad_file}


def make_plan(cfg: PrepareConfig, tok: PrepTokenizer) -> dict:
    sources = [parse_spec(s, i, cfg.text_field, cfg.text_mode) for i, s in enumerate(cfg.inputs)]
    unit_bytes = None if cfg.unit_mb is None else max(1, int(cfg.unit_mb * (1 << 20)))
    pieces, notes, unit_bytes = plan_pieces(sources, unit_bytes)
    for n in notes:
        log.warning(n)
    units = group_units(pieces, unit_bytes)
    files = {}
    for p in pieces:
        if p["format"] not in ("hf",) and os.path.exists(p["path"]) and p["path"] not in files:
            st = os.stat(p["path"])
            files[p["path"]] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns} if os.path.isfile(p["path"]) \
                else {"folder": True}
    info = tok.info()
    ident = {"format_version": fmt.FORMAT_VERSION, "settings": _plan_settings(cfg, unit_bytes),
             "tokenizer": {"fingerprint": info.fingerprint, "vocab_size": info.vocab_size},
             "sources": [s.to_json() for s in sources], "files": files, "units": units}
    plan_id = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return {"plan_id": plan_id, **ident, "tokenizer": info.to_json(), "dtype": tok.dtype.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": cfg.command}


def _diff_plans(a: dict, b: dict) -> list[str]:
    keys = []
    for k in ("settings", "sources", "files", "units"):
        if a.get(k) != b.get(k):
            if isinstance(a.get(k), dict):
                keys += [f"{k}.{kk}" for kk in sorted(set(a[k]) | set(b.get(k) or {})) if a[k].get(kk) != b[k].get(kk)]
            else:
                keys.append(k)
    if a["tokenizer"]["fingerprint"] != b["tokenizer"]["fingerprint"]:
        keys.append("tokenizer (another vocabulary or normalisation)")
    return keys[:10]


def ensure_plan(out: str, plan: dict, overwrite: bool) -> None:
    """Create OUT/plan.json, or check that the one there (another task's, or an earlier run's) is the same
    plan. Creation is atomic and exclusive, so concurrent array tasks agree on one file."""
    path = os.path.join(out, "plan.json")
    if overwrite and os.path.isdir(out):
        for name in ("plan.json", "manifest.json", "token_counts.npy", "bad_records.jsonl",
                     "units", "counts", *fmt.SPLITS):
            p = os.path.join(out, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.unlink(p)
    try:
        with atomic_write(path, "w", exclusive=True) as f:
            json.dump(plan, f, indent=1)
        return
    except FileExistsError:
        pass
    with open(path) as f:
        existing = json.load(f)
    if existing.get("plan_id") != plan["plan_id"]:
        raise PrepareError(
            f"{out} holds a dataset planned from other inputs or settings (differs in: "
            f"{', '.join(_diff_plans(existing, plan)) or 'plan id'}). Re-run with the same arguments to resume, "
            f"pass --overwrite to start over, or choose another --output.")
