#!/usr/bin/env python
"""What verified checkpoints cost: write, verify and resume time against checkpoint size, and the stall bound.

Part 1 (one process, a real DeepSpeed ZeRO-2 engine on CPU, fp32 AdamW after one step) for each student size:
  - write: our `checkpoint.save` (every file checksummed while torch.save writes it, manifest, no HF export; with
    each checksum of --hashes) against
    DeepSpeed's own `save_checkpoint` of the same engine in the same run (the baseline), interleaved, best of
    --repeats; seconds, seconds per GB, ratio ours / DeepSpeed's;
  - verify: `checkpoint.verify` (size + checksum of every file) with the files in the page cache (just written) and
    evicted from it (posix_fadvise DONTNEED on each file: a cold read, as after a restart on another node);
  - resume: choosing the checkpoint (`find_resume`: verification included) plus `checkpoint.load` into the engine.
Part 2 (--stall, needs --teacher and --data): a 2-rank `deepspeed` job with train.stall_timeout_s=T; one rank is
stopped with SIGSTOP after a few steps and the time to the end of the job is measured.

    python benchmarks/checkpoints.py --hidden 256 768 [--repeats 3] [--hashes xxh3_128 sha256] [--out FILE.json]
    python benchmarks/checkpoints.py --hidden --stall --teacher T --data D --stall-timeout 10
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _engine(hidden: int, layers: int):
    import deepspeed
    import torch

    from pipeline.models import build_student

    student = build_student(arch="distilbert", init="random", n_layers=layers, hidden_size=hidden,
                            n_heads=max(1, hidden // 64), ffn_size=4 * hidden, vocab_size=30522, max_position=512,
                            dropout=0.1, attention_dropout=0.1, seed=0)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    cfg = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
           "gradient_clipping": 1.0}
    engine, *_ = deepspeed.initialize(model=student, optimizer=opt, config=cfg)
    ids = torch.randint(1000, 2000, (1, 32))
    _, logits = engine(ids, torch.ones_like(ids))
    engine.backward(logits.float().logsumexp(-1).mean())  # any loss: one step fills Adam's moments
    engine.step()
    return engine, student


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _evict(path: str) -> None:
    for d, _, fs in os.walk(path):
        for f in fs:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure_io(hidden: int, layers: int, repeats: int, workdir: str, hashes: list[str]) -> list[dict]:
    from pipeline.training import checkpoint as ckpt

    engine, student = _engine(hidden, layers)
    rows = []
    default = ckpt.HASH
    try:
        for name in hashes:
            ckpt.HASH = name
            rows.append({"hash": name, **_measure_engine(ckpt, engine, student, hidden, layers, repeats, workdir)})
    finally:
        ckpt.HASH = default
    return rows


def _measure_engine(ckpt, engine, student, hidden, layers, repeats, workdir) -> dict:
    run_dir = os.path.join(workdir, f"h{hidden}")
    init = os.path.join(run_dir, "student_init")
    student.hf.config.save_pretrained(init)
    ours, theirs, verify_warm, verify_cold, resume = [], [], [], [], []
    size = 0
    for r in range(repeats):
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
        shutil.rmtree(os.path.join(run_dir, "baseline"), ignore_errors=True)
        for which in (("ours", "ds") if r % 2 == 0 else ("ds", "ours")):  # alternate the order between rounds
            t0 = time.perf_counter()
            if which == "ours":
                path = ckpt.save(engine, run_dir, step=1, trainer_state={"step": 1, "samples": 1}, rank=0,
                                 student_init=init, export_hf=False, keep_last=2, log=lambda m: None)
                ours.append(time.perf_counter() - t0)
            else:
                engine.save_checkpoint(os.path.join(run_dir, "baseline"), tag="step1", save_latest=False)
                theirs.append(time.perf_counter() - t0)
        size = _folder_bytes(path)
        t0 = time.perf_counter()
        assert ckpt.verify(path) == []
        verify_warm.append(time.perf_counter() - t0)
        _evict(path)
        t0 = time.perf_counter()
        assert ckpt.verify(path) == []
        verify_cold.append(time.perf_counter() - t0)
        _evict(path)
        t0 = time.perf_counter()
        found = ckpt.find_resume(run_dir, "auto")
        ckpt.load(engine, found, 0, universal=False)
        resume.append(time.perf_counter() - t0)
    gb = size / 1e9
    best = {k: min(v) for k, v in (("write_ours_s", ours), ("write_deepspeed_s", theirs), ("verify_warm_s", verify_warm),
                                   ("verify_cold_s", verify_cold), ("resume_cold_s", resume))}
    return {"hidden": hidden, "layers": layers, "params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 1),
            "checkpoint_gb": round(gb, 3), **{k: round(v, 3) for k, v in best.items()},
            "write_ratio_ours_over_deepspeed": round(best["write_ours_s"] / best["write_deepspeed_s"], 3),
            "write_ours_s_per_gb": round(best["write_ours_s"] / gb, 3),
            "write_deepspeed_s_per_gb": round(best["write_deepspeed_s"] / gb, 3),
            "verify_warm_s_per_gb": round(best["verify_warm_s"] / gb, 3),
            "verify_cold_s_per_gb": round(best["verify_cold_s"] / gb, 3), "repeats": repeats}


def measure_stall(teacher: str, data: str, timeout_s: float, workdir: str) -> dict:
    from pipeline.training.faults import rank_processes
    from pipeline.training.watchdog import poll_interval

    run = os.path.join(workdir, "stall")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
           str(29600 + os.getpid() % 1000), os.path.join(ROOT, "launch", "pretrain.py"), "--config", "tiny_cpu",
           f"teacher.name_or_path={teacher}", f"data.path={data}", f"run_dir={run}", "train.max_steps=100000",
           "checkpoint.every_steps=0", "eval.n_samples=0", "logging.every_steps=1", "logging.progress=false",
           f"train.stall_timeout_s={timeout_s}"]
    log = open(run + ".log", "w")
    job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    metrics = os.path.join(run, "metrics.jsonl")
    while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3):
        if job.poll() is not None:
            raise RuntimeError(f"the job ended early; see {run}.log")
        time.sleep(0.1)
    stopped = rank_processes(job.pid)[1]
    t0 = time.perf_counter()
    stopped.send_signal(signal.SIGSTOP)
    rc = job.wait()
    elapsed = time.perf_counter() - t0
    try:
        stopped.kill()
    except Exception:
        pass
    message = [line for line in open(run + ".log") if "stall: rank" in line]
    return {"stall_timeout_s": timeout_s, "poll_s": poll_interval(timeout_s), "sigstop_to_exit_s": round(elapsed, 1),
            "exit_code": rc, "message": message[0].strip() if message else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, nargs="*", default=[256, 768], help="student hidden sizes (6 layers)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hashes", nargs="+", default=["xxh3_128", "sha256"], help="checksums to compare")
    p.add_argument("--stall", action="store_true")
    p.add_argument("--stall-timeout", type=float, default=10.0)
    p.add_argument("--teacher")
    p.add_argument("--data")
    p.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temporary folder)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    workdir = a.workdir or tempfile.mkdtemp(prefix="ckpt_bench_")
    results = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "workdir": workdir,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "io": [], "stall": None}
    if a.hidden:
        from pipeline.training.distributed import init_distributed
        init_distributed()
        for h in a.hidden:
            for row in measure_io(h, a.layers, a.repeats, workdir, a.hashes):
                results["io"].append(row)
                print(json.dumps(row), flush=True)
    if a.stall:
        results["stall"] = measure_stall(a.teacher, a.data, a.stall_timeout, workdir)
        print(json.dumps(results["stall"]), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
