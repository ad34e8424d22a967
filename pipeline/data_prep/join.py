"""Join: once every unit of the plan is done (by one task or by all tasks of an array), sum the token counts,
resolve bad-record line numbers and write manifest.json, last. Shard files stay where they are."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import time
from collections import Counter

import numpy as np

from pipeline import shards as fmt
from pipeline.fileio import atomic_write

from .config import PrepareError
from .readers import describe_location

log = logging.getLogger(__name__)


def join(out: str, wall_seconds: float | None = None, command: list | None = None) -> dict:
    """Check every unit of the plan is complete, sum the token counts, resolve bad-record line numbers and
    write manifest.json (last, atomically). Shard files stay where they are: nothing is copied."""
    out = os.path.abspath(out)
    plan_path = os.path.join(out, "plan.json")
    if not os.path.exists(plan_path):
        raise PrepareError(f"{out} has no plan.json: run prepare first")
    with open(plan_path) as f:
        plan = json.load(f)
    records, problems = [], []
    for unit in plan["units"]:
        rel = fmt.unit_paths(unit["id"])["record"]
        path = os.path.join(out, rel)
        if not os.path.exists(path):
            problems.append(f"unit {unit['id']}: not done ({rel} missing)")
            continue
        with open(path) as f:
            rec = json.load(f)
        if rec.get("plan_id") != plan["plan_id"]:
            problems.append(f"unit {unit['id']}: made by another plan ({rec.get('plan_id')} != {plan['plan_id']})")
            continue
        problems += [f"unit {unit['id']}: {p}" for p in fmt.check_files(out, rec, full=False)]
        records.append(rec)
    if problems:
        head = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise PrepareError(f"cannot join {out}: {len(problems)} unit(s) incomplete. Re-run the preparation (or the "
                           "failed array tasks) with the same arguments; completed units are skipped.\n  - "
                           + "\n  - ".join(head))

    # temporary files of an earlier join that was killed while writing (validate reports them)
    for name in os.listdir(out):
        if name.startswith(tuple(f"{n}{fmt.TMP_MARK}" for n in ("manifest.json", "token_counts.npy",
                                                                  "bad_records.jsonl"))):
            try:
                os.unlink(os.path.join(out, name))
            except OSError:
                pass

    counts = np.zeros(plan["tokenizer"]["vocab_size"], np.int64)
    for rec in records:
        counts += np.load(os.path.join(out, rec["counts"]["file"]))
    buf = io.BytesIO()
    np.save(buf, counts)
    with atomic_write(os.path.join(out, "token_counts.npy")) as f:
        f.write(buf.getvalue())

    # Absolute line numbers: the pieces of a file are consecutive in plan order, each record knows how many
    # lines started in its pieces, so a prefix sum gives each piece's first line.
    line_offset, running = {}, {}
    rec_by_unit = {r["unit"]: r for r in records}
    for unit in plan["units"]:
        for pi, piece in enumerate(unit["pieces"]):
            key = (piece["path"], piece.get("start"))
            line_offset[key] = running.get(piece["path"], 0)
            n = rec_by_unit[unit["id"]]["piece_lines"][pi]
            running[piece["path"]] = running.get(piece["path"], 0) + (n or 0)
    bad_lines = []
    for unit in plan["units"]:
        rec = rec_by_unit[unit["id"]]
        for b in rec["bad_records"]:
            piece = unit["pieces"][b["piece"]]
            where = describe_location(piece, b["loc"], line_offset.get((piece["path"], piece.get("start"))))
            bad_lines.append(json.dumps({"where": where, "reason": b["reason"], "detail": b["detail"]}))
        for s in rec.get("skipped_files", []):
            bad_lines.append(json.dumps({"where": s["path"], "reason": "skipped_file", "detail": s["reason"]}))
    with atomic_write(os.path.join(out, "bad_records.jsonl"), "w") as f:
        f.writelines(line + "\n" for line in bad_lines)

    summary = task_summary({r["unit"]: r for r in records}, wall_seconds or 0.0)
    summary.pop("units_resumed")
    if wall_seconds is None:
        for k in ("seconds", "tokens_per_s", "documents_per_s"):
            summary.pop(k)
    summary["worker_seconds"] = round(sum(r["seconds"] for r in records), 2)
    summary["tokenizer_seconds"] = round(sum(r.get("tokenizer_seconds", 0.0) for r in records), 2)
    shards = {s: [{"unit": r["unit"], **{k: v for k, v in r["splits"][s].items()}} for r in records]
              for s in fmt.SPLITS}
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "plan_id": plan["plan_id"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dtype": plan["dtype"],
        "index_dtype": "int64",
        "tokenizer": plan["tokenizer"],
        "split": {"method": "blake2b-64 of the document text keyed by split_seed < valid_fraction * 2^64",
                  "valid_fraction": plan["settings"]["valid_fraction"], "split_seed": plan["settings"]["split_seed"]},
        "settings": plan["settings"],
        "sources": plan["sources"],
        "command": plan["command"],
        "join_command": command or list(sys.argv),
        "totals": summary["splits"],
        "shards": shards,
        "token_counts": {"file": "token_counts.npy", "split": "train", "bytes": len(buf.getvalue()),
                         "sha256": hashlib.sha256(buf.getvalue()).hexdigest()},
        "bad_records": {"file": "bad_records.jsonl", "count": len(bad_lines)},
        "stats": summary,
    }
    with atomic_write(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    return manifest


def task_summary(records: dict, wall: float) -> dict:
    dropped, repaired, bad = Counter(), Counter(), Counter()
    docs = tokens = read = 0
    resumed = skipped_files = 0
    split_totals = {s: {"documents": 0, "tokens": 0} for s in fmt.SPLITS}
    for rec in records.values():
        st = rec["stats"]
        dropped.update(st["dropped"])
        repaired.update(st["repaired"])
        bad.update(st["bad_records"])
        read += st["documents_read"]
        skipped_files += len(rec.get("skipped_files", []))
        resumed += bool(rec.get("resumed"))
        for s in fmt.SPLITS:
            split_totals[s]["documents"] += rec["splits"][s]["docs"]
            split_totals[s]["tokens"] += rec["splits"][s]["tokens"]
    docs = sum(v["documents"] for v in split_totals.values())
    tokens = sum(v["tokens"] for v in split_totals.values())
    return {"units": len(records), "units_resumed": resumed, "documents_read": read, "documents": docs,
            "tokens": tokens, "splits": split_totals, "dropped": dict(dropped), "repaired": dict(repaired),
            "bad_records": dict(bad), "skipped_files": skipped_files, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / max(wall, 1e-9)), "documents_per_s": round(docs / max(wall, 1e-9))}


def log_summary(s: dict, what: str) -> None:
    log.info("%s %s documents (train %s, valid %s) and %s tokens from %s units (%s resumed) in %.1f s: "
             "%s docs/s, %s tok/s", what, f"{s['documents']:,}", f"{s['splits']['train']['documents']:,}",
             f"{s['splits']['valid']['documents']:,}", f"{s['tokens']:,}", s["units"], s["units_resumed"],
             s["seconds"], f"{s['documents_per_s']:,}", f"{s['tokens_per_s']:,}")
    log.info("dropped %s; repaired %s; bad records %s; skipped files %d",
             _fmt_counts(s["dropped"]), _fmt_counts(s["repaired"]), _fmt_counts(s["bad_records"]), s["skipped_files"])


def _fmt_counts(c: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(c.items())) if c else "none"
