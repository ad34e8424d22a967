"""Held-out evaluation during training: fixed validation sequences with fixed masks, so every evaluation of a run
(and of another run on the same data) measures the same thing."""
from __future__ import annotations

import math

import torch

from pipeline.training.distributed import all_reduce_sum
from pipeline.training.step import Counters, forward_losses


@torch.no_grad()
def evaluate(engine, teacher, batches, loss_cfg, device) -> dict:
    """Student and teacher MLM loss and accuracy, KD loss and top-1 agreement on the masked tokens."""
    was_training = engine.training
    engine.eval()
    counters = Counters(device)
    try:
        for batch in batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            terms, stats = forward_losses(engine, teacher, batch, loss_cfg, eval_stats=True)
            counters.add(terms, stats)
    finally:
        engine.train(was_training)
    c = counters.reduce_and_reset(all_reduce_sum)
    n = max(c["micro_steps"], 1.0)
    masked = max(c["masked"], 1.0)
    out = {"eval/student_mlm_loss": c["student_mlm"] / masked,
           "eval/student_mlm_acc": c["student_correct"] / masked,
           "eval/masked_tokens": c["masked"]}
    out["eval/student_perplexity"] = math.exp(min(out["eval/student_mlm_loss"], 50.0))
    if teacher is not None:
        out.update({"eval/teacher_mlm_loss": c["teacher_mlm"] / masked,
                    "eval/teacher_mlm_acc": c["teacher_correct"] / masked,
                    "eval/agreement": c["agree"] / masked,
                    "eval/kd_loss": c["kd"] / n if loss_cfg.kd > 0 else None,
                    "eval/cos_loss": c["cos"] / n if loss_cfg.cos > 0 else None})
    return {k: v for k, v in out.items() if v is not None}
