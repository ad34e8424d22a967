"""Metrics out of the trainer: TensorBoard and a JSON Lines file, from rank 0 only; a no-op writer elsewhere."""
from __future__ import annotations

import json
import os
import time


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
