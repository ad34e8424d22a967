"""Bad input to the trainer: one clear line, exit 2, no traceback, on every rank.

Configuration errors are found before the process group exists (each rank prints them; here one process).
Data errors are found on every rank of a real 2-rank `deepspeed` job before any compute: corrupted or truncated
shards of either split and a dataset made with another tokenizer."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

from pipeline.data.verify import combined_error
from tests.training.conftest import ROOT, pretrain
from tests.training.faulty_runs import assert_clean_refusal, flip_byte, truncate


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=inf", "optimizer.lr: must be a finite number, got inf"),
    ("optimizer.lr=.nan", "optimizer.lr: must be a finite number, got nan"),
    ("optimizer.lr=0", "optimizer.lr: must be > 0"),
    ("optimizer.lr=-3e-4", "optimizer.lr: must be > 0"),
    ("optimizer.eps=-inf", "optimizer.eps: must be a finite number"),
    ("loss.temperature=inf", "loss.temperature: must be a finite number"),
    ("optimizer.betas=[0.9,.inf]", "optimizer.betas: must be a finite number"),
    ("train.seed=-1", "train.seed: a non-negative integer, got -1"),
    ("train.stall_timeout_s=0", "train.stall_timeout_s: seconds, must be > 0"),
    ("eval.micro_size=0", "eval.micro_size: must be >= 1 or null"),
    ("student.hidden_size=-64", "student.hidden_size: must be >= 1 or null"),
])
def test_bad_numbers_are_refused_in_one_line(override, message, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", "tiny_cpu",
                           f"run_dir={tmp_path}/run", f"data.path={tmp_path}/data", "teacher.name_or_path=t",
                           override], capture_output=True, text=True, cwd=str(ROOT),
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = assert_clean_refusal(proc, message)
    assert line.startswith("error: ") and "tiny_cpu.yaml" in line


def test_collective_timeout_from_the_environment_is_checked(monkeypatch):
    from pipeline.training.config import ConfigError
    from pipeline.training.distributed import collective_timeout

    monkeypatch.setenv("DISTIL_DIST_TIMEOUT_S", "20")
    assert collective_timeout().total_seconds() == 20
    for bad in ("0", "-5", "inf", "soon"):
        monkeypatch.setenv("DISTIL_DIST_TIMEOUT_S", bad)
        with pytest.raises(ConfigError, match="DISTIL_DIST_TIMEOUT_S: a positive number of seconds"):
            collective_timeout()


def test_new_process_groups_take_the_collective_timeout():
    """DeepSpeed's ZeRO groups are made by new_group() without a timeout: they must get ours, not torch's 30 min."""
    import datetime

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from pipeline.training.distributed import set_default_group_timeout

    before = c10d.default_pg_timeout
    try:
        set_default_group_timeout(datetime.timedelta(seconds=17))
        assert c10d._get_default_timeout(dist.Backend("gloo")) == datetime.timedelta(seconds=17)
    finally:
        c10d.default_pg_timeout = before


def test_problems_of_several_ranks_read_as_one_line():
    assert combined_error([None, None]) is None
    same = combined_error(["x.bin: missing", "x.bin: missing"])
    assert str(same) == "x.bin: missing" and same.shared
    one = combined_error([None, "train/shard_00001.bin: missing"])
    assert str(one) == "rank 1: train/shard_00001.bin: missing"
    two = combined_error(["a: bad", None, "b: bad", "b: bad"])
    assert str(two) == "rank 0: a: bad; ranks 2, 3: b: bad"


# -- real jobs -------------------------------------------------------------------------------------------------------
@pytest.fixture
def data_copy(tmp_path, sample_data):
    """A private copy of the prepared sample, to damage."""
    out = tmp_path / "data"
    shutil.copytree(sample_data, out)
    return out


def _shard(data, split, kind):
    return sorted(glob.glob(str(data / split / f"*.{kind}")))[0]


@pytest.mark.integration
@pytest.mark.parametrize("split, damage, expected", [
    ("valid", flip_byte, "checksum mismatch (corrupted)"),
    ("train", truncate, "(truncated or replaced)"),
])
def test_damaged_shard_of_either_split_stops_every_rank_with_exit_2(tmp_path, tiny_teacher, data_copy, split, damage,
                                                                   expected):
    shard = _shard(data_copy, split, "bin")
    damage(shard)
    proc = pretrain(tmp_path / "run", tiny_teacher, data_copy, "train.max_steps=2", check=False)
    assert_clean_refusal(proc, f"({split}) failed verification", os.path.relpath(shard, data_copy), expected)
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl"), "nothing may train on damaged data"
    # every rank left with 2 (the launcher reports the first exit it sees; a rank killed by it would be -15)
    assert "exits with return code = 2" in proc.stdout + proc.stderr


@pytest.mark.integration
def test_dataset_of_another_tokenizer_is_refused(tmp_path, tiny_teacher, sentencepiece_model, sample_texts):
    from tests.conftest import write_text_docs

    src = write_text_docs(tmp_path / "docs.txt", sample_texts[:40])
    data = tmp_path / "spm_data"
    prep = subprocess.run([sys.executable, str(ROOT / "launch" / "prepare_data.py"), "--input", str(src),
                           "--tokenizer", sentencepiece_model, "--output", str(data), "--workers", "1"],
                          capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr
    proc = pretrain(tmp_path / "run", tiny_teacher, data, "train.max_steps=2", check=False)
    assert_clean_refusal(proc, "was prepared with tokenizer", "token ids would mean different words")
