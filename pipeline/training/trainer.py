"""The distillation run: build everything from the config, then the step loop with logging, evaluation and
checkpoints. `launch/pretrain.py` parses the command line and calls `run`."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch

from pipeline.training import checkpoint as ckpt_lib
from pipeline.training.config import ConfigError, RunConfig, plan_batch
from pipeline.training.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object
from pipeline.training.ds_config import finalize_ds_config, offloads_optimizer, precision, zero_stage
from pipeline.training.evaluate import evaluate
from pipeline.training.flops import model_shape, peak_flops_for, step_flops
from pipeline.training.faults import NonFiniteLoss, StopFlags, inject_nan, requeue_slurm_job
from pipeline.training.metrics import MetricWriter
from pipeline.training.optim import build_optimizer, build_scheduler
from pipeline.training.step import Counters, forward_losses, uses_chunked_loss


class Log:
    """Concise console output from rank 0 only."""

    def __init__(self, dist: DistInfo):
        self.on = dist.is_main

    def __call__(self, msg: str) -> None:
        if self.on:
            print(f"[pretrain] {msg}", flush=True)


def seed_everything(seed: int, rank: int) -> None:
    # Different per rank so dropout masks differ across ranks; data order and masking have their own keyed RNGs.
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2 ** 32)
    torch.manual_seed(seed + rank)


def _tokenizer_path(cfg: RunConfig, data_tokenizer: str) -> str:
    return cfg.tokenizer or cfg.teacher.name_or_path or data_tokenizer


def build_data(cfg: RunConfig, dist: DistInfo, tokenizer, plan, log):
    from pipeline.data import PreparedDataset
    from pipeline.data.loader import EvalBatches
    from pipeline.data.masking import Masker, word_starts
    from pipeline.data.sequences import SequenceDataset

    # Rank 0 checks every checksum once; the others only sizes (a shared file system would read the data W times).
    verify = cfg.data.verify if dist.is_main else "size"
    if dist.is_main:
        train = PreparedDataset(cfg.data.path, cfg.data.train_split, tokenizer=tokenizer, verify=verify)
    barrier()
    if not dist.is_main:
        train = PreparedDataset(cfg.data.path, cfg.data.train_split, verify="size")
    special = train.special_ids
    missing = [k for k in ("cls", "sep", "mask", "pad") if special.get(k) is None]
    if missing:
        raise ConfigError(cfg.data.path, [f"the dataset's tokenizer has no {', '.join(missing)} token(s); the MLM "
                                          f"recipe needs [CLS], [SEP], [MASK] and [PAD]"])
    seqs = SequenceDataset(train, cfg.data.seq_len, cfg.data.mode, cls_id=special["cls"], sep_id=special["sep"],
                           pad_id=special["pad"])
    m = cfg.masking
    masker = Masker(train.vocab_size, [v for v in special.values() if v is not None], special["mask"], special["pad"],
                    probability=m.probability, mask_fraction=m.mask_fraction, random_fraction=m.random_fraction,
                    whole_word=m.whole_word,
                    word_start=word_starts(tokenizer.vocab(), tokenizer.kind) if m.whole_word else None,
                    token_counts=train.token_counts() if m.smoothing else None,
                    smoothing_exponent=m.smoothing_exponent, seed=cfg.train.seed)
    eval_batches = None
    if cfg.eval.n_samples > 0 and cfg.data.valid_split in train.manifest["shards"]:
        valid = PreparedDataset(cfg.data.path, cfg.data.valid_split, verify="size")
        try:
            vseqs = SequenceDataset(valid, cfg.data.seq_len, cfg.data.mode, cls_id=special["cls"],
                                    sep_id=special["sep"], pad_id=special["pad"])
        except ValueError as e:  # an empty or tiny validation split: train anyway, say so
            log(f"held-out evaluation off: {e}")
            return train, seqs, masker, None
        micro = cfg.eval.micro_size or plan.micro_size
        n = min(cfg.eval.n_samples, len(vseqs)) // (micro * dist.world_size) * (micro * dist.world_size)
        if n == 0:
            log(f"held-out evaluation off: {len(vseqs)} validation sequences is fewer than one evaluation batch "
                f"({micro} x {dist.world_size} ranks)")
        else:
            eval_batches = EvalBatches(vseqs, masker, n_samples=n, micro_batch=micro, rank=dist.rank,
                                       world_size=dist.world_size)
    elif cfg.eval.n_samples > 0:
        log(f"held-out evaluation off: the dataset has no {cfg.data.valid_split!r} split")
    return train, seqs, masker, eval_batches


def total_steps_for(cfg: RunConfig, n_samples: int, global_batch: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * n_samples / global_batch))


def _memory(device) -> dict:
    if device.type == "cuda":
        return {"memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30,
                "memory/max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2 ** 30}
    import psutil
    return {"memory/rss_gib": psutil.Process().memory_info().rss / 2 ** 30}


def run(cfg: RunConfig, ds_raw: dict, dist: DistInfo, *, resume: str = "auto", ds_source: str = "ds_config",
        command: list[str] | None = None, stop_flags: StopFlags | None = None) -> dict:
    """Train; returns the final held-out evaluation (rank 0) or {}."""
    import deepspeed
    from pipeline.data_prep.tokenizer import load_tokenizer
    from pipeline.models import build_student, load_teacher

    log = Log(dist)
    plan = plan_batch(cfg, dist.world_size)
    ds = finalize_ds_config(ds_raw, cfg, plan, on_gpu=dist.on_gpu, source=ds_source)
    prec, stage = precision(ds), zero_stage(ds)
    run_dir = os.path.abspath(cfg.run_dir)

    # Resume point first: a world-size change needs DeepSpeed's universal loader, chosen before initialize.
    resume_from = broadcast_object(ckpt_lib.find_resume(run_dir, resume) if dist.is_main else None)
    universal = False
    if resume_from:
        prev = ckpt_lib.read_state(resume_from)
        if prev["world_size"] != dist.world_size and prev.get("zero_stage", 0) > 0:
            universal = True
            ds.setdefault("checkpoint", {})["load_universal"] = True

    seed_everything(cfg.train.seed, dist.rank)
    from pipeline.data import PreparedDataset
    data_tok = PreparedDataset(cfg.data.path, cfg.data.train_split, verify="none").tokenizer_info["name_or_path"]
    tok_path = _tokenizer_path(cfg, data_tok)
    tokenizer = load_tokenizer(tok_path)
    train, seqs, masker, eval_batches = build_data(cfg, dist, tokenizer, plan, log)

    teacher = None
    # A random-init student with a teacher named (the no-teacher baseline) takes its missing sizes from the teacher
    if cfg.loss.needs_teacher or cfg.student.init == "teacher" or (cfg.student.init == "random"
                                                                    and cfg.teacher.name_or_path):
        tdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(cfg.teacher.dtype) or (
            torch.bfloat16 if dist.on_gpu else torch.float32)
        # Loaded in fp32 so the student copied from it starts from exact weights; cast after the copy.
        teacher = load_teacher(cfg.teacher.name_or_path, dtype=torch.float32, device=dist.device)
    s = cfg.student
    try:
        student = build_student(arch=s.arch, init=s.init, teacher=teacher, layers=s.layers, n_layers=s.n_layers,
                                hidden_size=s.hidden_size, n_heads=s.n_heads, ffn_size=s.ffn_size,
                                vocab_size=train.vocab_size,
                                max_position=s.max_position if s.init == "random" and teacher is None else None,
                                dropout=s.dropout, attention_dropout=s.attention_dropout, pretrained=s.pretrained,
                                seed=cfg.train.seed)
    except ValueError as e:
        raise ConfigError("student", [str(e)]) from None
    if student.hf.config.vocab_size < train.vocab_size:
        raise ConfigError("student", [f"the student's vocabulary ({student.hf.config.vocab_size}) is smaller than the "
                                      f"dataset's ({train.vocab_size}): prepare the data with the student's tokenizer"])
    if cfg.data.seq_len > student.hf.config.max_position_embeddings:
        raise ConfigError("recipe", [f"data.seq_len ({cfg.data.seq_len}) exceeds the student's "
                                     f"{student.hf.config.max_position_embeddings} position embeddings"])
    if teacher is not None and teacher.hf.config.vocab_size != student.hf.config.vocab_size:
        raise ConfigError("recipe", [f"teacher vocabulary {teacher.hf.config.vocab_size} != student "
                                     f"{student.hf.config.vocab_size}"])
    if teacher is not None and tdtype != torch.float32:
        teacher.to(tdtype)
    if not cfg.loss.needs_teacher and teacher is not None:
        teacher = None  # only needed for initialisation: free it
        if dist.on_gpu:
            torch.cuda.empty_cache()
    if teacher is not None and cfg.loss.cos > 0 and teacher.hf.config.hidden_size != student.hf.config.hidden_size:
        raise ConfigError("recipe", ["loss.cos > 0 needs equal teacher and student hidden sizes; set loss.cos=0"])
    if len(seqs) < plan.global_size:
        raise ConfigError(cfg.data.path, [f"{len(seqs)} training sequences of {cfg.data.seq_len} tokens is fewer "
                                          f"than one global batch ({plan.global_size}); lower batch.global_size"])
    total_steps = total_steps_for(cfg, len(seqs), plan.global_size)

    student_init = os.path.join(run_dir, "student_init")
    if dist.is_main:
        os.makedirs(run_dir, exist_ok=True)
        tmp = student_init + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        student.hf.config.save_pretrained(tmp)
        if tokenizer.kind == "huggingface":
            from transformers import AutoTokenizer
            AutoTokenizer.from_pretrained(tok_path).save_pretrained(tmp)
        shutil.rmtree(student_init, ignore_errors=True)
        os.replace(tmp, student_init)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"recipe": cfg.to_dict(), "deepspeed": ds, "world_size": dist.world_size,
                       "command": command or sys.argv}, f, indent=1)
    barrier()

    if cfg.data.mode == "document" and cfg.data.unpad:
        # after student_init was saved: the attention implementation is a runtime choice, not part of the model
        from pipeline.models import varlen

        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)
        paths = [f"student: {varlen.enable(student, dist.device, half, s.attention_dropout)}"]
        if teacher is not None:
            paths.append(f"teacher: {varlen.enable(teacher, dist.device, tdtype, 0.0)}")
        log(f"document mode: batches run unpadded where it pays ({'; '.join(paths)})")
    if s.activation_checkpointing:
        student.enable_activation_checkpointing()
    if stage == 3 and uses_chunked_loss(cfg.loss, teacher is not None):
        student.register_decoder_for_zero3()  # the chunked loss reads the decoder inside the student's forward
    optimizer = build_optimizer(student, cfg.optimizer, on_gpu=dist.on_gpu, offload=offloads_optimizer(ds))
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    if teacher is not None and dist.on_gpu:
        teacher.to(dist.device)
    if cfg.train.compile:
        engine.compile()
        if teacher is not None:
            teacher.hf.get_submodule(teacher.family.encoder).compile()

    step, consumed = 0, 0
    if resume_from:
        if universal:
            ckpt_lib.prepare_universal(resume_from, dist.rank)
        state = ckpt_lib.load(engine, resume_from, dist.rank, universal=universal)
        step, consumed = state["step"], state["samples"]
        if state["total_steps"] != total_steps:
            log(f"note: total steps {state['total_steps']} from the checkpoint kept (the config gives {total_steps})")
            total_steps = state["total_steps"]
        log(f"resumed from {resume_from}: step {step}, {consumed} samples"
            + (f" (world size {state['world_size']} -> {dist.world_size}, universal checkpoint)" if universal else ""))

    from pipeline.data.loader import TrainStream
    stream = TrainStream(seqs, masker, seed=cfg.train.seed, global_batch=plan.global_size, micro_batch=plan.micro_size,
                         rank=dist.rank, world_size=dist.world_size, start=consumed,
                         num_workers=cfg.data.num_workers, pin_memory=dist.on_gpu)
    writer = MetricWriter(run_dir if dist.is_main else None, tensorboard=cfg.logging.tensorboard)
    sample_log = open(os.path.join(run_dir, f"samples.rank{dist.rank}.jsonl"), "a") if cfg.logging.sample_ids else None

    # FLOPs of the model's work per real token (flops.py), for TensorBoard's TFLOP/s and MFU (on a known GPU)
    flops_per_token = step_flops(model_shape(teacher.hf.config) if teacher is not None else None,
                                 model_shape(student.hf.config), cfg.data.seq_len, 1,
                                 kd_rows_fraction=1.0 if cfg.loss.kd_tokens == "all" else cfg.masking.probability,
                                 mlm_rows_fraction=cfg.masking.probability)["per_token"]
    peak = peak_flops_for(torch.cuda.get_device_name(dist.device), prec) if dist.on_gpu else None
    stop_at = min(total_steps, cfg.train.stop_at_step or total_steps)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters())  # ZeRO-3 partitions them
    log(f"world {dist.world_size} x micro {plan.micro_size} x accumulation {plan.accumulation} = global "
        f"{plan.global_size} sequences of {cfg.data.seq_len}; ZeRO {stage}, {prec}, {type(optimizer).__name__}; "
        f"student {n_params / 1e6:.1f}M params; teacher {'none' if teacher is None else cfg.teacher.name_or_path}; {len(seqs)} training sequences; "
        f"steps {step} -> {stop_at} of {total_steps}")

    def save(final_step):
        trainer_state = {"step": final_step, "samples": final_step * plan.global_size, "total_steps": total_steps,
                         "world_size": dist.world_size, "zero_stage": stage, "precision": prec,
                         "global_batch": plan.global_size, "config": cfg.to_dict()}
        ckpt_lib.save(engine, run_dir, step=final_step, trainer_state=trainer_state, rank=dist.rank,
                      student_init=student_init, export_hf=cfg.checkpoint.export_hf,
                      keep_last=cfg.checkpoint.keep_last, log=log, device=dist.device)

    counters = Counters(dist.device)
    stop_flags = stop_flags if stop_flags is not None else StopFlags()  # launch/pretrain.py installs it at start-up
    preempted = False
    bar = None
    if dist.is_main and cfg.logging.progress:
        from tqdm import tqdm
        bar = tqdm(total=stop_at, initial=step, desc="pretrain", unit="step", dynamic_ncols=True, file=sys.stderr)
    batches = iter(stream)
    if resume_from and not universal:
        # Same world size: each rank continues its own dropout stream. Another world size has other ranks, so their
        # RNG streams cannot continue; data order and masks do not depend on it (keyed by sample position).
        ckpt_lib.restore_rng(resume_from, dist.rank)
    t_last, data_wait = time.time(), 0.0
    last_eval = {}
    last_saved = step if resume_from else -1
    try:
        while step < stop_at:
            skipped_before = engine.skipped_steps
            nonfinite = torch.zeros((), dtype=torch.bool, device=dist.device)
            for micro in range(plan.accumulation):
                t0 = time.time()
                batch = next(batches)
                data_wait += time.time() - t0
                if sample_log is not None:
                    sample_log.write(json.dumps({"step": step, "positions": batch["positions"].tolist(),
                                                 "samples": batch["sample_ids"].tolist()}) + "\n")
                batch = {k: v.to(dist.device, non_blocking=True) for k, v in batch.items()
                         if k in ("input_ids", "attention_mask", "labels")}
                terms, stats = forward_losses(engine, teacher, batch, cfg.loss)
                if inject_nan(step + 1, micro, dist.rank):
                    terms.total = terms.total * float("nan")
                nonfinite |= ~torch.isfinite(terms.total.detach())
                engine.backward(terms.total)
                engine.step()
                counters.add(terms, stats)
            step += 1
            stop_now, bad = stop_flags.agree(dist.device, nonfinite)
            if bad:
                skipped = engine.skipped_steps > skipped_before
                where = f"non-finite loss at step {step}"
                if not skipped:
                    raise NonFiniteLoss(f"{where}, and DeepSpeed applied the update (this config has no overflow "
                                        f"check): the weights may be corrupt. Resume from the last complete "
                                        f"checkpoint with a ZeRO config or a lower optimizer.lr")
                if cfg.train.nonfinite == "stop":
                    save(step)  # DeepSpeed dropped the update: these are the last good weights
                    raise NonFiniteLoss(f"{where}: stopped (train.nonfinite=stop) with a checkpoint of the last good "
                                        f"weights at step {step}; inspect the data around sample "
                                        f"{(step - 1) * plan.global_size} or lower optimizer.lr, then resume")
                log(f"{where}: DeepSpeed skipped the update ({engine.skipped_steps} skipped so far)")
            if bar is not None:
                bar.update(1)
            if step % cfg.logging.every_steps == 0 or step == stop_at:
                c = counters.reduce_and_reset(all_reduce_sum)  # host sync: log interval only
                now = time.time()
                dt = max(now - t_last, 1e-9)
                n_steps = c["micro_steps"] / (plan.accumulation * dist.world_size)
                masked = max(c["masked"], 1.0)
                gn = engine.get_global_grad_norm()
                values = {
                    "loss/total": c["loss"] / c["micro_steps"],
                    "loss/kd": c["kd"] / c["micro_steps"] if cfg.loss.kd > 0 else None,
                    "loss/mlm": c["mlm"] / c["micro_steps"] if cfg.loss.mlm > 0 else None,
                    "loss/cos": c["cos"] / c["micro_steps"] if cfg.loss.cos > 0 else None,
                    "loss/mse": c["mse"] / c["micro_steps"] if cfg.loss.mse > 0 else None,
                    "train/lr": engine.get_lr()[0],
                    "train/grad_norm": float(gn) if gn is not None else None,
                    "train/student_mlm_acc": c["student_correct"] / masked,
                    "train/teacher_mlm_acc": c["teacher_correct"] / masked if teacher is not None else None,
                    "train/agreement": c["agree"] / masked if teacher is not None else None,
                    "throughput/tokens_per_s": c["tokens"] / dt,
                    "throughput/model_tflops_per_s": flops_per_token * c["tokens"] / dt / 1e12,
                    "throughput/mfu": flops_per_token * c["tokens"] / dt / (peak * dist.world_size) if peak else None,
                    "throughput/samples_per_s": n_steps * plan.global_size / dt,
                    "throughput/step_time_s": dt / max(n_steps, 1e-9),
                    "throughput/data_wait_frac": data_wait / dt,
                    "train/samples": step * plan.global_size,
                    "train/skipped_steps": engine.skipped_steps,
                    **_memory(dist.device),
                }
                writer.write(step, values)
                msg = (f"step {step}/{total_steps} loss {values['loss/total']:.4f}"
                       + "".join(f" {k.split('/')[1]} {values[k]:.4f}" for k in ("loss/kd", "loss/mlm", "loss/cos",
                                                                                  "loss/mse") if values[k] is not None)
                       + f" acc {values['train/student_mlm_acc']:.3f} lr {values['train/lr']:.2e}"
                       + f" {values['throughput/tokens_per_s']:.0f} tok/s")
                if bar is not None:
                    bar.set_postfix_str(f"loss {values['loss/total']:.3f}")
                    bar.write(f"[pretrain] {msg}")
                else:
                    log(msg)
                t_last, data_wait = time.time(), 0.0
            if eval_batches is not None and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 \
                    and step != stop_at:
                last_eval = evaluate(engine, teacher, eval_batches, cfg.loss, dist.device)
                writer.write(step, last_eval, kind="eval")
                log("eval " + " ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in last_eval.items()))
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step != stop_at:
                save(step)
                last_saved = step
            if step < stop_at and stop_now:
                log(f"stop requested ({stop_flags.received or 'signal on another rank'}) at step {step}: "
                    f"checkpointing and exiting")
                preempted = True
                break
        if bar is not None:
            bar.close()
            bar = None
        if eval_batches is not None and not preempted:
            last_eval = evaluate(engine, teacher, eval_batches, cfg.loss, dist.device)
            writer.write(step, last_eval, kind="eval")
            log("final held-out evaluation: " + " ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in last_eval.items()))
        if last_saved != step:
            save(step)
        if preempted and dist.is_main and stop_flags.requeue:
            requeue_slurm_job(log)
        if dist.is_main and step == total_steps and cfg.checkpoint.export_hf:
            final = os.path.join(run_dir, "student")
            shutil.rmtree(final, ignore_errors=True)
            shutil.copytree(os.path.join(run_dir, "checkpoints", ckpt_lib.tag_for(step), "hf"), final)
            log(f"student exported to {final} (AutoModelForMaskedLM.from_pretrained loads it)")
        barrier()
    finally:
        stop_flags.restore()
        if bar is not None:
            bar.close()
        writer.close()
        if sample_log is not None:
            sample_log.close()
    return last_eval if dist.is_main else {}
