"""Checkpoints: DeepSpeed state on every rank, our trainer state and per-rank RNG, an exported student, and a
completion marker written last, so a crash mid-save never leaves something `--resume auto` would take.

    <run_dir>/checkpoints/step00000100/
        (DeepSpeed files: mp_rank_00_model_states.pt, *_optim_states.pt, ...)
        rng/rank00000.pt        torch/numpy/python RNG of each rank (dropout continues exactly)
        student_init/           student config.json + tokenizer files (what export needs)
        hf/                     the student in Hugging Face format (checkpoint.export_hf)
        trainer_state.json      step, samples consumed, total steps, world size, ZeRO stage, config
        complete.json           written last, atomically: the checkpoint is complete
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from pipeline.training.distributed import barrier

COMPLETE = "complete.json"
STATE = "trainer_state.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_checkpoints(root: str) -> list[str]:
    """Complete checkpoint folders under `root`, oldest first."""
    found = []
    for d in glob.glob(os.path.join(root, "step*")):
        if os.path.isdir(d) and not d.endswith("_universal") and os.path.exists(os.path.join(d, COMPLETE)):
            found.append(d)
    return sorted(found)


def find_resume(run_dir: str, resume: str) -> str | None:
    """`auto`: newest complete checkpoint of the run, or None; `none`: None; else a checkpoint folder that must be
    complete."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(os.path.join(run_dir, "checkpoints"))
        return found[-1] if found else None
    path = os.path.abspath(resume)
    if not os.path.exists(os.path.join(path, COMPLETE)):
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE}); complete ones: "
                                f"{complete_checkpoints(os.path.dirname(path)) or 'none'}")
    return path


def read_state(ckpt: str) -> dict:
    with open(os.path.join(ckpt, STATE)) as f:
        return json.load(f)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: str, *, step: int, trainer_state: dict, rank: int, student_init: str,
         export_hf: bool, keep_last: int, log=print, device=None) -> str:
    """Save on every rank (DeepSpeed's save is collective); rank 0 finishes the folder and prunes old ones."""
    root = os.path.join(run_dir, "checkpoints")
    tag = tag_for(step)
    path = os.path.join(root, tag)
    if rank == 0:
        if os.path.exists(path):  # an earlier attempt at this step that never completed
            shutil.rmtree(path)
        os.makedirs(root, exist_ok=True)
    barrier()
    t0 = time.time()
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    error = None
    try:
        # The marker ds_to_universal needs to convert this checkpoint for another world size (no tensor
        # parallelism here, so no merge patterns beyond the version).
        engine.save_checkpoint(root, tag=tag, save_latest=False, client_state={
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}})
        os.makedirs(os.path.join(path, "rng"), exist_ok=True)
        torch.save(rng_state(), os.path.join(path, "rng", f"rank{rank:05d}.pt"))
        _injected_failure(step, rank)
    except OSError as e:  # disk full, quota, I/O error: this checkpoint is lost, the previous one must not be
        error = e
    # Every rank's files are on disk (or some rank failed) before rank 0 declares the checkpoint complete; the
    # all-reduce is the barrier, and it carries the verdict so all ranks act alike.
    _agree_or_raise(error, step, rank, root, device)
    if rank == 0:
        try:
            shutil.copytree(student_init, os.path.join(path, "student_init"))
            _atomic_json(os.path.join(path, STATE), trainer_state)
            if export_hf:
                export(path, os.path.join(path, "hf"))
            _atomic_json(os.path.join(path, COMPLETE), {"step": step, "time": time.time(),
                                                        "seconds": round(time.time() - t0, 3)})
            error = None
        except OSError as e:
            error = e
        if error is None:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(old + "_universal", ignore_errors=True)
            log(f"checkpoint {path} ({time.time() - t0:.1f} s)")
    _agree_or_raise(error, step, rank, root, device)
    return path


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous complete one is untouched."""


def _injected_failure(step: int, rank: int) -> None:
    """Fault injection for tests: DISTIL_INJECT_SAVE_FAILURE=<step>:<rank> fails that rank's save halfway, after
    DeepSpeed has written its files (the worst moment: a folder that looks nearly complete)."""
    if os.environ.get("DISTIL_INJECT_SAVE_FAILURE") == f"{step}:{rank}":
        import errno
        raise OSError(errno.ENOSPC, "injected failure: no space left on device")


def _agree_or_raise(error, step: int, rank: int, root: str, device) -> None:
    from pipeline.training.distributed import all_reduce_sum
    failed = all_reduce_sum(torch.tensor([0.0 if error is None else 1.0 + rank], device=device)).item()
    if failed == 0:
        return
    done = complete_checkpoints(root)
    previous = done[-1] if done else None
    where = f"on rank {rank}: {error}" if error is not None else "on another rank (see its message)"
    raise CheckpointError(f"writing the checkpoint of step {step} failed {where}. The previous complete checkpoint "
                          f"{previous or '(none)'} is untouched and `--resume auto` will use it; free space or fix "
                          f"the file system, then restart the job")


def prepare_universal(ckpt: str, rank: int) -> str:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (once, cached next to it) so another world size
    can load it with its optimiser state. Returns the universal folder's tag."""
    out = ckpt + "_universal"
    if rank == 0 and not os.path.exists(os.path.join(out, COMPLETE)):
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", ckpt,
               "--output_folder", out, "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {ckpt} to a universal checkpoint failed:\n{proc.stderr[-3000:]}")
        _atomic_json(os.path.join(out, COMPLETE), {"from": ckpt})
    barrier()
    return os.path.basename(out)


def load(engine, ckpt: str, rank: int, *, universal: bool) -> dict:
    """Load DeepSpeed state (and this rank's RNG when the world size is unchanged); returns the trainer state."""
    root, tag = os.path.dirname(ckpt), os.path.basename(ckpt)
    if universal:
        tag = os.path.basename(ckpt) + "_universal"
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
    if universal:
        _fix_adam_step(engine, ckpt)
    return read_state(ckpt)


def _saved_adam_step(ckpt: str):
    """The optimiser's step count as saved by rank 0 of the original run."""
    files = sorted(glob.glob(os.path.join(ckpt, "*optim_states.pt")))
    if not files:
        return None

    def find(obj):
        if isinstance(obj, dict):
            if "step" in obj and (torch.is_tensor(obj["step"]) or isinstance(obj["step"], (int, float))):
                return obj["step"]
            for v in obj.values():
                found = find(v)
                if found is not None:
                    return found
        return None

    return find(torch.load(files[0], map_location="cpu", weights_only=False)["optimizer_state_dict"])


def _fix_adam_step(engine, ckpt: str) -> None:
    """DeepSpeed 0.19's universal loader leaves Adam's step count wrong (measured: 4 after 2 steps on 2 ranks), which
    changes the bias correction of every later update. Put back the count the original run saved."""
    step = _saved_adam_step(ckpt)
    if step is None:
        return
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if "step" in state:
            old = state["step"]
            state["step"] = (torch.full_like(old, float(step)) if torch.is_tensor(old) else type(old)(float(step)))


def restore_rng(ckpt: str, rank: int) -> bool:
    """Put this rank's RNG back where it was at the save (dropout continues exactly). Call it after everything that
    draws from the RNG at start-up (a DataLoader iterator draws its workers' base seed), right before the loop."""
    rng_file = os.path.join(ckpt, "rng", f"rank{rank:05d}.pt")
    if not os.path.exists(rng_file):
        return False
    set_rng_state(torch.load(rng_file, weights_only=False))
    return True


def fp32_state_dict(ckpt: str) -> dict:
    """The student's fp32 weights from a checkpoint folder: the ZeRO master weights when ZeRO was used (exact in bf16
    runs), else the module weights."""
    root, tag = os.path.dirname(ckpt), os.path.basename(ckpt)
    if glob.glob(os.path.join(ckpt, "*optim_states.pt")) and read_state(ckpt).get("zero_stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):  # it prints per-tensor progress
            sd = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    else:
        files = glob.glob(os.path.join(ckpt, "mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{ckpt}: no DeepSpeed model states file")
        sd = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in sd.items()}


def export(ckpt: str, out_dir: str) -> str:
    """Write the checkpoint's student as a standard Hugging Face model plus tokenizer (from_pretrained loads it)."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    init = os.path.join(ckpt, "student_init")
    config = AutoConfig.from_pretrained(init)
    model = AutoModelForMaskedLM.from_config(config)
    # The engine wrapped a MaskedLM: its Hugging Face model's weights are the ones under "hf."
    sd = {k[len("hf."):]: v for k, v in fp32_state_dict(ckpt).items() if k.startswith("hf.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {k for k in missing if k.endswith(("vocab_projector.weight", "decoder.weight"))}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{ckpt}: checkpoint does not match the student config: missing {sorted(set(missing) - tied)}"
                           f", unexpected {sorted(unexpected)}")
    model.tie_weights()
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(init).save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
