"""Helpers for fault-injection tests of the trainer: a `deepspeed launch/pretrain.py` job started in the background
(to be signalled or killed mid-run), damage done to files, and the one-line error a failed run must print."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

from tests.training.conftest import FAST, ROOT, free_port


def start_pretrain(run_dir, teacher, data, *overrides, ranks=2, resume="auto", log_path=None) -> subprocess.Popen:
    """The job the `pretrain` fixture runs, in the background in its own process group (killpg stops all of it)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    port = free_port()
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(ranks), "--master_port",
           str(port), str(ROOT / "launch" / "pretrain.py"), "--resume", resume, "--config", "tiny_cpu",
           "--deepspeed_config", str(ROOT / "ds_configs" / "zero2_fp32.json"), f"teacher.name_or_path={teacher}",
           f"data.path={data}", f"run_dir={run_dir}", *FAST, *overrides]
    out = open(log_path or os.path.join(str(run_dir) + ".log"), "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True)
    proc.port = port
    return proc


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.05):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank (a node failure, an OOM kill, scancel -s KILL)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    # the ranks unlink their CPU all-reduce segments once all are mapped; a job killed before that leaves them
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{proc.port}_*"):
        os.unlink(path)


def flip_byte(path, offset: int | None = None) -> None:
    with open(path, "r+b") as f:
        size = os.path.getsize(path)
        f.seek(size // 2 if offset is None else offset)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))


def truncate(path, keep: float = 0.5) -> None:
    os.truncate(path, int(os.path.getsize(path) * keep))


def assert_clean_refusal(proc, *expected: str) -> str:
    """The job exited 2 with one `error:` line holding every expected fragment, and no traceback from any rank."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}, expected 2\n{out[-4000:]}"
    assert "Traceback" not in out, out[-6000:]
    errors = [line for line in out.splitlines() if line.startswith("error")]
    assert len(errors) == 1, f"expected one error line, got {errors}\n{out[-3000:]}"
    for fragment in expected:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]
