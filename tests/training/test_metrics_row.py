"""The training metrics row is a pure function of the reduced counters, the timings and the config."""
from __future__ import annotations

import pytest

from pipeline.training.config import BatchPlan, RunConfig
from pipeline.training.metrics import format_train_row, train_row
from pipeline.training.step import COUNTERS


def _counters(**values) -> dict:
    return {name: float(values.get(name, 0.0)) for name in COUNTERS}


def _row(cfg, counters, **kw):
    args = dict(seconds=2.0, data_wait_s=0.5, step=10, cfg=cfg,
                plan=BatchPlan(global_size=16, micro_size=4, accumulation=2, world_size=2), with_teacher=True,
                flops_per_token=1e6, peak_flops=None, lr=1e-4, grad_norm=1.5, skipped_steps=0,
                memory={"memory/rss_gib": 1.0})
    return train_row(counters, **{**args, **kw})


def test_averages_rates_and_terms_that_apply():
    cfg = RunConfig()
    cfg.loss.kd, cfg.loss.mlm, cfg.loss.cos, cfg.loss.mse = 5.0, 2.0, 0.0, 0.0
    # 2 optimizer steps x 2 micro-steps x 2 ranks = 8 micro-steps in the interval
    c = _counters(micro_steps=8, loss=16.0, kd=4.0, mlm=8.0, cos=3.0, tokens=4000, masked=100, student_correct=25,
                  teacher_correct=50, agree=40)
    row = _row(cfg, c)
    assert row["loss/total"] == 2.0 and row["loss/kd"] == 0.5 and row["loss/mlm"] == 1.0
    assert row["loss/cos"] is None and row["loss/mse"] is None  # weight 0: not part of this run
    assert row["train/student_mlm_acc"] == 0.25 and row["train/teacher_mlm_acc"] == 0.5
    assert row["train/agreement"] == 0.4
    assert row["throughput/tokens_per_s"] == 2000.0
    assert row["throughput/model_tflops_per_s"] == pytest.approx(2000.0 * 1e6 / 1e12)
    assert row["throughput/samples_per_s"] == 16.0  # 2 steps of 16 sequences in 2 s
    assert row["throughput/step_time_s"] == 1.0 and row["throughput/data_wait_frac"] == 0.25
    assert row["train/samples"] == 160 and row["train/lr"] == 1e-4 and row["memory/rss_gib"] == 1.0
    assert row["throughput/mfu"] is None  # no known peak off a known GPU
    assert _row(cfg, c, peak_flops=1e9)["throughput/mfu"] == pytest.approx(2000.0 * 1e6 / (1e9 * 2))
    line = format_train_row(10, 60, row)
    assert line.startswith("step 10/60 loss 2.0000 kd 0.5000 mlm 1.0000 acc 0.250") and "cos" not in line


def test_teacher_free_run_has_no_teacher_columns():
    cfg = RunConfig()
    cfg.loss.kd, cfg.loss.mlm, cfg.loss.cos = 0.0, 1.0, 0.0
    row = _row(cfg, _counters(micro_steps=4, loss=4.0, mlm=4.0, tokens=10, masked=0), with_teacher=False)
    assert row["train/teacher_mlm_acc"] is None and row["train/agreement"] is None
    assert row["train/student_mlm_acc"] == 0.0  # no masked token: 0, not a division by zero
