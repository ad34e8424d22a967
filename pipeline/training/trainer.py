"""The distillation run as the named steps of `Trainer`:

    setup_data      open the prepared dataset once: tokenizer, training sequences, masking, held-out batches
    setup_models    teacher and student, their compatibility with each other and with the data
    write_run_dir   the run's config.json and the student's config and tokenizer (student_init)
    setup_engine    attention path, optimizer, schedule, DeepSpeed engine, FLOP accounting
    resume          the checkpoint's weights, optimizer, step and sample position
    train           the step loop: train_step, metrics, evaluation, save_checkpoint, stop requests
    finish          final evaluation, last checkpoint, requeue, export of the student

`launch/pretrain.py` parses the command line and calls `run`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.training import checkpoint as ckpt_lib
from pipeline.training.config import ConfigError, RunConfig, plan_batch
from pipeline.training.distributed import DistInfo, all_gather_object, all_reduce_sum, barrier
from pipeline.training.ds_config import finalize_ds_config, offloads_optimizer, precision, zero_stage
from pipeline.training.evaluate import evaluate
from pipeline.training.faults import NonFiniteLoss, StopFlags, inject_nan, requeue_slurm_job
from pipeline.training.flops import model_shape, peak_flops_for, step_flops
from pipeline.training.metrics import MetricWriter, format_train_row, memory_metrics, train_row
from pipeline.training.optim import build_optimizer, build_scheduler
from pipeline.training.step import Counters, forward_losses, uses_chunked_loss
from pipeline.training.watchdog import StallWatchdog

if TYPE_CHECKING:
    from pipeline.data import PreparedDataset
    from pipeline.data.loader import EvalBatches
    from pipeline.data.masking import Masker
    from pipeline.data.sequences import SequenceDataset
    from pipeline.tokenization import TextTokenizer

log = logging.getLogger(__name__)


def seed_everything(seed: int, rank: int) -> None:
    # Different per rank so dropout masks differ across ranks; data order and masking have their own keyed RNGs.
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2 ** 32)
    torch.manual_seed(seed + rank)


def total_steps_for(cfg: RunConfig, n_samples: int, global_batch: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * n_samples / global_batch))


@dataclass
class Data:
    """What the run reads from the prepared dataset, opened once per split."""
    tokenizer: TextTokenizer
    tokenizer_path: str
    train: PreparedDataset  # the training split
    sequences: SequenceDataset  # over `train`
    masker: Masker
    eval_batches: EvalBatches | None  # of the validation split; None when held-out evaluation is off


class Trainer:
    """One distillation run. `fit` runs the steps in order; each step keeps what it builds on `self`."""

    def __init__(self, cfg: RunConfig, ds_raw: dict, dist: DistInfo, *, ds_source: str = "ds_config",
                 command: list[str] | None = None, stop_flags: StopFlags | None = None):
        self.cfg, self.dist, self.command = cfg, dist, command or sys.argv
        # launch/pretrain.py installs the signal handlers at start-up, so that a signal during set-up is kept
        self.stop_flags = stop_flags if stop_flags is not None else StopFlags()
        self.plan = plan_batch(cfg, dist.world_size)
        self.ds = finalize_ds_config(ds_raw, cfg, self.plan, on_gpu=dist.on_gpu, source=ds_source)
        self.precision, self.zero_stage = precision(self.ds), zero_stage(self.ds)
        self.run_dir = os.path.abspath(cfg.run_dir)
        self.student_init = os.path.join(self.run_dir, "student_init")
        self.step, self.samples = 0, 0  # optimizer steps done, training sequences consumed
        self.resume_from, self.resume_state, self.universal = None, None, False
        self.last_eval: dict = {}

    def fit(self, resume: str = "auto") -> dict:
        """Train; returns the final held-out evaluation (rank 0) or {}."""
        self.find_resume_point(resume)
        seed_everything(self.cfg.train.seed, self.dist.rank)
        self.setup_data()
        self.setup_models()
        self.write_run_dir()
        self.setup_engine()
        self.resume()
        self.train()
        return self.last_eval if self.dist.is_main else {}

    # -- set-up -------------------------------------------------------------------------------------------------
    def find_resume_point(self, resume: str) -> None:
        """The checkpoint to resume from, chosen before the engine: another world size needs DeepSpeed's universal
        loader, which is a setting of `deepspeed.initialize`."""
        self.resume_from = ckpt_lib.choose_resume(self.run_dir, resume, self.dist.is_main)  # damaged ones skipped
        self.resume_state = ckpt_lib.read_state(self.resume_from) if self.resume_from else None
        if self.resume_from:
            prev = self.resume_state
            if prev["world_size"] != self.dist.world_size and prev.get("zero_stage", 0) > 0:
                self.universal = True
                self.ds.setdefault("checkpoint", {})["load_universal"] = True

    def setup_data(self) -> None:
        from pipeline.data import PreparedDataset
        from pipeline.data.masking import Masker, word_starts
        from pipeline.data.verify import open_splits
        from pipeline.tokenization import load_tokenizer

        cfg, dist = self.cfg, self.dist
        train = PreparedDataset(cfg.data.path, cfg.data.train_split, verify="none")  # its manifest names the tokenizer
        tok_path = cfg.tokenizer or cfg.teacher.name_or_path or train.tokenizer_info["name_or_path"]
        tokenizer = load_tokenizer(tok_path)
        # Both splits before any compute. Rank 0 checks every checksum once, the others only sizes (a shared file
        # system would read the data W times); all ranks stop together, naming the file whichever rank found it.
        wanted = [cfg.data.train_split] + ([cfg.data.valid_split] if cfg.eval.n_samples > 0 else [])
        splits = open_splits(cfg.data.path, wanted, optional=(cfg.data.valid_split,), tokenizer=tokenizer,
                             verify=cfg.data.verify if dist.is_main else "size", gather=all_gather_object,
                             opened={cfg.data.train_split: train})
        special = train.special_ids
        missing = [k for k in ("cls", "sep", "mask", "pad") if special.get(k) is None]
        if missing:
            raise ConfigError(cfg.data.path, [f"the dataset's tokenizer has no {', '.join(missing)} token(s); the "
                                              f"MLM recipe needs [CLS], [SEP], [MASK] and [PAD]"])
        m = cfg.masking
        masker = Masker(train.vocab_size, [v for v in special.values() if v is not None], special["mask"],
                        special["pad"], probability=m.probability, mask_fraction=m.mask_fraction,
                        random_fraction=m.random_fraction, whole_word=m.whole_word,
                        word_start=word_starts(tokenizer.vocab(), tokenizer.kind) if m.whole_word else None,
                        token_counts=train.token_counts() if m.smoothing else None,
                        smoothing_exponent=m.smoothing_exponent, seed=cfg.train.seed)
        self.data = Data(tokenizer=tokenizer, tokenizer_path=tok_path, train=train,
                         sequences=self._sequences(train), masker=masker,
                         eval_batches=self._eval_batches(splits.get(cfg.data.valid_split), masker))
        if len(self.data.sequences) < self.plan.global_size:
            raise ConfigError(cfg.data.path, [f"{len(self.data.sequences)} training sequences of {cfg.data.seq_len} "
                                              f"tokens is fewer than one global batch ({self.plan.global_size}); "
                                              f"lower batch.global_size"])
        self.total_steps = total_steps_for(cfg, len(self.data.sequences), self.plan.global_size)
        if self.resume_state and self.resume_state["total_steps"] != self.total_steps:
            # before the scheduler is built: its learning-rate curve is a function of the total, not saved state
            log.info(f"note: total steps {self.resume_state['total_steps']} from the checkpoint kept (the config "
                     f"gives {self.total_steps})")
            self.total_steps = self.resume_state["total_steps"]

    def _sequences(self, split):
        from pipeline.data.sequences import SequenceDataset

        special = split.special_ids
        return SequenceDataset(split, self.cfg.data.seq_len, self.cfg.data.mode, cls_id=special["cls"],
                               sep_id=special["sep"], pad_id=special["pad"])

    def _eval_batches(self, valid, masker):
        """Fixed held-out batches of the validation split, or None (with the reason logged) when there are none."""
        from pipeline.data.loader import EvalBatches

        cfg, dist = self.cfg, self.dist
        if cfg.eval.n_samples <= 0:
            return None
        if valid is None:
            log.info(f"held-out evaluation off: the dataset has no {cfg.data.valid_split!r} split")
            return None
        try:
            sequences = self._sequences(valid)
        except ValueError as e:  # an empty or tiny validation split: train anyway, say so
            log.info(f"held-out evaluation off: {e}")
            return None
        micro = cfg.eval.micro_size or self.plan.micro_size
        per_round = micro * dist.world_size
        n = min(cfg.eval.n_samples, len(sequences)) // per_round * per_round
        if n == 0:
            log.info(f"held-out evaluation off: {len(sequences)} validation sequences is fewer than one evaluation "
                     f"batch ({micro} x {dist.world_size} ranks)")
            return None
        return EvalBatches(sequences, masker, n_samples=n, micro_batch=micro, rank=dist.rank,
                           world_size=dist.world_size)

    def setup_models(self) -> None:
        """The teacher (when the loss or the student's initialisation needs it) and the student."""
        from pipeline.models import build_student, compatibility_problems, load_teacher

        cfg, dist, s = self.cfg, self.dist, self.cfg.student
        # A random-init student with a teacher named (the no-teacher baseline) takes its missing sizes from it.
        teacher = None
        if cfg.loss.needs_teacher or s.init == "teacher" or (s.init == "random" and cfg.teacher.name_or_path):
            # Loaded in fp32 so the student copied from it starts from exact weights; cast after the copy.
            teacher = load_teacher(cfg.teacher.name_or_path, dtype=torch.float32, device=dist.device)
        try:
            student = build_student(arch=s.arch, init=s.init, teacher=teacher, layers=s.layers, n_layers=s.n_layers,
                                    hidden_size=s.hidden_size, n_heads=s.n_heads, ffn_size=s.ffn_size,
                                    vocab_size=self.data.train.vocab_size,
                                    max_position=s.max_position if s.init == "random" and teacher is None else None,
                                    dropout=s.dropout, attention_dropout=s.attention_dropout,
                                    pretrained=s.pretrained, seed=cfg.train.seed)
        except ValueError as e:
            raise ConfigError("student", [str(e)]) from None
        problems = compatibility_problems(student, teacher, data_vocab_size=self.data.train.vocab_size,
                                          seq_len=cfg.data.seq_len, cosine_loss=cfg.loss.cos > 0)
        if problems:
            raise ConfigError("recipe", problems)
        self.teacher_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(cfg.teacher.dtype) or (
            torch.bfloat16 if dist.on_gpu else torch.float32)
        if teacher is not None and not cfg.loss.needs_teacher:
            teacher = None  # only needed for initialisation: free it
            if dist.on_gpu:
                torch.cuda.empty_cache()
        elif teacher is not None and self.teacher_dtype != torch.float32:
            teacher.to(self.teacher_dtype)
        self.teacher, self.student = teacher, student

    def write_run_dir(self) -> None:
        """Rank 0 writes config.json and student_init (the student's config and tokenizer, copied into every
        checkpoint so each one loads on its own)."""
        if self.dist.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            tmp = self.student_init + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.student.hf.config.save_pretrained(tmp)
            if self.data.tokenizer.kind == "huggingface":
                from transformers import AutoTokenizer
                AutoTokenizer.from_pretrained(self.data.tokenizer_path).save_pretrained(tmp)
            shutil.rmtree(self.student_init, ignore_errors=True)
            os.replace(tmp, self.student_init)
            with open(os.path.join(self.run_dir, "config.json"), "w") as f:
                json.dump({"recipe": self.cfg.to_dict(), "deepspeed": self.ds, "world_size": self.dist.world_size,
                           "command": self.command}, f, indent=1)
        barrier()

    def setup_engine(self) -> None:
        """Runtime choices on the models (after student_init was saved: they are not part of the model), the
        optimizer and schedule, the DeepSpeed engine, and the FLOPs per token for TFLOP/s and MFU."""
        import deepspeed

        cfg, dist, student, teacher = self.cfg, self.dist, self.student, self.teacher
        if cfg.data.mode == "document" and cfg.data.unpad:
            from pipeline.models import varlen

            half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
            paths = [f"student: {varlen.enable(student, dist.device, half, cfg.student.attention_dropout)}"]
            if teacher is not None:
                paths.append(f"teacher: {varlen.enable(teacher, dist.device, self.teacher_dtype, 0.0)}")
            log.info(f"document mode: batches run unpadded where it pays ({'; '.join(paths)})")
        if cfg.student.activation_checkpointing:
            student.enable_activation_checkpointing()
        if self.zero_stage == 3 and uses_chunked_loss(cfg.loss, teacher is not None):
            student.register_decoder_for_zero3()  # the chunked loss reads the decoder inside the student's forward
        self.optimizer = build_optimizer(student, cfg.optimizer, on_gpu=dist.on_gpu,
                                         offload=offloads_optimizer(self.ds))
        scheduler = build_scheduler(self.optimizer, cfg.schedule, self.total_steps)
        self.engine, _, _, _ = deepspeed.initialize(model=student, optimizer=self.optimizer, lr_scheduler=scheduler,
                                                    config=self.ds)
        if teacher is not None and dist.on_gpu:
            teacher.to(dist.device)
        if cfg.train.compile:
            self.engine.compile()
            if teacher is not None:
                teacher.hf.get_submodule(teacher.family.encoder).compile()
        self.flops_per_token = step_flops(
            model_shape(teacher.hf.config) if teacher is not None else None, model_shape(student.hf.config),
            cfg.data.seq_len, 1, kd_rows_fraction=1.0 if cfg.loss.kd_tokens == "all" else cfg.masking.probability,
            mlm_rows_fraction=cfg.masking.probability)["per_token"]
        self.peak_flops = peak_flops_for(torch.cuda.get_device_name(dist.device), self.precision) if dist.on_gpu \
            else None

    def resume(self) -> None:
        """Weights, optimizer and schedule from the checkpoint, and the step and sample position to continue at."""
        if not self.resume_from:
            return
        if self.universal:
            ckpt_lib.prepare_universal(self.resume_from, self.dist.rank)
        state = ckpt_lib.load(self.engine, self.resume_from, self.dist.rank, universal=self.universal)
        self.step, self.samples = state["step"], state["samples"]
        log.info(f"resumed from {self.resume_from}: step {self.step}, {self.samples} samples"
                 + (f" (world size {state['world_size']} -> {self.dist.world_size}, universal checkpoint)"
                    if self.universal else ""))

    # -- the loop -----------------------------------------------------------------------------------------------
    def train(self) -> None:
        """Steps until train.stop_at_step or the end, then `finish`; a stop request (SIGUSR1, SIGTERM) checkpoints
        and leaves the loop at a step boundary, on all ranks together."""
        self.stop_at = min(self.total_steps, self.cfg.train.stop_at_step or self.total_steps)
        self.log_start()
        self.open_outputs()
        try:
            stop_requested = False
            while self.step < self.stop_at and not stop_requested:
                stop_requested = self.train_step()
                self.log_metrics()
                if self.due(self.cfg.eval.every_steps) and self.data.eval_batches is not None:
                    self.evaluate()
                if self.due(self.cfg.checkpoint.every_steps):
                    self.save_checkpoint()
                self.watchdog.beat()  # evaluation and checkpoint done
                stop_requested = stop_requested and self.step < self.stop_at
                if stop_requested:
                    log.info(f"stop requested ({self.stop_flags.received or 'signal on another rank'}) at step "
                             f"{self.step}: checkpointing and exiting")
            self.finish(preempted=stop_requested)
        finally:
            self.close_outputs()

    def open_outputs(self) -> None:
        """The batch stream from the resumed position, metrics, per-rank sample log, signal flags, progress bar."""
        from pipeline.data.loader import TrainStream

        cfg, dist = self.cfg, self.dist
        stream = TrainStream(self.data.sequences, self.data.masker, seed=cfg.train.seed,
                             global_batch=self.plan.global_size, micro_batch=self.plan.micro_size, rank=dist.rank,
                             world_size=dist.world_size, start=self.samples,
                             num_workers=cfg.data.num_workers, pin_memory=dist.on_gpu)
        self.writer = MetricWriter(self.run_dir if dist.is_main else None, tensorboard=cfg.logging.tensorboard)
        self.sample_log = open(os.path.join(self.run_dir, f"samples.rank{dist.rank}.jsonl"), "a") \
            if cfg.logging.sample_ids else None
        self.counters = Counters(dist.device)
        self.watchdog = StallWatchdog(cfg.train.stall_timeout_s, dist.rank, self.run_dir).start(self.step)
        self.bar = None
        if dist.is_main and cfg.logging.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=self.stop_at, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        self.batches = iter(stream)
        if self.resume_from and not self.universal:
            # Same world size: each rank continues its own dropout stream. Another world size has other ranks, so
            # their RNG streams cannot continue; data order and masks do not depend on it (keyed by sample
            # position). Restored after iter(): the DataLoader draws its base seed from the global torch RNG.
            ckpt_lib.restore_rng(self.resume_from, dist.rank)
        self.last_saved = self.step if self.resume_from else -1
        self.t_last, self.data_wait = time.time(), 0.0

    def log_start(self) -> None:
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.student.parameters())  # ZeRO-3 partitions
        teacher = "none" if self.teacher is None else self.cfg.teacher.name_or_path
        log.info(f"world {self.dist.world_size} x micro {self.plan.micro_size} x accumulation {self.plan.accumulation}"
                 f" = global {self.plan.global_size} sequences of {self.cfg.data.seq_len}; ZeRO {self.zero_stage}, "
                 f"{self.precision}, {type(self.optimizer).__name__}; student {n_params / 1e6:.1f}M params; teacher "
                 f"{teacher}; {len(self.data.sequences)} training sequences; steps {self.step} -> {self.stop_at} of "
                 f"{self.total_steps}")

    def due(self, every: int | None) -> bool:
        """Whether a periodic action is due after this step; the last step has its own in `finish`."""
        return bool(every) and self.step % every == 0 and self.step != self.stop_at

    def train_step(self) -> bool:
        """One optimizer step over the plan's micro-batches; returns whether any rank was asked to stop."""
        engine, cfg = self.engine, self.cfg
        skipped_before = engine.skipped_steps
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.dist.device)
        for micro in range(self.plan.accumulation):
            terms, stats = forward_losses(engine, self.teacher, self.next_batch(), cfg.loss)
            if inject_nan(self.step + 1, micro, self.dist.rank):
                terms.total = terms.total * float("nan")
            nonfinite |= ~torch.isfinite(terms.total.detach())
            engine.backward(terms.total)
            engine.step()
            self.counters.add(terms, stats)
        self.step += 1
        self.watchdog.beat(self.step)
        stop_requested, any_nonfinite = self.stop_flags.agree(self.dist.device, nonfinite)
        if any_nonfinite:
            self.on_nonfinite(skipped=engine.skipped_steps > skipped_before)
        if self.bar is not None:
            self.bar.update(1)
        return stop_requested

    def next_batch(self) -> dict:
        """The next micro-batch on the device (the time spent waiting for it counts as data wait)."""
        t0 = time.time()
        batch = next(self.batches)
        self.data_wait += time.time() - t0
        if self.sample_log is not None:
            self.sample_log.write(json.dumps({"step": self.step, "positions": batch["positions"].tolist(),
                                              "samples": batch["sample_ids"].tolist()}) + "\n")
        return {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()
                if k in ("input_ids", "attention_mask", "labels")}

    def on_nonfinite(self, skipped: bool) -> None:
        where = f"non-finite loss at step {self.step}"
        if not skipped:
            raise NonFiniteLoss(f"{where}, and DeepSpeed applied the update (this config has no overflow check): the "
                                f"weights may be corrupt. Resume from the last complete checkpoint with a ZeRO config "
                                f"or a lower optimizer.lr")
        if self.cfg.train.nonfinite == "stop":
            self.save_checkpoint()  # DeepSpeed dropped the update: these are the last good weights
            raise NonFiniteLoss(f"{where}: stopped (train.nonfinite=stop) with a checkpoint of the last good weights "
                                f"at step {self.step}; inspect the data around sample "
                                f"{(self.step - 1) * self.plan.global_size} or lower optimizer.lr, then resume")
        log.info(f"{where}: DeepSpeed skipped the update ({self.engine.skipped_steps} skipped so far)")

    def log_metrics(self) -> None:
        """Every logging.every_steps and at the last step: the metrics row to TensorBoard, metrics.jsonl and the log.
        The counters' all-reduce is the only host sync of the loop besides the stop flags."""
        if self.step % self.cfg.logging.every_steps and self.step != self.stop_at:
            return
        counters = self.counters.reduce_and_reset(all_reduce_sum)
        grad_norm = self.engine.get_global_grad_norm()
        values = train_row(counters, seconds=time.time() - self.t_last, data_wait_s=self.data_wait, step=self.step,
                           cfg=self.cfg, plan=self.plan, with_teacher=self.teacher is not None,
                           flops_per_token=self.flops_per_token, peak_flops=self.peak_flops, lr=self.engine.get_lr()[0],
                           grad_norm=float(grad_norm) if grad_norm is not None else None,
                           skipped_steps=self.engine.skipped_steps, memory=memory_metrics(self.dist.device))
        self.writer.write(self.step, values)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {values['loss/total']:.3f}")
        log.info(format_train_row(self.step, self.total_steps, values))
        self.t_last, self.data_wait = time.time(), 0.0

    def evaluate(self, final: bool = False) -> None:
        self.last_eval = evaluate(self.engine, self.teacher, self.data.eval_batches, self.cfg.loss, self.dist.device)
        self.writer.write(self.step, self.last_eval, kind="eval")
        log.info(("final held-out evaluation: " if final else "eval ")
                 + " ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in self.last_eval.items()))

    def save_checkpoint(self) -> None:
        """A complete checkpoint of this step on every rank (collective), with the trainer state to resume from."""
        trainer_state = {"step": self.step, "samples": self.step * self.plan.global_size,
                         "total_steps": self.total_steps, "world_size": self.dist.world_size,
                         "zero_stage": self.zero_stage, "precision": self.precision,
                         "global_batch": self.plan.global_size, "config": self.cfg.to_dict()}
        ckpt_lib.save(self.engine, self.run_dir, step=self.step, trainer_state=trainer_state, rank=self.dist.rank,
                      student_init=self.student_init, export_hf=self.cfg.checkpoint.export_hf,
                      keep_last=self.cfg.checkpoint.keep_last, log=log.info, device=self.dist.device)
        self.last_saved = self.step

    # -- the end ------------------------------------------------------------------------------------------------
    def finish(self, preempted: bool) -> None:
        """Final evaluation (not when preempted: the job comes back), the last checkpoint, the SLURM requeue, and at
        the end of training the student as a Hugging Face folder in run_dir/student."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.data.eval_batches is not None and not preempted:
            self.evaluate(final=True)
        if self.last_saved != self.step:
            self.save_checkpoint()
        if preempted and self.dist.is_main and self.stop_flags.requeue:
            requeue_slurm_job(log.info)
        if self.dist.is_main and self.step == self.total_steps and self.cfg.checkpoint.export_hf:
            final = os.path.join(self.run_dir, "student")
            shutil.rmtree(final, ignore_errors=True)
            shutil.copytree(os.path.join(self.run_dir, "checkpoints", ckpt_lib.tag_for(self.step), "hf"), final)
            log.info(f"student exported to {final} (AutoModelForMaskedLM.from_pretrained loads it)")
        barrier()

    def close_outputs(self) -> None:
        self.watchdog.stop()
        self.stop_flags.restore()
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        if self.sample_log is not None:
            self.sample_log.close()


def run(cfg: RunConfig, ds_raw: dict, dist: DistInfo, *, resume: str = "auto", ds_source: str = "ds_config",
        command: list[str] | None = None, stop_flags: StopFlags | None = None) -> dict:
    """Train; returns the final held-out evaluation (rank 0) or {}."""
    return Trainer(cfg, ds_raw, dist, ds_source=ds_source, command=command, stop_flags=stop_flags).fit(resume)
