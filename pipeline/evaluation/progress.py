"""Progress lines for a fine-tuning run's log file: the Trainer's tqdm bar is unreadable in a batch job's log
(carriage returns, one line per refresh), and its plain-dict printer shows neither speed nor ETA.

    step 120/900 (13%) epoch 0.40 loss 0.5123 lr 4.1e-05 212 ex/s ETA 3m41s
    eval epoch 1.00 step 300: validation accuracy 0.9120 f1 0.9347 loss 0.2811

One line at most every `every_s` seconds (and at the last step), from the main process only.
"""
from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressLogCallback(TrainerCallback):
    """Logs step, loss, learning rate, examples per second and ETA while training, and each evaluation."""

    def __init__(self, examples_per_step: int, every_s: float = 30.0, eval_name: str = "validation"):
        self.examples_per_step = examples_per_step
        self.every_s = every_s
        self.eval_name = eval_name
        self.loss = self.lr = None
        self.t_start = self.t_last = 0.0
        self.step_last = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.t_start = self.t_last = time.time()
        self.step_last = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The Trainer logs the mean training loss every `logging_steps`: a progress line goes with it, at most
        one every `every_s` seconds (and always at the last step)."""
        logs = logs or {}
        if "loss" not in logs or not state.is_world_process_zero:
            return
        self.loss, self.lr = logs["loss"], logs.get("learning_rate", self.lr)
        now = time.time()
        if now - self.t_last < self.every_s and state.global_step < state.max_steps:
            return
        rate = (state.global_step - self.step_last) * self.examples_per_step / max(now - self.t_last, 1e-9)
        per_step = (now - self.t_start) / max(state.global_step, 1)
        eta = (state.max_steps - state.global_step) * per_step
        parts = [f"step {state.global_step}/{state.max_steps} ({100 * state.global_step / state.max_steps:.0f}%)",
                 f"epoch {state.epoch:.2f}", f"loss {self.loss:.4f}"]
        if self.lr is not None:
            parts.append(f"lr {self.lr:.2e}")
        parts += [f"{rate:.0f} ex/s", f"ETA {duration(eta)}"]
        log.info("[finetune] %s", " ".join(parts))
        self.t_last, self.step_last = now, state.global_step

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or not metrics:
            return
        shown = " ".join(f"{k[len('eval_'):]} {v:.4f}" for k, v in metrics.items()
                         if k.startswith("eval_") and isinstance(v, float) and not k.endswith(
                             ("_runtime", "_per_second")))
        log.info("[finetune] eval epoch %.2f step %d: %s %s", state.epoch or 0.0, state.global_step, self.eval_name,
                 shown)
