#!/usr/bin/env python
r"""Is the student "40% smaller, 60% faster"? A BERT-base-shaped teacher and the 6-layer DistilBERT student built
from it by the pipeline (`build_student`, init "teacher": every other layer), measured in one run.

    python benchmarks/student_vs_teacher.py                  # CPU here, or the GPU when there is one
    python benchmarks/student_vs_teacher.py --batch-sizes 1 8 32 --seq-lens 128 512 --repeats 5 \
        --out benchmarks/results/student_vs_teacher_cpu.json

The weights are random (seeded): sizes and speed do not depend on their values, and no hub is needed. Both models
are saved with save_pretrained into a temp folder (disk size is that of model.safetensors), then timed with
`launch/compare.py`'s code (`pipeline/evaluation/compare.py`): encoder forward without the MLM head, the two
models interleaved at each shape, median of --repeats after a warm-up, fp32 on CPU and bf16 on GPU.
Speed-up = teacher latency / student latency at the same shape; the paper's "60% faster" is 1.6x.
`--tiny` builds 2-layer / hidden-64 models instead (a smoke run for the tests).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_pair(folder: str, tiny: bool, seed: int = 0) -> tuple[str, str]:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from pipeline.models.student import build_student

    torch.manual_seed(seed)
    if tiny:
        cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=128)
    else:
        cfg = BertConfig()  # bert-base-uncased's shape: 12 x 768, 12 heads, FFN 3072, vocabulary 30522, 512 positions
    teacher = BertForMaskedLM(cfg).eval()
    student = build_student(teacher=teacher, init="teacher", seed=seed)  # DistilBERT, half the layers
    paths = os.path.join(folder, "teacher"), os.path.join(folder, "student")
    teacher.save_pretrained(paths[0])
    student.hf.save_pretrained(paths[1])
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/student_vs_teacher_<dev>.json)")
    args = p.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    from benchmarks.machine import cpu_model

    hf_logging.set_verbosity_error()  # the pooler that BertModel adds to an MLM checkpoint is expected
    hf_logging.disable_progress_bar()
    from pipeline.evaluation.compare import compare

    with tempfile.TemporaryDirectory(prefix="student_vs_teacher-") as tmp:
        teacher, student = build_pair(tmp, args.tiny)
        t0 = time.time()
        r = compare({"teacher": teacher, "student": student}, batch_sizes=args.batch_sizes, seq_lens=args.seq_lens,
                    repeats=args.repeats, device=args.device)
        r["seconds"] = round(time.time() - t0, 1)
    t, s = r["models"]["teacher"], r["models"]["student"]
    print(f"{r['device']} ({r['dtype']}, {r['threads']} threads); teacher {t['layers']} layers, student {s['layers']}")
    print(f"parameters: teacher {t['parameters'] / 1e6:.1f}M, student {s['parameters'] / 1e6:.1f}M "
          f"({100 * (1 - s['parameters'] / t['parameters']):.0f}% fewer); disk {t['disk_bytes'] / 2 ** 20:.1f} vs "
          f"{s['disk_bytes'] / 2 ** 20:.1f} MiB")
    print(f"{'batch':>5s} {'seq':>5s} {'teacher ms':>11s} {'student ms':>11s} {'speedup':>8s} {'student seq/s':>14s}")
    for row in r["timings"]:
        print(f"{row['batch']:5d} {row['seq_len']:5d} {row['teacher']['latency_ms']:11.2f} "
              f"{row['student']['latency_ms']:11.2f} {row['student']['speedup_vs_teacher']:7.2f}x "
              f"{row['student']['sequences_per_s']:14.1f}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    r.update({"date": time.strftime("%Y-%m-%d %H:%M:%S%z"), "commit": commit, "tiny": args.tiny,
              "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
              "command": " ".join(["python", "benchmarks/student_vs_teacher.py", *(argv or sys.argv[1:])])})
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"student_vs_teacher_{'cuda' if 'cpu' != r['device'] else 'cpu'}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(r, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
