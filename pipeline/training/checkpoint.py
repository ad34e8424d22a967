"""Checkpoints: DeepSpeed state on every rank, our trainer state and per-rank RNG, an exported student, and a
completion marker written last that lists every file with its size and checksum, so a crash mid-save never leaves
something `--resume auto` would take, and a file damaged later is found before anything is loaded from it.

    <run_dir>/checkpoints/step00000100/
        (DeepSpeed files: mp_rank_00_model_states.pt, *_optim_states.pt, ...)
        rng/rank00000.pt        torch/numpy/python RNG of each rank (dropout continues exactly)
        student_init/           student config.json + tokenizer files (what export needs)
        hf/                     the student in Hugging Face format (checkpoint.export_hf)
        trainer_state.json      step, samples consumed, total steps, world size, ZeRO stage, config
        complete.json           written last, atomically: the checkpoint is complete; its "files" are the manifest

Every rank hashes the files it writes while writing them (DeepSpeed's torch.save goes through `_HashingSaver`);
rank 0 hashes its own small files, gathers the rest and writes the manifest into complete.json.
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from pipeline.fileio import HashingWriter, atomic_write, file_digest, new_hash
from pipeline.training.distributed import all_gather_object, barrier, broadcast_object

COMPLETE = "complete.json"
STATE = "trainer_state.json"
HASH = "xxh3_128"  # damage detection, not security: far faster than sha256 (docs/benchmarks/checkpoints.md)

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous complete one is untouched."""


class CheckpointDamaged(ValueError):
    """A checkpoint named on the command line is incomplete or fails verification, or every checkpoint of the run
    does (bad input: exit 2)."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _atomic_json(path: str, obj) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


def complete_checkpoints(root: str) -> list[str]:
    """Complete checkpoint folders under `root`, oldest first."""
    found = []
    for d in glob.glob(os.path.join(root, "step*")):
        if os.path.isdir(d) and not d.endswith("_universal") and os.path.exists(os.path.join(d, COMPLETE)):
            found.append(d)
    return sorted(found)


# -- the manifest --------------------------------------------------------------------------------------------------
def tree_digests(ckpt: str, sub: str) -> dict[str, dict]:
    """Digests of every file under `ckpt/sub` (a file or a folder), by path relative to `ckpt`."""
    top = os.path.join(ckpt, sub)
    paths = [top] if os.path.isfile(top) else [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs]
    return {os.path.relpath(p, ckpt): file_digest(p, HASH) for p in sorted(paths)}


def save_hashed(obj, path: str, **torch_save_kwargs) -> dict:
    """torch.save `obj` to `path` and return its digest. An OSError of the file system (full, read-only, quota) is
    raised as itself, with `path` in it, whatever torch.save made of it."""
    writer = None
    try:
        with open(path, "wb") as f:
            writer = HashingWriter(f, HASH)
            torch.save(obj, writer, **torch_save_kwargs)
    except (OSError, RuntimeError) as e:
        cause = (writer.os_error if writer is not None else None) or (e if isinstance(e, OSError) else None)
        if cause is None:
            cause = _probe_write(os.path.dirname(path)) or e
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror or str(cause), path) from None
        raise
    return writer.digest()


def _probe_write(folder: str) -> OSError | None:
    """The OS error a small write into `folder` meets now (full disk, read-only, gone), or None if it succeeds."""
    probe = os.path.join(folder, f".write_probe.{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 16))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return OSError(e.errno, e.strerror, folder)
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    return None


class _HashingSaver:
    """Stands in for DeepSpeed's TorchCheckpointEngine.save during our save: writes through `save_hashed` and records
    digests and the first failure instead of raising, so this rank still joins DeepSpeed's barriers after a failed
    write (raising there would leave the other ranks waiting in a collective) and the ranks decide together. The
    engine's copy of its recovery script (rank 0, between two collectives) is guarded the same way."""

    def __init__(self, engine, ds_engine=None):
        self.engine, self.ds_engine, self.digests, self.error = engine, ds_engine, {}, None

    def __call__(self, state_dict, path: str):
        if self.error is not None:
            return
        kwargs = {}
        if hasattr(self.engine, "zipfile_serialization"):
            kwargs["_use_new_zipfile_serialization"] = self.engine.zipfile_serialization
        try:
            self.digests[path] = save_hashed(state_dict, path, **kwargs)
        except (OSError, RuntimeError) as e:
            self.error = e

    def _guarded(self, fn):
        def call(*args, **kwargs):
            if self.error is not None:
                return None
            try:
                return fn(*args, **kwargs)
            except OSError as e:
                self.error = e
        return call

    def __enter__(self):
        self.engine.save = self
        if hasattr(self.ds_engine, "_copy_recovery_script"):
            self.ds_engine._copy_recovery_script = self._guarded(self.ds_engine._copy_recovery_script)
        return self

    def __exit__(self, *exc):
        del self.engine.save  # the class's method again
        if "_copy_recovery_script" in vars(self.ds_engine or object()):
            del self.ds_engine._copy_recovery_script
        return False


def _hashing_saver(engine):
    """The saver for a DeepSpeed engine whose checkpoint engine is the plain torch one, else None (another engine,
    e.g. an asynchronous one, writes its own way: its files are hashed after the write)."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is not None and type(ce).__name__ == "TorchCheckpointEngine":
        return _HashingSaver(ce, engine)
    return None


_RANK_IN_NAME = re.compile(r"(?:pp_rank_|rng/rank)0*(\d+)")


def _writer_rank(relpath: str) -> int:
    """Which rank wrote a checkpoint file: the rank in its name (ZeRO partitions, RNG), else rank 0."""
    m = _RANK_IN_NAME.search(relpath)
    return int(m.group(1)) if m else 0


def _own_digests(path: str, rank: int, hashed: dict[str, dict]) -> dict[str, dict]:
    """This rank's files in the checkpoint `path` with their digests: those hashed while writing, plus any other
    file this rank wrote (hashed now, from the page cache)."""
    out = {os.path.relpath(p, path): d for p, d in hashed.items()}
    for d, _, fs in os.walk(path):
        for f in fs:
            rel = os.path.relpath(os.path.join(d, f), path)
            if rel not in out and _writer_rank(rel) == rank and not rel.startswith(("hf", "student_init")) \
                    and rel not in (STATE, COMPLETE):
                out[rel] = file_digest(os.path.join(d, f), HASH)
    return out


def verify(ckpt: str) -> list[str]:
    """What is wrong with a checkpoint folder, one "file: reason" per problem; [] when every file listed in its
    manifest is there with the recorded size and checksum. A checkpoint written before manifests existed has
    nothing to check against and passes."""
    marker = os.path.join(ckpt, COMPLETE)
    if not os.path.exists(marker):
        return [f"{COMPLETE}: missing (the save never finished)"]
    try:
        with open(marker) as f:
            manifest = json.load(f)
        files, name = manifest.get("files"), manifest.get("hash", HASH)
        new_hash(name)  # a manifest naming a hash this machine lacks is unreadable
    except (OSError, ValueError, ImportError) as e:
        return [f"{COMPLETE}: unreadable ({e})"]
    if files is None:
        return []
    problems = []
    for rel, want in sorted(files.items()):
        p = os.path.join(ckpt, rel)
        try:
            size = os.path.getsize(p)
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if size != want["bytes"]:
            problems.append(f"{rel}: {size} bytes, the manifest says {want['bytes']} (truncated or replaced)")
        elif file_digest(p, name)[name] != want[name]:
            problems.append(f"{rel}: checksum mismatch (corrupted)")
    return problems


# -- choosing the checkpoint to resume from ------------------------------------------------------------------------
def find_resume(run_dir: str, resume: str, warn=logger.warning) -> str | None:
    """`auto`: the newest complete checkpoint of the run that passes verification (a damaged one is skipped with a
    warning naming it and its file), or None when the run has none; `none`: None; else a checkpoint folder that must
    be complete and intact. Raises CheckpointDamaged when the named one, or every one of the run, fails."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(os.path.join(run_dir, "checkpoints"))
        damaged = []
        for ckpt in reversed(found):
            problems = verify(ckpt)
            if not problems:
                return ckpt
            damaged.append(f"{ckpt} ({'; '.join(problems[:3])})")
            warn(f"warning: checkpoint {ckpt} is damaged: {'; '.join(problems[:3])}; skipping it"
                 + (f", trying {found[len(found) - len(damaged) - 1]}" if len(damaged) < len(found) else ""))
        if damaged:
            raise CheckpointDamaged(f"every checkpoint in {os.path.join(run_dir, 'checkpoints')} is damaged: "
                                    f"{', '.join(damaged)}. Restore one from a copy, or start over with --resume none")
        return None
    path = os.path.abspath(resume)
    if not os.path.exists(os.path.join(path, COMPLETE)):
        raise CheckpointDamaged(f"--resume {resume}: not a complete checkpoint (no {COMPLETE}); complete ones: "
                                f"{complete_checkpoints(os.path.dirname(path)) or 'none'}")
    problems = verify(path)
    if problems:
        raise CheckpointDamaged(f"--resume {resume}: checkpoint damaged: {'; '.join(problems[:5])}. Pick another "
                                f"(--resume auto takes the newest intact one)")
    return path


def choose_resume(run_dir: str, resume: str, is_main: bool, warn=logger.warning) -> str | None:
    """`find_resume` on rank 0 (it reads every checkpoint file once), its answer or its error on every rank, so all
    ranks load the same checkpoint or stop together with the same message."""
    answer = None
    if is_main:
        try:
            answer = ("ok", find_resume(run_dir, resume, warn))
        except CheckpointDamaged as e:
            answer = ("damaged", str(e))
    kind, value = broadcast_object(answer)
    if kind == "damaged":
        e = CheckpointDamaged(value)
        e.shared = True  # every rank raises the same: the launcher prints it once
        raise e
    return value


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


# -- saving --------------------------------------------------------------------------------------------------------
def save(engine, run_dir: str, *, step: int, trainer_state: dict, rank: int, student_init: str,
         export_hf: bool, keep_last: int, log=print, device=None) -> str:
    """Save on every rank (DeepSpeed's save is collective); rank 0 finishes the folder and prunes old ones.

    The run continues exactly as if no checkpoint had been written: every rank's RNG is put back afterwards (the
    export builds a model, whose initialisation draws from rank 0's RNG), so a run resumed from this checkpoint and
    the run that wrote it draw the same dropout masks."""
    saved_rng = rng_state()
    try:
        return _save(engine, run_dir, step=step, trainer_state=trainer_state, rank=rank, student_init=student_init,
                     export_hf=export_hf, keep_last=keep_last, log=log, rng=saved_rng)
    finally:
        set_rng_state(saved_rng)


def _save(engine, run_dir, *, step, trainer_state, rank, student_init, export_hf, keep_last, log, rng) -> str:
    root = os.path.join(run_dir, "checkpoints")
    tag = tag_for(step)
    path = os.path.join(root, tag)
    error = None
    if rank == 0:
        try:
            if os.path.exists(path):  # an earlier attempt at this step that never completed
                shutil.rmtree(path)
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            error = e
    _agree_or_raise(error, step, rank, root, path)
    # A read-only or full file system is found here, by every rank (node-local storage differs per node), before
    # DeepSpeed's save starts its collectives.
    _agree_or_raise(_probe_write(root), step, rank, root, path)
    t0 = time.time()
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    saver = _hashing_saver(engine)
    hashed: dict[str, dict] = {}
    try:
        # The marker ds_to_universal needs to convert this checkpoint for another world size (no tensor
        # parallelism here, so no merge patterns beyond the version).
        client_state = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        if saver is not None:
            with saver:
                engine.save_checkpoint(root, tag=tag, save_latest=False, client_state=client_state)
            hashed.update(saver.digests)
            if saver.error is not None:
                raise saver.error
        else:
            engine.save_checkpoint(root, tag=tag, save_latest=False, client_state=client_state)
        os.makedirs(os.path.join(path, "rng"), exist_ok=True)
        rng_file = os.path.join(path, "rng", f"rank{rank:05d}.pt")
        hashed[rng_file] = save_hashed(rng, rng_file)
        _injected_failure(step, rank)
        mine = _own_digests(path, rank, hashed)
    except (OSError, RuntimeError) as e:  # disk full, quota, read-only, I/O error: this checkpoint is lost
        error, mine = e, {}
    # Every rank's files are on disk (or some rank failed) before rank 0 declares the checkpoint complete: the
    # verdict's all-gather is the barrier, so all ranks act alike; then rank 0 collects the digests.
    _agree_or_raise(error, step, rank, root, path)
    parts = all_gather_object(mine)
    if rank == 0:
        try:
            files = {k: v for part in parts for k, v in part.items()}
            shutil.copytree(student_init, os.path.join(path, "student_init"))
            _atomic_json(os.path.join(path, STATE), trainer_state)
            if export_hf:
                export(path, os.path.join(path, "hf"))
            for sub in ("student_init", STATE) + (("hf",) if export_hf else ()):
                files.update(tree_digests(path, sub))
            _atomic_json(os.path.join(path, COMPLETE), {
                "step": step, "time": time.time(), "seconds": round(time.time() - t0, 3), "hash": HASH,
                "bytes": sum(d["bytes"] for d in files.values()), "files": files})
        except (OSError, RuntimeError) as e:
            error = e
        if error is None:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(old + "_universal", ignore_errors=True)
            log(f"checkpoint {path} ({time.time() - t0:.1f} s)")
    _agree_or_raise(error, step, rank, root, path)
    return path


def _injected_failure(step: int, rank: int) -> None:
    """Fault injection for tests: DISTIL_INJECT_SAVE_FAILURE=<step>:<rank> fails that rank's save halfway, after
    DeepSpeed has written its files (the worst moment: a folder that looks nearly complete)."""
    if os.environ.get("DISTIL_INJECT_SAVE_FAILURE") == f"{step}:{rank}":
        raise OSError(errno.ENOSPC, "injected failure: no space left on device")


def describe_os_error(e: BaseException) -> str:
    """`<path>: <OS error>` for a failed write, on one line."""
    if isinstance(e, OSError) and e.strerror:
        name = errno.errorcode.get(e.errno, "") if e.errno else ""
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}" + (f" ({name})" if name else "")
    return " ".join(str(e).split())[:300]


def _agree_or_raise(error, step: int, rank: int, root: str, path: str) -> None:
    """All ranks learn every rank's failure (one all-gather); on any, rank 0 removes the partial folder and every
    rank raises the same one-line CheckpointError naming the failed file and its OS error."""
    failures = [f for f in all_gather_object(None if error is None else (rank, describe_os_error(error))) if f]
    if not failures:
        return
    removed = ""
    if rank == 0 and os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)
        removed = f"; the partial {path} was removed" if not os.path.exists(path) else f"; could not remove {path}"
    done = complete_checkpoints(root)
    previous = done[-1] if done else None
    what = "; ".join(f"rank {r}: {msg}" for r, msg in failures)
    e = CheckpointError(f"checkpoint of step {step} not written ({what}){removed}. The previous complete checkpoint "
                        f"{previous or '(none)'} is untouched and `--resume auto` will use it; free space or fix the "
                        f"file system, then restart the job")
    e.shared = True
    raise e


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
