#!/usr/bin/env python
"""How much warning a preempted job needs: the time from SIGUSR1 to every rank having checkpointed and exited.

Runs a real distillation (`deepspeed` launcher, DS_ACCELERATOR=cpu unless a GPU is present), waits for a few steps,
sends SIGUSR1 to every rank (as slurm/pretrain.sbatch does), and reports the signal-to-exit time against the step
time and the checkpoint write time the trainer logged in the same run. The lead time to give SLURM
(`--signal=B:USR1@<lead>`) is at least one step + one checkpoint write + the exit; the ratio printed at the end is
measured/(step + checkpoint).

    python benchmarks/preemption_lead.py --teacher runs/quickstart/teacher/student --data runs/quickstart/data \
        [--recipe tiny_cpu] [--ranks 2] [-- key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from pipeline.training.faults import rank_processes  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--recipe", default="tiny_cpu")
    p.add_argument("--ds-config", default=os.path.join(ROOT, "ds_configs", "zero2_fp32.json"))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--signal-at-step", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    run = tempfile.mkdtemp(prefix="lead_")
    env = {**os.environ, "DISTIL_REQUEUE": "0"}
    env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(a.ranks),
           os.path.join(ROOT, "launch", "pretrain.py"), "--config", a.recipe, "--deepspeed_config", a.ds_config,
           f"teacher.name_or_path={a.teacher}", f"data.path={a.data}", f"run_dir={run}", "train.max_steps=1000",
           "logging.every_steps=1", "logging.progress=false", "eval.every_steps=0", "eval.n_samples=0",
           "checkpoint.every_steps=0", *a.overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = os.path.join(run, "metrics.jsonl")
    while True:
        if proc.poll() is not None:
            print(proc.stdout.read()[-3000:])
            return 1
        if os.path.exists(metrics):
            rows = [json.loads(x) for x in open(metrics)]
            if rows and rows[-1]["step"] >= a.signal_at_step:
                break
        time.sleep(0.05)
    step_times = [r["throughput/step_time_s"] for r in rows[1:]] or [rows[-1]["throughput/step_time_s"]]
    t0 = time.time()
    for r in rank_processes(proc.pid).values():
        r.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate()
    lead = time.time() - t0
    ckpt = [float(m) for m in re.findall(r"\] checkpoint .* \(([0-9.]+) s\)", out)]
    step = sorted(step_times)[len(step_times) // 2]
    result = {"signal_to_exit_s": round(lead, 2), "median_step_s": round(step, 3),
              "checkpoint_s": ckpt[-1] if ckpt else None, "exit_code": proc.returncode,
              "ratio_to_step_plus_checkpoint": round(lead / (step + (ckpt[-1] if ckpt else 0)), 2),
              "recipe": a.recipe, "ranks": a.ranks, "overrides": a.overrides}
    print(json.dumps(result, indent=1))
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
