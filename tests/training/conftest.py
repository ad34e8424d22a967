"""Fixtures for trainer tests: a tiny BERT teacher saved with the real WordPiece tokenizer, a prepared dataset of
the embedded English sample, and a runner for `deepspeed launch/pretrain.py` with real CPU ranks on gloo."""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, wordpiece_dir) -> str:
    """A 4-layer, hidden-64 BERT masked LM (random weights) with bert-base-uncased's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    out = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128)
    BertForMaskedLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(wordpiece_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory, wordpiece_dir) -> str:
    """The embedded sample corpus prepared with the real WordPiece tokenizer (5% validation)."""
    from pipeline.resources import SAMPLE_CORPUS

    out = tmp_path_factory.mktemp("data") / "sample"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "prepare_data.py"), "--input", str(SAMPLE_CORPUS),
                           "--tokenizer", wordpiece_dir, "--output", str(out), "--workers", "2",
                           "--valid-fraction", "0.05"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A small, fast configuration of the tiny_cpu recipe: 16 sequences of 64 tokens per step.
FAST = ["data.seq_len=64", "batch.global_size=16", "batch.micro_size=4", "data.num_workers=1",
        "logging.every_steps=1", "logging.progress=false", "eval.n_samples=16", "eval.every_steps=0",
        "checkpoint.export_hf=true", "student.n_layers=2"]


def pretrain(run_dir, teacher, data, *overrides, ranks=2, ds="zero2_fp32.json", launcher="deepspeed", resume=None,
             timeout=300, check=True, env=None, accelerator="cpu") -> subprocess.CompletedProcess:
    """Run launch/pretrain.py through the real `deepspeed` launcher, torchrun, or plain python; on CPU ranks
    (gloo), or with accelerator="cuda" on GPUs (NCCL; the GPU tests)."""
    env = {**(env or os.environ), "DS_ACCELERATOR": accelerator, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    args = ["--config", "tiny_cpu", "--deepspeed_config", str(ROOT / "ds_configs" / ds),
            f"teacher.name_or_path={teacher}", f"data.path={data}", f"run_dir={run_dir}", *FAST, *overrides]
    if resume:
        args += ["--resume", resume]
    port = free_port()
    if launcher == "deepspeed":
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks),
               "--master_port", str(port), str(ROOT / "launch" / "pretrain.py"), *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(port), str(ROOT / "launch" / "pretrain.py"), *args]
    else:
        cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))
    # DeepSpeed's CPU all-reduce segments (66 MiB per rank, in RAM; made under the deepspeed launcher, which sets
    # LOCAL_SIZE) must not outlive the run: see
    # pipeline/training/distributed.py release_cpu_shm_segment
    leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")
    for path in leaked:
        os.unlink(path)
    assert launcher == "python" or not leaked, f"the run left {leaked} in /dev/shm"
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain exited {proc.returncode}\n{' '.join(cmd)}\nstdout:\n{proc.stdout[-6000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir, kind="train") -> dict[int, dict]:
    rows = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == kind:
                rows[r["step"]] = r
    return rows


def final_checkpoint(run_dir, step) -> str:
    return os.path.join(run_dir, "checkpoints", f"step{step:08d}")


def seen_samples(run_dir) -> dict[int, list[int]]:
    """The dataset positions each step trained on, over all ranks (logging.sample_ids=true)."""
    by_step: dict = {}
    for f in glob.glob(os.path.join(str(run_dir), "samples.rank*.jsonl")):
        for line in open(f):
            r = json.loads(line)
            by_step.setdefault(r["step"], []).extend(r["positions"])
    return {s: sorted(v) for s, v in by_step.items()}

