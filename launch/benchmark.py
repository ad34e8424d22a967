#!/usr/bin/env python
"""Distillation step speed: our step against the reference recipe's step, on this machine, in one run.

    python launch/benchmark.py                                   # CPU, small models
    python launch/benchmark.py --device cuda --preset bert-base  # one GPU: BERT-base teacher, 6 x 768 student, bf16

For each sequence length (default 128 and 512) it alternates the two steps for --rounds rounds, each in a fresh
process, and prints real tokens/s, step time, MFU (GPU) and peak memory of each, and the ratio ours / reference
(medians). Then the peak memory of the KD + MLM loss alone, plain (full logits) against chunked, at the same rows.
What each step does: benchmarks/step_speed.py. Results: --output (default
benchmarks/results/step_speed_<device>_<preset>.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def default_data() -> str | None:
    quick = os.path.join(ROOT, "runs", "quickstart", "data")
    return quick if os.path.exists(os.path.join(quick, "manifest.json")) else None


def main(argv=None) -> int:
    from benchmarks.machine import cpu_model
    from benchmarks.step_speed import PRESETS, Job, in_subprocess, median_by

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cpu-small on CPU, bert-base on GPU")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    p.add_argument("--micro", type=int, default=None, help="sequences per step (default: the preset's per length)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 4 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on CPU, 5 on GPU)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians are reported")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk of our loss (default: the preset's: "
                                                                 "4096 for bert-base, 1024 for cpu-small)")
    p.add_argument("--compile", action="store_true", help="torch.compile our student and teacher")
    p.add_argument("--data", default=None, help="prepared dataset for real document lengths (default: the "
                                                   "quickstart's, runs/quickstart/data)")
    p.add_argument("--document", action="store_true",
                   help="also time our step on the reference's padded document batches, unpadded (data.unpad) and "
                        "padded")
    p.add_argument("--eager-loss", action="store_true",
                   help="also time our step with the chunked loss's softmax math eager (loss.compile_chunks=false; "
                        "it is compiled on GPU by default)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after the timed steps of round 1, profile 3 more steps of each variant with torch.profiler "
                        "and write where the time goes to DIR/profile_<variant>_<seq>.txt")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    preset = args.preset or ("bert-base" if args.device == "cuda" else "cpu-small")
    steps = args.steps or (20 if args.device == "cuda" else 4)
    warmup = args.warmup if args.warmup is not None else (5 if args.device == "cuda" else 1)
    chunk = args.chunk_size or PRESETS[preset]["chunk"]
    data = args.data or default_data()
    if data is None:
        print("benchmark: no prepared dataset for the document lengths: pass --data <prepared dataset> or run "
              "`bash launch/quickstart.sh` first (it prepares runs/quickstart/data)", file=sys.stderr)
        return 2

    from tqdm import tqdm

    results, summary = [], []
    variants = (("reference", "ours") + (("ours_eager_loss",) if args.eager_loss else ())
                + (("ours_document", "ours_document_padded") if args.document else ()))
    jobs = [(L, v, r) for L in args.seq_lens for r in range(args.rounds) for v in variants]
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    for L, variant, r in tqdm(jobs, desc="benchmark", unit="run", file=sys.stderr):
        prof = os.path.join(args.profile, f"profile_{variant}_{L}.txt") if args.profile and r == 0 else None
        job = Job(variant=variant, preset=preset, seq_len=L, micro=args.micro or PRESETS[preset]["micro"][L],
                  steps=steps, warmup=warmup, device=args.device, data=data, chunk_size=chunk,
                  compile=args.compile, profile=prof)
        results.append(in_subprocess("step", job.__dict__))
    mem_key = "peak_memory_gib" if args.device == "cuda" else "peak_rss_gib"
    print(f"\n{preset} on {args.device}, median of {args.rounds} rounds, {steps} timed steps each")
    print(f"{'seq':>5} {'step':>20} {'micro':>5} {'tokens/s':>12} {'step s':>8} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak GiB':>9}")
    for L in args.seq_lens:
        row = {"seq_len": L}
        for v in variants:
            rs = [r for r in results if r["seq_len"] == L and r["variant"] == v]
            tps, st, tf = median_by(rs, "tokens_per_s"), median_by(rs, "step_s"), median_by(rs, "model_tflops_per_s")
            mem = max(r[mem_key] for r in rs)
            mfu = median_by(rs, "mfu_vs_h100_measured_bf16") if args.device == "cuda" else None
            row[v] = {"tokens_per_s": tps, "step_s": st, "tflops": tf, "peak_gib": mem, "mfu": mfu,
                      "pad_fraction": 1 - rs[0]["tokens"] / rs[0]["padded_tokens"]}
            print(f"{L:>5} {v:>20} {rs[0]['micro']:>5} {tps:>12,.0f} {st:>8.3f} {tf:>8.3f} "
                  f"{'-' if mfu is None else f'{mfu:.1%}':>6} {mem:>9.2f}")
        row["ratio_tokens_per_s"] = row["ours"]["tokens_per_s"] / row["reference"]["tokens_per_s"]
        print(f"{L:>5} {'ours/ref':>20} {'':>5} {row['ratio_tokens_per_s']:>11.2f}x   "
              f"(reference batches {row['reference']['pad_fraction']:.0%} padding)")
        if args.eager_loss:
            row["ratio_compiled_over_eager_loss"] = (row["ours"]["tokens_per_s"]
                                                     / row["ours_eager_loss"]["tokens_per_s"])
            print(f"{L:>5} {'ours/ours_eager_loss':>20} {'':>5} {row['ratio_compiled_over_eager_loss']:>11.2f}x")
        if args.document:
            row["ratio_document_tokens_per_s"] = row["ours_document"]["tokens_per_s"] / row["reference"]["tokens_per_s"]
            row["ratio_unpad_over_padded"] = (row["ours_document"]["tokens_per_s"]
                                              / row["ours_document_padded"]["tokens_per_s"])
            print(f"{L:>5} {'ours_document/ref':>20} {'':>5} {row['ratio_document_tokens_per_s']:>11.2f}x   "
                  f"(unpadded / padded document batches: {row['ratio_unpad_over_padded']:.2f}x)")
        summary.append(row)

    # The loss alone: plain full logits against chunked, at the rows of the longest setting's micro batch
    L = max(args.seq_lens)
    rows = (args.micro or PRESETS[preset]["micro"][L]) * L
    hidden, vocab = PRESETS[preset]["hidden"], PRESETS[preset]["vocab"]
    mem = {v: in_subprocess("loss", {"variant": v, "rows": rows, "hidden": hidden, "vocab": vocab,
                                     "device": args.device, "chunk_size": chunk})
           for v in ("plain", "chunked") + (("chunked_compiled",) if args.device == "cuda" else ())}
    mem_ratio = mem["chunked"]["peak_extra_gib"] / max(mem["plain"]["peak_extra_gib"], 1e-9)
    print(f"\nKD + MLM loss alone, {rows} rows x {vocab} vocabulary, forward + backward: plain "
          f"{mem['plain']['peak_extra_gib']:.2f} GiB, chunked ({chunk} rows) "
          f"{mem['chunked']['peak_extra_gib']:.2f} GiB: {mem_ratio:.2f}x"
          + (f"; chunked, compiled {mem['chunked_compiled']['peak_extra_gib']:.2f} GiB" if "chunked_compiled" in mem
             else ""))
    out = args.output or os.path.join(ROOT, "benchmarks", "results", f"step_speed_{args.device}_{preset}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "machine": cpu_model(), "command": sys.argv, "summary": summary,
                   "loss_memory": mem, "loss_memory_ratio": mem_ratio, "runs": results}, f, indent=1)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
