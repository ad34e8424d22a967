#!/usr/bin/env python
"""The GLUE suite in one command: every task fine-tuned with several seeds (launch/finetune.py), the median per
task, a table laid out like the DistilBERT paper's Table 1 with its rows beside ours, and a JSON of everything.

    python launch/glue.py --model runs/distil/export/student --output runs/glue              # all 9 tasks, 5 seeds
    python launch/glue.py --model runs/distil/export/student --output runs/glue --tasks sst2,mrpc --seeds 42
    python launch/glue.py --model M --output runs/glue --data-root /data/glue                # local copies

Data: without --data-root, hf:nyu-mll/glue#config=TASK (the hub or the local datasets cache); with it,
DATA_ROOT/TASK/ holding train.* and validation.* files (MNLI: validation_matched.* and validation_mismatched.*)
in GLUE's columns (CSV, TSV, JSON Lines or Parquet; labels as ids or names).
Runs: one after another on CPU or one GPU; on a node with several GPUs, one run per GPU at a time (--gpus).
A run whose report.json exists is reused (--no-resume to redo it): an interrupted suite continues.
Outputs in --output: TASK/seedS/ (model, report.json, finetune.log), glue.json (settings, every run, medians,
macro score, the paper's rows) and glue.md (the table). Exit status: 0 done, 2 bad settings or data, 1 a run failed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.evaluation import glue  # noqa: E402

log = logging.getLogger("glue")


def parse_args(argv=None) -> argparse.Namespace:
    d = glue.DEFAULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (an export) or hub name, with its tokenizer")
    p.add_argument("--output", required=True)
    p.add_argument("--tasks", default="all", help=f"all, or comma-separated of {','.join(glue.ORDER)}")
    p.add_argument("--seeds", default=",".join(map(str, d["seeds"])), help="comma-separated; the median is reported")
    p.add_argument("--data-root", default=None, help="folder with one sub-folder per task (default: the hub)")
    p.add_argument("--gpus", type=int, default=None, help="runs at a time, one per GPU (default: all visible GPUs)")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--epochs", type=float, default=d["epochs"])
    p.add_argument("--max-length", type=int, default=d["max_length"])
    p.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--deepspeed", default="auto", help="passed to launch/finetune.py (auto: ZeRO-2 bf16 on GPUs)")
    p.add_argument("--max-train-samples", type=int, default=None, help="quick runs: first N train examples")
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--keep-models", action="store_true", help="keep each run's fine-tuned weights (large)")
    p.add_argument("--no-resume", action="store_true", help="redo runs that already have a report.json")
    p.add_argument("--name", default=None, help="our row's name in the table (default: the model folder's name)")
    a = p.parse_args(argv)
    try:
        a.tasks = glue.parse_tasks(a.tasks)
    except glue.GlueError as e:
        p.error(str(e))
    try:
        a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: comma-separated integers, got {a.seeds!r}")
    if not a.seeds:
        p.error("--seeds: at least one seed")
    return a


def data_source(a, task: str) -> str:
    if a.data_root is None:
        return f"hf:{glue.HUB_NAME}#config={task}"
    return os.path.join(a.data_root, task)


def finetune_command(a, task: glue.GlueTask, seed: int, out: str) -> list[str]:
    cmd = [sys.executable, os.path.join(ROOT, "launch", "finetune.py"), "--model", a.model,
           "--data", data_source(a, task.name), "--output", out, "--task", task.kind,
           "--text-column", task.text, "--label-column", "label", "--metrics", ",".join(task.metrics),
           "--seed", str(seed), "--lr", str(a.lr), "--batch-size", str(a.batch_size), "--epochs", str(a.epochs),
           "--max-length", str(a.max_length), "--warmup-ratio", str(a.warmup_ratio),
           "--weight-decay", str(a.weight_decay), "--deepspeed", a.deepspeed, "--no-progress"]
    if task.pair:
        cmd += ["--text-pair-column", task.pair]
    if a.max_train_samples:
        cmd += ["--max-train-samples", str(a.max_train_samples)]
    if a.max_eval_samples:
        cmd += ["--max-eval-samples", str(a.max_eval_samples)]
    return cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(a, task: glue.GlueTask, seed: int, gpus: queue.Queue) -> dict:
    """One fine-tuning run in a subprocess (on a free GPU if there are any); its result or its failure."""
    out = os.path.join(a.output, task.name, f"seed{seed}")
    report_path = os.path.join(out, "report.json")
    if not a.no_resume and os.path.exists(report_path):
        with open(report_path) as f:
            rep = json.load(f)
        wall_path = os.path.join(out, "wall.json")
        seconds = json.load(open(wall_path))["seconds"] if os.path.exists(wall_path) else rep["timing"]["total_s"]
        log.info("[glue] %s seed %d: reusing %s", task.name, seed, report_path)
        return {"task": task.name, "seed": seed, "results": rep["results"], "seconds": seconds, "reused": True}
    os.makedirs(out, exist_ok=True)
    gpu = gpus.get()
    env = dict(os.environ)
    if gpu is not None:  # a single-process DeepSpeed run still needs a process group of one
        env.update(CUDA_VISIBLE_DEVICES=str(gpu), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    t0 = time.time()
    log.info("[glue] %s seed %d: started%s", task.name, seed, f" on GPU {gpu}" if gpu is not None else "")
    try:
        with open(os.path.join(out, "finetune.log"), "w") as logf:
            rc = subprocess.run(finetune_command(a, task, seed, out), stdout=logf, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT).returncode
    finally:
        gpus.put(gpu)
    seconds = time.time() - t0
    if rc != 0:
        with open(os.path.join(out, "finetune.log")) as f:
            tail = [line.rstrip() for line in f.readlines()[-8:]]
        log.error("[glue] %s seed %d: failed (exit %d) after %.0fs; %s/finetune.log ends:\n  %s", task.name, seed,
                  rc, seconds, out, "\n  ".join(tail))
        return {"task": task.name, "seed": seed, "failed": rc, "seconds": seconds}
    with open(report_path) as f:
        rep = json.load(f)
    write_json(os.path.join(out, "wall.json"), {"seconds": round(seconds, 2)})  # with the interpreter's start
    if not a.keep_models:
        for name in os.listdir(out):
            if name.endswith((".safetensors", ".bin")):
                os.remove(os.path.join(out, name))
    score = glue.task_score(task, rep["results"])
    log.info("[glue] %s seed %d: score %.2f in %.0fs", task.name, seed, score, seconds)
    return {"task": task.name, "seed": seed, "results": rep["results"], "seconds": round(seconds, 2)}


def visible_gpus(requested: int | None) -> list:
    try:
        import torch
        n = torch.cuda.device_count()
    except Exception:
        n = 0
    n = n if requested is None else min(requested, n)
    return list(range(n)) or [None]


def write_json(path: str, obj) -> None:
    from pipeline.fileio import atomic_write

    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if a.data_root is not None:
        missing = [t for t in a.tasks if not os.path.isdir(os.path.join(a.data_root, t))]
        if missing:
            print(f"error: {a.data_root}: no folder for task(s) {missing} (expected {a.data_root}/TASK/ with "
                  "train.* and validation.* files)", file=sys.stderr)
            return 2
    os.makedirs(a.output, exist_ok=True)
    gpu_list = visible_gpus(a.gpus)
    gpus: queue.Queue = queue.Queue()
    for g in gpu_list:
        gpus.put(g)
    jobs = [(glue.TASKS[t], s) for t in a.tasks for s in a.seeds]
    log.info("[glue] %d run(s): %s x seeds %s, %d at a time (%s)", len(jobs), ",".join(a.tasks), a.seeds,
             len(gpu_list), "GPUs " + ",".join(map(str, gpu_list)) if gpu_list[0] is not None else "CPU")
    t0 = time.time()
    lock = threading.Lock()
    runs: list[dict] = []

    def work(job):
        res = run_one(a, job[0], job[1], gpus)
        with lock:
            runs.append(res)
        return res

    with ThreadPoolExecutor(max_workers=len(gpu_list)) as pool:
        list(pool.map(work, jobs))
    runs.sort(key=lambda r: (glue.ORDER.index(r["task"]), r["seed"]))
    failed = [r for r in runs if "failed" in r]
    summaries = {}
    for t in a.tasks:
        done = [r for r in runs if r["task"] == t and "failed" not in r]
        if done:
            summaries[t] = glue.summarize(glue.TASKS[t], done)
    name = a.name or os.path.basename(os.path.normpath(a.model))
    text = glue.table(summaries, name)
    ratio = glue.paper_ratio(summaries)
    result = {"model": a.model, "tasks": a.tasks, "seeds": a.seeds,
              "settings": {k: getattr(a, k) for k in ("lr", "batch_size", "epochs", "max_length", "warmup_ratio",
                                                      "weight_decay", "deepspeed", "max_train_samples",
                                                      "max_eval_samples", "data_root")},
              "summaries": summaries, "macro_score": glue.macro_score(summaries) if summaries else None,
              "ratio_to_paper_bert_base": ratio, "paper": glue.PAPER, "runs": runs, "failed": len(failed),
              "wall_s": round(time.time() - t0, 1), "table": text}
    write_json(os.path.join(a.output, "glue.json"), result)
    with open(os.path.join(a.output, "glue.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    if ratio is not None:
        print(f"\nmacro score {result['macro_score']:.1f} = {100 * ratio:.1f}% of the paper's BERT-base on these "
              f"tasks; {len(runs) - len(failed)} run(s) in {result['wall_s']:.0f}s; {a.output}/glue.json")
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(f"{r['task']} seed {r['seed']} (exit {r['failed']})"
                                                             for r in failed), file=sys.stderr)
        return 2 if all(r["failed"] == 2 for r in failed) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
