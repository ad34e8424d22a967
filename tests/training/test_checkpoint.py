"""Which checkpoint `--resume auto` takes: the newest complete one, never a folder a crash left half-written."""
import json
import os

import pytest

from pipeline.training import checkpoint as ckpt


def _make(root, step, complete=True):
    d = root / "checkpoints" / ckpt.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (d / ckpt.STATE).write_text(json.dumps({"step": step}))
    if complete:
        (d / ckpt.COMPLETE).write_text(json.dumps({"step": step}))
    return d


def test_auto_takes_newest_complete_and_skips_half_written(tmp_path):
    assert ckpt.find_resume(str(tmp_path), "auto") is None
    _make(tmp_path, 100)
    good = _make(tmp_path, 200)
    _make(tmp_path, 300, complete=False)  # a crash mid-save
    (tmp_path / "checkpoints" / (ckpt.tag_for(200) + "_universal")).mkdir()  # a conversion cache is not a checkpoint
    assert ckpt.find_resume(str(tmp_path), "auto") == str(good)
    assert ckpt.find_resume(str(tmp_path), "none") is None
    assert [os.path.basename(p) for p in ckpt.complete_checkpoints(str(tmp_path / "checkpoints"))] == [
        "step00000100", "step00000200"]


def test_explicit_resume_must_be_complete(tmp_path):
    bad = _make(tmp_path, 300, complete=False)
    with pytest.raises(ckpt.CheckpointDamaged, match="not a complete checkpoint"):
        ckpt.find_resume(str(tmp_path), str(bad))
    good = _make(tmp_path, 100)
    assert ckpt.find_resume(str(tmp_path), str(good)) == str(good)


def test_tags_sort_by_step():
    assert sorted([ckpt.tag_for(1000), ckpt.tag_for(20), ckpt.tag_for(300)]) == [
        ckpt.tag_for(20), ckpt.tag_for(300), ckpt.tag_for(1000)]
