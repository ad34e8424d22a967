"""The trainer on a CUDA GPU (pytest -m gpu): `deepspeed launch/pretrain.py` on one GPU with NCCL, bf16 with fp32
master weights, torch's fused AdamW, the chunked loss, checkpoint and resume, the Hugging
Face export, and document mode's unpadded batches through the FlashAttention varlen kernel.

GPU kernels may sum in a different order from run to run (atomics in some backward passes), so a resumed run is
held to the uninterrupted one's data stream exactly and to its losses within bf16 tolerance, not bitwise as on
CPU (tests/training/test_pretrain_distributed.py)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.training.conftest import final_checkpoint as _final
from tests.training.conftest import metrics, pretrain, seen_samples

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU = ["teacher.dtype=bf16", "data.num_workers=2"]


def test_one_gpu_bf16_trains_resumes_and_exports(tmp_path, tiny_teacher, sample_data):
    common = [*GPU, "train.max_steps=4", "checkpoint.every_steps=0", "eval.n_samples=16", "logging.sample_ids=true",
              "loss.kd_tokens=all", "loss.chunk_size=64"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    proc = pretrain(whole, tiny_teacher, sample_data, *common, ranks=1, ds="zero2_bf16.json", accelerator="cuda")
    log = proc.stdout + proc.stderr
    assert "world 1 x micro 4 x accumulation 4 = global 16" in log and "ZeRO 2" in log, log[-3000:]
    assert "ZeRO 2, bf16, AdamW" in log
    pretrain(split, tiny_teacher, sample_data, *common, "train.stop_at_step=2", ranks=1, ds="zero2_bf16.json",
             accelerator="cuda")
    proc = pretrain(split, tiny_teacher, sample_data, *common, ranks=1, ds="zero2_bf16.json", accelerator="cuda")
    assert "resumed from" in proc.stdout and "step 2, 32 samples" in proc.stdout

    assert seen_samples(whole) == seen_samples(split), "the resumed run must see the uninterrupted one's samples, step by step"
    ma, mb = metrics(whole), metrics(split)
    assert sorted(ma) == sorted(mb) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        for key in ("loss/total", "loss/kd", "loss/mlm", "loss/cos"):
            assert torch.isfinite(torch.tensor(ma[step][key])), (step, key)
            assert mb[step][key] == pytest.approx(ma[step][key], rel=2e-2, abs=1e-3), (step, key)
        assert mb[step]["train/lr"] == ma[step]["train/lr"]
        assert ma[step]["throughput/mfu"] > 0  # a known peak on a known GPU
    sa = json.load(open(_final(whole, 4) + "/trainer_state.json"))
    sb = json.load(open(_final(split, 4) + "/trainer_state.json"))
    assert sa["samples"] == sb["samples"] == 64 and sa["step"] == sb["step"] == 4

    from transformers import AutoModelForMaskedLM
    student = AutoModelForMaskedLM.from_pretrained(whole / "student").cuda().eval()
    ids = torch.tensor([[101, 7592, 103, 2088, 102]], device="cuda")
    with torch.no_grad():
        logits = student(input_ids=ids).logits
    assert logits.shape == (1, 5, 30522) and torch.isfinite(logits).all()


def test_document_mode_runs_unpadded_through_the_varlen_kernel(tmp_path, tiny_teacher, sample_data):
    common = [*GPU, "train.max_steps=2", "data.mode=document", "checkpoint.every_steps=0", "checkpoint.export_hf=false",
              "student.dropout=0", "student.attention_dropout=0", "eval.n_samples=0"]
    doc = pretrain(tmp_path / "doc", tiny_teacher, sample_data, *common, ranks=1, ds="zero2_bf16.json",
                   accelerator="cuda")
    assert ("unpadded where it pays (student: FlashAttention varlen kernel; teacher: FlashAttention varlen kernel)"
            in doc.stdout), doc.stdout[-3000:]
    assert "fails its check" not in doc.stdout + doc.stderr
    pretrain(tmp_path / "padded", tiny_teacher, sample_data, *common, "data.unpad=false", ranks=1,
             ds="zero2_bf16.json", accelerator="cuda")
    rows, ref = metrics(tmp_path / "doc"), metrics(tmp_path / "padded")
    assert sorted(rows) == [1, 2]
    for step, r in rows.items():
        for k in ("loss/total", "loss/kd", "loss/mlm", "loss/cos"):
            assert r[k] == pytest.approx(ref[step][k], rel=3e-2, abs=1e-3), (step, k)  # bf16 both ways


def test_document_mode_student_with_attention_dropout_takes_the_dropout_kernel(tmp_path, tiny_teacher, sample_data):
    """The recipe's student (attention dropout 0.1) in document mode: FlashAttention varlen with dropout."""
    common = [*GPU, "train.max_steps=2", "data.mode=document", "checkpoint.every_steps=0", "checkpoint.export_hf=false",
              "student.attention_dropout=0.1", "eval.n_samples=0"]
    proc = pretrain(tmp_path / "doc", tiny_teacher, sample_data, *common, ranks=1, ds="zero2_bf16.json",
                    accelerator="cuda")
    assert ("(student: FlashAttention varlen kernel with dropout; teacher: FlashAttention varlen kernel)"
            in proc.stdout), proc.stdout[-3000:]
    assert "fails its check" not in proc.stdout + proc.stderr
    rows = metrics(tmp_path / "doc")
    assert sorted(rows) == [1, 2] and all(r["loss/kd"] > 0 and r["loss/mlm"] > 0 for r in rows.values())
