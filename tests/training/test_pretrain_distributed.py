"""The trainer for real: `deepspeed launch/pretrain.py` with 2 CPU ranks on gloo, ZeRO-2 and ZeRO-3.

Stop-and-resume must equal an uninterrupted run: parameters, optimiser state, data position and losses, bitwise at
the same world size (dropout on, so the per-rank RNG must be restored), and to float tolerance when the second half
runs on 1 rank instead of 2 (dropout off: dropout masks depend on the rank layout by nature).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.training.conftest import final_checkpoint as _final
from tests.training.conftest import metrics, pretrain, seen_samples

pytestmark = pytest.mark.integration


def _fp32(ckpt):
    from pipeline.training.checkpoint import fp32_state_dict
    return fp32_state_dict(ckpt)


def _optim_tensors(ckpt) -> dict:
    """Every tensor in every rank's optimiser file, by a path of keys (Adam moments, fp32 partitions, step)."""
    out = {}

    def walk(prefix, obj):
        if torch.is_tensor(obj):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    for f in sorted(glob.glob(os.path.join(ckpt, "*optim_states.pt"))):
        walk(os.path.basename(f), torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"])
    assert out, f"no optimiser tensors in {ckpt}"
    return out


def test_zero3_two_ranks_trains_evaluates_checkpoints_and_exports(tmp_path, tiny_teacher, sample_data):
    run = tmp_path / "z3"
    proc = pretrain(run, tiny_teacher, sample_data, "train.max_steps=3", "checkpoint.every_steps=2",
                    ds="zero3_fp32.json")
    log = proc.stdout + proc.stderr
    assert "world 2 x micro 4 x accumulation 2 = global 16" in log and "ZeRO 3" in log
    rows = metrics(run)
    assert sorted(rows) == [1, 2, 3]
    for r in rows.values():
        for key in ("loss/total", "loss/kd", "loss/mlm", "loss/cos", "train/lr", "train/grad_norm",
                    "throughput/tokens_per_s", "train/agreement", "train/teacher_mlm_acc"):
            assert key in r, key
        assert r["throughput/model_tflops_per_s"] > 0 and "throughput/mfu" not in r  # no MFU without a known peak
        parts = 5 * r["loss/kd"] + 2 * r["loss/mlm"] + 1 * r["loss/cos"]
        assert r["loss/total"] == pytest.approx(parts, rel=1e-5)
    final_eval = metrics(run, "eval")[3]
    assert final_eval["eval/masked_tokens"] > 0 and 0 <= final_eval["eval/agreement"] <= 1
    assert glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))
    assert os.path.exists(_final(run, 2) + "/complete.json") and os.path.exists(_final(run, 3) + "/complete.json")

    from transformers import AutoModelForMaskedLM, AutoTokenizer
    student = AutoModelForMaskedLM.from_pretrained(run / "student")
    assert type(student).__name__ == "DistilBertForMaskedLM" and student.config.n_layers == 2
    tok = AutoTokenizer.from_pretrained(run / "student")
    assert tok.mask_token_id == 103
    # The export holds the trained weights: equal to the ZeRO-3 fp32 master weights of the final checkpoint.
    master = _fp32(_final(run, 3))
    for name, p in student.state_dict().items():
        key = "hf." + name
        if key in master:
            torch.testing.assert_close(p, master[key], rtol=0, atol=0)
    # launch/export.py does the same for any checkpoint (here the step-2 one, given as the run's older checkpoint).
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "exported2"
    proc = subprocess.run([sys.executable, "launch/export.py", _final(run, 2), str(out)], capture_output=True,
                          text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 0, proc.stderr
    step2 = AutoModelForMaskedLM.from_pretrained(out)
    m2 = _fp32(_final(run, 2))
    w = "distilbert.transformer.layer.0.ffn.lin1.weight"
    assert torch.equal(step2.state_dict()[w], m2["hf." + w]) and not torch.equal(step2.state_dict()[w], master["hf." + w])


def test_stop_and_resume_equals_uninterrupted_zero2(tmp_path, tiny_teacher, sample_data):
    common = ["train.max_steps=4", "checkpoint.every_steps=0", "student.dropout=0.1", "eval.n_samples=0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    pretrain(whole, tiny_teacher, sample_data, *common, launcher="torchrun")  # the launcher must not matter
    pretrain(split, tiny_teacher, sample_data, *common, "train.stop_at_step=2")
    assert not os.path.exists(_final(split, 4)) and os.path.exists(_final(split, 2) + "/complete.json")
    proc = pretrain(split, tiny_teacher, sample_data, *common)
    assert "resumed from" in proc.stdout and "step 2, 32 samples" in proc.stdout

    a, b = _fp32(_final(whole, 4)), _fp32(_final(split, 4))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs after resume"
    oa, ob = _optim_tensors(_final(whole, 4)), _optim_tensors(_final(split, 4))
    assert oa.keys() == ob.keys()
    for k in oa:
        assert torch.equal(oa[k], ob[k]), f"optimiser state {k} differs after resume"
    sa = json.load(open(_final(whole, 4) + "/trainer_state.json"))
    sb = json.load(open(_final(split, 4) + "/trainer_state.json"))
    assert sa["samples"] == sb["samples"] == 64 and sa["step"] == sb["step"] == 4
    ma, mb = metrics(whole), metrics(split)
    for step in (1, 2, 3, 4):
        for key in ("loss/total", "loss/kd", "loss/mlm", "loss/cos", "train/lr"):
            assert ma[step][key] == mb[step][key], (step, key)


def test_resume_on_one_rank_continues_the_same_stream_zero3(tmp_path, tiny_teacher, sample_data):
    common = ["train.max_steps=4", "checkpoint.every_steps=0", "student.dropout=0", "student.attention_dropout=0",
              "eval.n_samples=0", "logging.sample_ids=true"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    pretrain(whole, tiny_teacher, sample_data, *common, ds="zero3_fp32.json")
    pretrain(split, tiny_teacher, sample_data, *common, "train.stop_at_step=2", ds="zero3_fp32.json")
    proc = pretrain(split, tiny_teacher, sample_data, *common, ranks=1, ds="zero3_fp32.json")
    assert "world size 2 -> 1, universal checkpoint" in proc.stdout

    sw, ss = seen_samples(whole), seen_samples(split)
    assert sw == ss, "the resumed run must see exactly the samples of the uninterrupted one, step by step"
    assert sorted(p for v in ss.values() for p in v) == list(range(64))  # none skipped, none twice

    a, b = _fp32(_final(whole, 4)), _fp32(_final(split, 4))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"parameter {k}: {m}")
    ma, mb = metrics(whole), metrics(split)
    for step in (3, 4):
        assert mb[step]["loss/total"] == pytest.approx(ma[step]["loss/total"], rel=1e-4)


def test_document_mode_with_activation_checkpointing(tmp_path, tiny_teacher, sample_data):
    """One document per sample: padded batches (cut to their longest document) run unpadded (data.unpad, the
    default) through the chunked loss, 2 ranks, the student's activations recomputed in backward; with dropout
    off, the same losses as the padded forward (data.unpad=false)."""
    common = ["train.max_steps=2", "data.mode=document", "checkpoint.every_steps=0", "checkpoint.export_hf=false",
              "student.activation_checkpointing=true", "student.dropout=0", "student.attention_dropout=0"]
    unpadded = pretrain(tmp_path / "doc", tiny_teacher, sample_data, *common)
    assert "batches run unpadded where it pays (student: SDPA per document; teacher: SDPA per document)" in unpadded.stdout
    padded = pretrain(tmp_path / "padded", tiny_teacher, sample_data, *common, "data.unpad=false")
    assert "unpadded" not in padded.stdout
    rows, ref = metrics(tmp_path / "doc"), metrics(tmp_path / "padded")
    assert sorted(rows) == [1, 2]
    for step, r in rows.items():
        assert r["loss/kd"] > 0 and r["loss/mlm"] > 0 and r["throughput/tokens_per_s"] > 0
        for k in ("loss/total", "loss/kd", "loss/mlm", "loss/cos"):
            assert r[k] == pytest.approx(ref[step][k], rel=1e-4, abs=1e-6), (step, k)  # fp32 sums, kd ~1e-5
    assert metrics(tmp_path / "doc", "eval")[2]["eval/masked_tokens"] > 0
