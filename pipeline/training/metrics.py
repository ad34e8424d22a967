"""Metrics out of the trainer: the training row computed from the step counters (a pure function), and its writer
to TensorBoard and a JSON Lines file, from rank 0 only (a no-op writer elsewhere)."""
from __future__ import annotations

import json
import os
import time

LOSS_TERMS = ("kd", "mlm", "cos", "mse")


def train_row(counters: dict, *, seconds: float, data_wait_s: float, step: int, cfg, plan,
              with_teacher: bool, flops_per_token: float, peak_flops: float | None, lr: float,
              grad_norm: float | None, skipped_steps: int, memory: dict) -> dict:
    """The metrics row of one log interval.

    counters: the all-reduced sums of pipeline.training.step.COUNTERS over the interval (all ranks, all
    micro-steps); seconds and data_wait_s: wall time of the interval and the part spent waiting for batches;
    cfg and plan: the run's RunConfig and BatchPlan (world size included); lr, grad_norm, skipped_steps: the
    engine's readings after the last step; memory: memory_metrics(). Values that do not apply to this run (a loss
    term with weight 0, the teacher's accuracy without a teacher, MFU off a known GPU) are None, and the writer
    leaves them out.
    """
    c = counters
    dt = max(seconds, 1e-9)
    n_steps = c["micro_steps"] / (plan.accumulation * plan.world_size)
    masked = max(c["masked"], 1.0)
    flops_per_s = flops_per_token * c["tokens"] / dt
    row = {"loss/total": c["loss"] / c["micro_steps"]}
    for term in LOSS_TERMS:
        row[f"loss/{term}"] = c[term] / c["micro_steps"] if getattr(cfg.loss, term) > 0 else None
    row.update({
        "train/lr": lr,
        "train/grad_norm": grad_norm,
        "train/student_mlm_acc": c["student_correct"] / masked,
        "train/teacher_mlm_acc": c["teacher_correct"] / masked if with_teacher else None,
        "train/agreement": c["agree"] / masked if with_teacher else None,
        "throughput/tokens_per_s": c["tokens"] / dt,
        "throughput/model_tflops_per_s": flops_per_s / 1e12,
        "throughput/mfu": flops_per_s / (peak_flops * plan.world_size) if peak_flops else None,
        "throughput/samples_per_s": n_steps * plan.global_size / dt,
        "throughput/step_time_s": dt / max(n_steps, 1e-9),
        "throughput/data_wait_frac": data_wait_s / dt,
        "train/samples": step * plan.global_size,
        "train/skipped_steps": skipped_steps,
        **memory,
    })
    return row


def format_train_row(step: int, total_steps: int, row: dict) -> str:
    """The log line of a metrics row: step, losses, accuracy, learning rate, tokens/s."""
    terms = "".join(f" {t} {row[f'loss/{t}']:.4f}" for t in LOSS_TERMS if row.get(f"loss/{t}") is not None)
    return (f"step {step}/{total_steps} loss {row['loss/total']:.4f}{terms} acc {row['train/student_mlm_acc']:.3f} "
            f"lr {row['train/lr']:.2e} {row['throughput/tokens_per_s']:.0f} tok/s")


def memory_metrics(device) -> dict:
    """Peak GPU memory of this process, or its resident memory on CPU, in GiB."""
    if device.type == "cuda":
        import torch
        return {"memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30,
                "memory/max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2 ** 30}
    import psutil
    return {"memory/rss_gib": psutil.Process().memory_info().rss / 2 ** 30}


class MetricWriter:
    """Grouped names (`loss/kd`, `throughput/tokens_per_s`, `memory/...`) to TensorBoard and metrics.jsonl."""

    def __init__(self, run_dir: str | None, tensorboard: bool = True):
        self.enabled = run_dir is not None
        self._tb = None
        self._jsonl = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")

    def write(self, step: int, values: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            for k, v in values.items():
                if v is not None:
                    self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"kind": kind, "step": step, "time": round(time.time(), 3),
                                      **{k: v for k, v in values.items() if v is not None}}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self.enabled = False
