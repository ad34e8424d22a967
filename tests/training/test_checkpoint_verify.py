"""Checkpoints are verified before they are trusted, and a failed write never leaves one behind.

Unit tests on real files (torch.save through the hashing writer, a real full tmpfs, a real read-only mount), then
2-rank `deepspeed` jobs: a damaged newest checkpoint is skipped by `--resume auto` and refused by `--resume
<folder>`, and a save on a full or read-only file system fails on one line, leaving the previous checkpoint newest.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid

import pytest
import torch

from pipeline.fileio import file_digest
from pipeline.training import checkpoint as ckpt
from tests.training.conftest import final_checkpoint, metrics, pretrain
from tests.training.faulty_runs import assert_clean_refusal, flip_byte, truncate


def _checkpoint(root, step, payload=1000):
    """A checkpoint folder written the way `save` writes one: hashed files, then complete.json with the manifest."""
    d = root / "checkpoints" / ckpt.tag_for(step)
    (d / "rng").mkdir(parents=True)
    files = {}
    for name, obj in (("mp_rank_00_model_states.pt", {"w": torch.arange(payload, dtype=torch.float32) * step}),
                      ("zero_pp_rank_1_mp_rank_00_optim_states.pt", {"m": torch.ones(payload)}),
                      ("rng/rank00001.pt", ckpt.rng_state())):
        files[name] = ckpt.save_hashed(obj, str(d / name))
    (d / ckpt.STATE).write_text(json.dumps({"step": step}))
    files.update(ckpt.tree_digests(str(d), ckpt.STATE))
    (d / ckpt.COMPLETE).write_text(json.dumps({"step": step, "hash": ckpt.HASH, "files": files}))
    return d


def test_hashed_while_writing_equals_a_read_back(tmp_path):
    d = _checkpoint(tmp_path, 1)
    manifest = json.loads((d / ckpt.COMPLETE).read_text())["files"]
    for rel, digest in manifest.items():
        assert file_digest(str(d / rel), ckpt.HASH) == digest, rel
    assert torch.equal(torch.load(d / "mp_rank_00_model_states.pt")["w"], torch.arange(1000.0))
    assert ckpt.verify(str(d)) == []


def test_manifest_names_its_checksum(tmp_path, monkeypatch):
    """A checkpoint written with sha256 verifies under a default of xxh3_128, and the other way round."""
    monkeypatch.setattr(ckpt, "HASH", "sha256")
    d = _checkpoint(tmp_path, 1)
    monkeypatch.setattr(ckpt, "HASH", "xxh3_128")
    manifest = json.loads((d / ckpt.COMPLETE).read_text())
    assert manifest["hash"] == "sha256" and len(manifest["files"][ckpt.STATE]["sha256"]) == 64
    assert ckpt.verify(str(d)) == []
    flip_byte(d / "mp_rank_00_model_states.pt")
    assert ckpt.verify(str(d)) == ["mp_rank_00_model_states.pt: checksum mismatch (corrupted)"]


@pytest.mark.parametrize("damage, reason", [
    (lambda p: flip_byte(p), "checksum mismatch"),
    (lambda p: truncate(p), "truncated"),
    (lambda p: os.unlink(p), "missing"),
])
def test_verify_names_the_damaged_file(tmp_path, damage, reason):
    d = _checkpoint(tmp_path, 2)
    damage(d / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    problems = ckpt.verify(str(d))
    assert len(problems) == 1 and problems[0].startswith("zero_pp_rank_1_mp_rank_00_optim_states.pt: ")
    assert reason in problems[0]


def test_auto_falls_back_past_damaged_checkpoints_with_a_warning(tmp_path):
    older = _checkpoint(tmp_path, 100)
    newer = _checkpoint(tmp_path, 200)
    newest = _checkpoint(tmp_path, 300)
    flip_byte(newest / "rng" / "rank00001.pt")
    truncate(newer / "mp_rank_00_model_states.pt")
    warnings = []
    assert ckpt.find_resume(str(tmp_path), "auto", warn=warnings.append) == str(older)
    assert len(warnings) == 2
    assert str(newest) in warnings[0] and "rng/rank00001.pt: checksum mismatch" in warnings[0]
    assert str(newer) in warnings[1] and "mp_rank_00_model_states.pt" in warnings[1]
    # and the same answer on every restart: a requeued job never loops on the damaged one
    assert ckpt.find_resume(str(tmp_path), "auto", warn=warnings.append) == str(older)


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    only = _checkpoint(tmp_path, 100)
    truncate(only / "mp_rank_00_model_states.pt")
    with pytest.raises(ckpt.CheckpointDamaged, match="every checkpoint .* is damaged.*--resume none"):
        ckpt.find_resume(str(tmp_path), "auto", warn=lambda m: None)
    assert ckpt.find_resume(str(tmp_path), "none") is None


def test_named_damaged_checkpoint_is_refused(tmp_path):
    d = _checkpoint(tmp_path, 100)
    flip_byte(d / ckpt.STATE, offset=2)
    with pytest.raises(ckpt.CheckpointDamaged, match="trainer_state.json: checksum mismatch"):
        ckpt.find_resume(str(tmp_path), str(d))


def test_checkpoint_without_a_manifest_still_loads(tmp_path):
    """Written before manifests existed: nothing to check against, so it is taken as before."""
    d = _checkpoint(tmp_path, 100)
    (d / ckpt.COMPLETE).write_text(json.dumps({"step": 100}))
    assert ckpt.find_resume(str(tmp_path), "auto") == str(d)


def test_writer_rank_from_file_names():
    assert ckpt._writer_rank("mp_rank_00_model_states.pt") == 0
    assert ckpt._writer_rank("zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert ckpt._writer_rank("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert ckpt._writer_rank("rng/rank00007.pt") == 7


@contextlib.contextmanager
def tmpfs(path, size="1m"):
    """A real, tiny file system (root only; skipped elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"tmpfs-{uuid.uuid4().hex[:8]}", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_disk_is_an_os_error_naming_the_file(tmp_path):
    """torch.save reports a full disk as a RuntimeError ("unexpected pos ..."); save_hashed gives the OS error."""
    with tmpfs(tmp_path / "small", "1m") as fs:
        target = fs / "big.pt"
        with pytest.raises(OSError) as e:
            ckpt.save_hashed({"w": torch.zeros(1 << 20)}, str(target))  # 4 MiB into 1 MiB
        assert e.value.errno == 28 and e.value.filename == str(target)
        assert ckpt.describe_os_error(e.value) == f"{target}: No space left on device (ENOSPC)"


def test_read_only_file_system_is_an_os_error_naming_the_file(tmp_path):
    with tmpfs(tmp_path / "ro", "1m") as fs:
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        with pytest.raises(OSError) as e:
            ckpt.save_hashed({"w": torch.zeros(10)}, str(fs / "x.pt"))
        assert e.value.errno == 30 and "Read-only file system" in ckpt.describe_os_error(e.value)


# -- real jobs -------------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_damaged_newest_checkpoint_refused_by_name_and_skipped_by_auto(tmp_path, tiny_teacher, sample_data):
    run = tmp_path / "run"
    common = ["train.max_steps=4", "checkpoint.every_steps=2", "eval.n_samples=0"]
    pretrain(run, tiny_teacher, sample_data, *common)
    step4 = final_checkpoint(run, 4)
    assert json.load(open(step4 + "/complete.json"))["files"]["zero_pp_rank_1_mp_rank_00_optim_states.pt"]["bytes"]
    truncate(step4 + "/zero_pp_rank_1_mp_rank_00_optim_states.pt")

    named = pretrain(run, tiny_teacher, sample_data, *common, resume=step4, check=False)
    assert_clean_refusal(named, "step00000004: checkpoint damaged",
                         "zero_pp_rank_1_mp_rank_00_optim_states.pt", "truncated")

    auto = pretrain(run, tiny_teacher, sample_data, *common)
    log = auto.stdout + auto.stderr
    assert f"warning: checkpoint {step4} is damaged: zero_pp_rank_1_mp_rank_00_optim_states.pt" in log
    assert f"resumed from {final_checkpoint(run, 2)}: step 2" in log
    assert ckpt.verify(step4) == []  # written again by the resumed run
    assert sorted(metrics(run)) == [1, 2, 3, 4]


@pytest.mark.integration
@pytest.mark.slow  # two jobs; the unit tests above cover the same file systems without a job
def test_save_on_full_then_read_only_disk_keeps_the_previous_checkpoint(tmp_path, tiny_teacher, sample_data):
    """A checkpoint of this job is ~41 MB: the 60 MB file system holds the one of step 2, not the one of step 4."""
    run = tmp_path / "run"
    common = ["train.max_steps=4", "checkpoint.every_steps=2", "eval.n_samples=0"]
    with tmpfs(run / "checkpoints", "60m") as fs:
        full = pretrain(run, tiny_teacher, sample_data, *common, check=False)
        out = full.stdout + full.stderr
        assert full.returncode == 1 and "Traceback" not in out, out[-4000:]
        errors = [line for line in out.splitlines() if line.startswith("error")]
        assert len(errors) == 1, errors
        assert "checkpoint of step 4 not written" in errors[0] and "No space left on device (ENOSPC)" in errors[0]
        assert f"{fs}/step00000004/" in errors[0]  # the file that failed
        assert f"previous complete checkpoint {fs}/step00000002 is untouched" in errors[0]
        assert not os.path.exists(fs / "step00000004"), "the partial folder must go"
        assert ckpt.find_resume(str(run), "auto") == str(fs / "step00000002")

        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        ro = pretrain(run, tiny_teacher, sample_data, *common, check=False)
        out = ro.stdout + ro.stderr
        assert ro.returncode == 1 and "Traceback" not in out, out[-4000:]
        assert f"resumed from {fs}/step00000002" in out
        errors = [line for line in out.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and f"{fs}: Read-only file system (EROFS)" in errors[0], errors
        assert ckpt.find_resume(str(run), "auto") == str(fs / "step00000002")
