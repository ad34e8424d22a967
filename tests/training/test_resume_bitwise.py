"""A job killed (SIGKILL, every rank) after a checkpoint and restarted with `--resume auto` ends bitwise where the
uninterrupted job ends: every loss and every parameter, with dropout 0.1 on 2 ranks and an epoch boundary crossed
after the resume. The uninterrupted job also writes the checkpoint, Hugging Face export included, so anything the
save itself does to the run (an RNG draw, say) shows up as a difference."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.training.conftest import ROOT, final_checkpoint, metrics, pretrain
from tests.training.faulty_runs import kill_job, start_pretrain, wait_for

pytestmark = pytest.mark.integration

GLOBAL = 16  # conftest.FAST: batch.global_size


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, wordpiece_dir, sample_texts) -> str:
    """A few documents of the sample: 56 sequences of 64 tokens, so an epoch is 3.5 steps of 16."""
    d = tmp_path_factory.mktemp("small")
    docs, n = [], 0
    for t in sample_texts:
        docs.append(t)
        n += len(t)
        if n > 11000:
            break
    (d / "docs.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    out = d / "data"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "prepare_data.py"), "--input", str(d / "docs.txt"),
                           "--tokenizer", wordpiece_dir, "--output", str(out), "--workers", "1",
                           "--valid-fraction", "0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return str(out)


def _n_sequences(data) -> int:
    from pipeline.data import PreparedDataset, SequenceDataset

    ds = PreparedDataset(data, "train")
    s = ds.special_ids
    return len(SequenceDataset(ds, 64, "packed", cls_id=s["cls"], sep_id=s["sep"], pad_id=s["pad"]))


def test_sigkill_after_checkpoint_then_resume_auto_is_bitwise(tmp_path, tiny_teacher, small_data):
    n = _n_sequences(small_data)
    # the resumed part (steps 5..8, samples 64..127) crosses an epoch boundary
    assert any(4 * GLOBAL < k * n < 8 * GLOBAL for k in range(1, 10)), n
    common = ["train.max_steps=40", "checkpoint.every_steps=4", "student.dropout=0.1",
              "student.attention_dropout=0.1", "eval.n_samples=0", "checkpoint.keep_last=3"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    pretrain(whole, tiny_teacher, small_data, *common, "train.stop_at_step=8")

    job = start_pretrain(killed, tiny_teacher, small_data, *common)
    try:
        wait_for(lambda: os.path.exists(final_checkpoint(killed, 4) + "/complete.json"), 240, "the step-4 checkpoint",
                 job)
        wait_for(lambda: 5 in metrics(killed), 60, "step 5", job)
    finally:
        kill_job(job)
    assert job.returncode == -9 and not os.path.exists(final_checkpoint(killed, 8)), "killed too late"
    proc = pretrain(killed, tiny_teacher, small_data, *common, "train.stop_at_step=8")
    assert f"resumed from {final_checkpoint(killed, 4)}: step 4, {4 * GLOBAL} samples" in proc.stdout

    ma, mb = metrics(whole), metrics(killed)  # the resumed run's rows replace the killed run's for steps 5..
    assert sorted(ma) == sorted(mb) == list(range(1, 9))
    for step in range(1, 9):
        for key in ("loss/total", "loss/kd", "loss/mlm", "loss/cos", "train/lr", "train/grad_norm"):
            assert ma[step].get(key) == mb[step].get(key), (step, key, ma[step].get(key), mb[step].get(key))

    from pipeline.training.checkpoint import fp32_state_dict
    a, b = fp32_state_dict(final_checkpoint(whole, 8)), fp32_state_dict(final_checkpoint(killed, 8))
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs after the resume (max {(a[k] - b[k]).abs().max()})"
