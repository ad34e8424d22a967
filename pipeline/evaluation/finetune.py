"""Fine-tune an exported student (or the teacher, or any Hugging Face encoder) on a downstream task with
`transformers.Trainer`, and report the task's metrics: the downstream check of a distillation.

    report = finetune(FinetuneConfig(model="runs/distil/student", data="data/sst2/", output="runs/sst2"))

Tasks (`task`): "classification" (single texts or text pairs, the head sized from the train labels),
"regression" (float labels: one output, mean squared error), "auto" (regression when the train labels are
fractional numbers, else classification) and "qa" (extractive question answering, SQuAD v1.1:
`pipeline/evaluation/squad.py`). Data come through `datasets` (`pipeline/evaluation/data.py`).

What the Trainer does here: AdamW with a linear schedule (warmup `warmup_ratio`), one evaluation per epoch,
best-epoch selection on the task's own metric (`metric`) with early stopping after `patience` epochs without a
better one, TensorBoard under `<output>/tensorboard`, checkpoints under `<output>/checkpoints` (removed at the
end unless `keep_checkpoints`). Engines: on GPUs DeepSpeed through `TrainingArguments(deepspeed=...)` (default
`ds_configs/zero2_bf16.json`; ZeRO 0-2) with bf16; on a CPU-only machine plain PyTorch, unless a DeepSpeed config
is named (`DS_ACCELERATOR=cpu`). Under a launcher (deepspeed, torchrun, srun) every rank runs this; `batch_size`
stays the global batch (per device: batch_size / ranks).

Outputs in `output`: the model and tokenizer (`transformers.pipeline("text-classification", model=output)`
returns the label names), and `report.json` (settings, data summary, per-epoch history, each evaluated split's
metrics, the per-class report and confusion matrix for classification, timing), written last: a folder without
it is not a finished run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.fileio import atomic_write

from . import metrics as task_metrics
from .data import TaskData, load_task_data
from .report import classification_report, confusion_matrix, format_report

log = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU_DS_CONFIG = os.path.join(ROOT, "ds_configs", "zero2_bf16.json")
TASKS = ("auto", "classification", "regression", "qa")
DEFAULT_METRICS = {"classification": ("accuracy", "macro_f1"), "regression": ("pearson", "spearman"),
                   "qa": ("exact_match", "f1")}


class FinetuneError(RuntimeError):
    """The run cannot start (model or tokenizer not loadable, bad setting); the message says what to change."""


@dataclass
class FinetuneConfig:
    model: str  # Hugging Face checkpoint folder or hub name (masked LM or bare encoder), with its tokenizer
    data: str  # file, folder of split files, or hf:NAME[#config=C]
    output: str  # folder for the fine-tuned model, tokenizer, report.json and TensorBoard logs
    task: str = "auto"  # auto, classification, regression or qa
    text_column: str = "text"  # qa: the question column
    text_pair_column: str | None = None  # second text of a pair task; qa: the context column
    label_column: str = "label"  # qa: the answers column
    test: str | None = None  # separate test source (replaces the data's test split)
    valid_fraction: float = 0.1  # share of train held out as validation when there is no validation split
    metrics: tuple[str, ...] | None = None  # reported metrics (default DEFAULT_METRICS of the task)
    metric: str | None = None  # best-epoch / early-stopping metric (default: the first of `metrics`)
    epochs: float = 3.0
    lr: float = 5e-5
    batch_size: int = 32  # global: examples per optimiser step over all ranks
    eval_batch_size: int | None = None  # per device (default 2 x the per-device train batch)
    max_length: int = 128  # tokens per example (truncated; capped at the model's position embeddings); qa: 384
    warmup_ratio: float = 0.0  # share of the optimiser steps with a linear warmup
    weight_decay: float = 0.0
    patience: int = 2  # epochs without a better validation metric before stopping (0: never stop early)
    seed: int = 42
    deepspeed: str | None = "auto"  # a DeepSpeed JSON; "auto": GPU_DS_CONFIG on GPUs, none on CPU; None: never
    bf16: bool | None = None  # default: on GPUs
    tensorboard: bool = True
    keep_checkpoints: bool = False
    progress_every_s: float = 30.0  # seconds between progress lines in the log
    tqdm: bool | None = None  # tqdm bars; default: when stderr is a terminal
    max_train_samples: int | None = None  # first N train examples only (quick runs)
    max_eval_samples: int | None = None
    doc_stride: int = 128  # qa: overlap of consecutive windows of a long context
    n_best: int = 20  # qa: start and end candidates per window
    max_answer_length: int = 30  # qa: longest answer span in tokens
    extra: dict = field(default_factory=dict)  # recorded in report.json as is (the GLUE runner's task name)

    def validate(self) -> None:
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {TASKS}, got {self.task!r}")
        if self.epochs <= 0:
            problems.append(f"epochs must be > 0, got {self.epochs}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 8:
            problems.append(f"max_length must be >= 8, got {self.max_length}")
        if self.patience < 0:
            problems.append(f"patience must be >= 0, got {self.patience}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        known = set(task_metrics.METRICS) | {"exact_match", "f1"}
        for name in (self.metrics or ()) + ((self.metric,) if self.metric else ()):
            if name not in known:
                problems.append(f"unknown metric {name!r}; known: {sorted(known)}")
        if self.deepspeed not in (None, "auto") and not os.path.isfile(self.deepspeed):
            problems.append(f"deepspeed: no such file {self.deepspeed!r}")
        if self.doc_stride < 1:
            problems.append(f"doc_stride must be >= 1, got {self.doc_stride}")
        if problems:
            raise FinetuneError("bad fine-tuning settings:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------- the engine


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def resolve_deepspeed(choice: str | None, cuda: bool) -> str | None:
    """The DeepSpeed config file of a run, or None for plain PyTorch (DDP under a launcher)."""
    if choice == "auto":
        return GPU_DS_CONFIG if cuda else None
    return choice


def check_deepspeed_config(path: str) -> dict:
    """The JSON of a DeepSpeed config, refused with a clear message where fine-tuning cannot use it."""
    try:
        with open(path) as f:
            ds = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise FinetuneError(f"{path}: not a readable DeepSpeed JSON ({e})") from None
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage > 2:
        raise FinetuneError(f"{path}: zero_optimization.stage {stage}: fine-tuning uses ZeRO stages 0-2 (the "
                            "model is small; ZeRO-3 would gather the weights at every evaluation); pick a "
                            "zero0/zero1/zero2 file")
    return ds


def training_arguments(cfg: FinetuneConfig, metric: str, ds_path: str | None, n_train: int):
    """`TrainingArguments` of a run: the fine-tuning settings, evaluation and saving each epoch, the best epoch
    on `metric` loaded at the end."""
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    ds = check_deepspeed_config(ds_path) if ds_path else None
    bf16 = cfg.bf16 if cfg.bf16 is not None else bool(ds.get("bf16", {}).get("enabled")) if ds else cuda
    world = world_size()
    per_device = max(1, math.ceil(cfg.batch_size / world))
    if per_device * world != cfg.batch_size:
        log.warning("[finetune] batch size %d does not split over %d ranks: %d per rank, %d per step",
                    cfg.batch_size, world, per_device, per_device * world)
    tqdm = sys.stderr.isatty() if cfg.tqdm is None else cfg.tqdm
    steps_per_epoch = math.ceil(n_train / (per_device * world))
    return TrainingArguments(
        output_dir=os.path.join(cfg.output, "checkpoints"),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=cfg.eval_batch_size or 2 * per_device,
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio, lr_scheduler_type="linear", max_grad_norm=1.0,
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
        metric_for_best_model=metric, greater_is_better=True, save_only_model=ds is None,
        # True would multiply every rank's loss by the number of ranks, meant for token-summed LM losses; a
        # classification, regression or span loss is a per-example mean, so it would double the gradient on 2 ranks
        average_tokens_across_devices=False,
        logging_strategy="steps", logging_steps=max(1, steps_per_epoch // 10), logging_first_step=True,
        report_to="none", disable_tqdm=not tqdm, seed=cfg.seed, data_seed=cfg.seed,
        use_cpu=not cuda, bf16=bf16, deepspeed=ds_path, dataloader_num_workers=0,
        ddp_backend="gloo" if not cuda and world > 1 else None)


def build_trainer(cfg: FinetuneConfig, trainer_cls, model, tokenizer, args, train, evaluation, compute_metrics,
                  collator, eval_name: str):
    """The Trainer with early stopping, TensorBoard (main process) and log-file progress lines."""
    from transformers import EarlyStoppingCallback, PrinterCallback

    from .progress import ProgressLogCallback

    callbacks = [ProgressLogCallback(args.per_device_train_batch_size * args.world_size, cfg.progress_every_s,
                                     eval_name)]
    if cfg.patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.patience))
    if cfg.tensorboard and is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(os.path.join(cfg.output, "tensorboard"))))
    trainer = trainer_cls(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                          processing_class=tokenizer, data_collator=collator, compute_metrics=compute_metrics,
                          callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # its raw dicts are what ProgressLogCallback replaces
    return trainer


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        raise FinetuneError(f"cannot load a tokenizer from {name_or_path!r} ({type(e).__name__}: {_first(e)}); "
                            "the folder must hold the tokenizer files (launch/export.py writes them)") from None


def load_model(auto_cls, name_or_path: str, **kwargs):
    try:
        return auto_cls.from_pretrained(name_or_path, **kwargs)
    except Exception as e:
        raise FinetuneError(f"cannot load {name_or_path!r} as {auto_cls.__name__[len('AutoModelFor'):]} "
                            f"({type(e).__name__}: {_first(e)})") from None


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def max_length_for(cfg_max: int, model, tokenizer) -> int:
    limits = [cfg_max, getattr(model.config, "max_position_embeddings", cfg_max)]
    if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 1_000_000:
        limits.append(tokenizer.model_max_length)
    return min(limits)


def history(trainer) -> list[dict]:
    """Per-epoch evaluation entries of the Trainer's log history."""
    return [{k: v for k, v in e.items() if not k.endswith(("_runtime", "_per_second"))}
            for e in trainer.state.log_history if any(k.startswith("eval_") for k in e)]


def best_epoch(trainer, metric: str) -> float | None:
    """The epoch whose evaluation the best checkpoint is (the Trainer keeps its metric, not its epoch)."""
    for entry in history(trainer):
        if entry.get(f"eval_{metric}") == trainer.state.best_metric:
            return entry.get("epoch")
    return None


def finish(cfg: FinetuneConfig, trainer, tokenizer, report: dict) -> dict:
    """Save the model and tokenizer, then report.json (last, atomically), and drop the checkpoints."""
    trainer.save_model(cfg.output)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(cfg.output)
        with atomic_write(os.path.join(cfg.output, "report.json"), "w") as f:
            json.dump(report, f, indent=2, default=_json_default)
        if not cfg.keep_checkpoints:
            shutil.rmtree(os.path.join(cfg.output, "checkpoints"), ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return report


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# ------------------------------------------------------------------------------ classification and regression


def tokenize(data: TaskData, tokenizer, max_length: int):
    """Token ids of every split (truncated, unpadded: batches are padded by the collator)."""
    cols = data.text_columns

    def encode(batch):
        return tokenizer(*[batch[c] for c in cols], truncation=True, max_length=max_length)

    return {name: ds.map(encode, batched=True, remove_columns=[c for c in ds.column_names if c != "labels"],
                         desc=f"tokenize {name}")
            for name, ds in data.splits.items()}


def task_metric_names(cfg: FinetuneConfig, kind: str) -> tuple[tuple[str, ...], str]:
    """The reported metrics and the best-epoch metric, checked against the task kind."""
    names = tuple(cfg.metrics or DEFAULT_METRICS[kind])
    metric = cfg.metric or names[0]
    if metric not in names:
        names += (metric,)
    fitting = task_metrics.REGRESSION if kind == "regression" else task_metrics.CLASSIFICATION
    bad = [n for n in names if n not in fitting]
    if bad:
        raise FinetuneError(f"metrics {bad} do not apply to a {kind} task; use {sorted(fitting)}")
    return names, metric


def metric_function(kind: str, names):
    def compute(pred) -> dict:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        values = logits.reshape(-1) if kind == "regression" else logits.argmax(-1)
        return task_metrics.compute(names, values, pred.label_ids)
    return compute


def split_report(data: TaskData, output) -> dict:
    """Metrics of one split's predictions, with the per-class report and confusion matrix for classification."""
    out = {k[len("test_"):]: v for k, v in output.metrics.items()
           if k.startswith("test_") and not k.endswith(("_runtime", "_per_second"))}
    if data.kind == "classification":
        preds = np.asarray(output.predictions).argmax(-1).tolist()
        labels = np.asarray(output.label_ids).tolist()
        names = data.label_names
        out["classes"] = classification_report([names[i] for i in labels], [names[i] for i in preds], names)
        out["confusion_matrix"] = {"labels": names, "matrix": confusion_matrix(labels, preds, len(names))}
    return out


def finetune(cfg: FinetuneConfig, data: TaskData | None = None) -> dict:
    """Fine-tune, save the best model to `cfg.output`, write report.json and return the report (a dict).
    Under a launcher every rank runs this and returns the report; the main process writes."""
    cfg.validate()
    if cfg.task == "qa":
        from .squad import finetune_qa
        return finetune_qa(cfg)
    t_start = time.time()
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, set_seed

    ds_path = resolve_deepspeed(cfg.deepspeed, torch.cuda.is_available())
    if ds_path:
        check_deepspeed_config(ds_path)  # before loading anything: a bad config fails fast
    if data is None:
        data = load_task_data(cfg.data, cfg.text_column, cfg.label_column, cfg.text_pair_column, cfg.task,
                              cfg.test, cfg.valid_fraction, cfg.seed)
    say = log.info if is_main_process() else (lambda *a, **k: None)
    for note in data.notes:
        say("[finetune] %s", note)
    say("[finetune] %s on %s; %s", data.kind, " + ".join(data.text_columns),
        ", ".join(f"{k} {len(v)}" for k, v in data.splits.items()))
    names, metric = task_metric_names(cfg, data.kind)

    set_seed(cfg.seed)  # the fresh head's initialisation (the same on every rank)
    tokenizer = load_tokenizer(cfg.model)
    if data.kind == "regression":
        head = {"num_labels": 1, "problem_type": "regression"}
    else:
        head = {"num_labels": data.num_labels, "problem_type": "single_label_classification",
                "id2label": dict(enumerate(data.label_names)),
                "label2id": {n: i for i, n in enumerate(data.label_names)}}
    model = load_model(AutoModelForSequenceClassification, cfg.model, **head)
    max_length = max_length_for(cfg.max_length, model, tokenizer)
    encoded = tokenize(data, tokenizer, max_length)
    if cfg.max_train_samples:
        encoded["train"] = encoded["train"].select(range(min(cfg.max_train_samples, len(encoded["train"]))))
    if cfg.max_eval_samples:
        for s in data.eval_splits:
            encoded[s] = encoded[s].select(range(min(cfg.max_eval_samples, len(encoded[s]))))
    best_split = data.eval_splits[0]
    args = training_arguments(cfg, metric, ds_path, len(encoded["train"]))
    trainer = build_trainer(cfg, Trainer, model, tokenizer, args, encoded["train"], encoded[best_split],
                            metric_function(data.kind, names), DataCollatorWithPadding(tokenizer), best_split)
    say("[finetune] %s: %d rank(s) on %s, %d examples per step, %s", "DeepSpeed " + os.path.basename(ds_path)
        if ds_path else "PyTorch", args.world_size, args.device.type,
        args.per_device_train_batch_size * args.world_size, "bf16" if args.bf16 else "fp32")
    t_loaded = time.time()
    train_out = trainer.train()
    t_trained = time.time()
    results = {s: split_report(data, trainer.predict(encoded[s], metric_key_prefix="test"))
               for s in data.eval_splits}
    report = {
        "model": cfg.model,
        "config": {**asdict(cfg), "max_length_used": max_length, "metrics": list(names), "metric": metric},
        "data": data.summary(),
        "engine": {"deepspeed": ds_path, "ranks": args.world_size, "device": args.device.type,
                   "bf16": bool(args.bf16)},
        "best_split": best_split,
        "best_checkpoint_metric": trainer.state.best_metric,
        "best_epoch": best_epoch(trainer, metric),
        "epochs_run": trainer.state.epoch,
        "steps": trainer.state.global_step,
        "train_loss": train_out.training_loss,
        "history": history(trainer),
        "results": results,
        "timing": {"load_s": round(t_loaded - t_start, 3), "train_s": round(t_trained - t_loaded, 3),
                   "total_s": round(time.time() - t_start, 3),
                   "train_examples_per_s": round(train_out.metrics.get("train_samples_per_second", 0.0), 1)},
    }
    return finish(cfg, trainer, tokenizer, report)


def report_tables(report: dict) -> str:
    """Each evaluated split's metrics, with the per-class table for classification."""
    parts = []
    for split, res in report["results"].items():
        scalars = {k: v for k, v in res.items() if isinstance(v, float)}
        line = f"{split}: " + " ".join(f"{k} {v:.4f}" for k, v in scalars.items())
        parts.append(format_report(res["classes"], line) if "classes" in res else line)
    return "\n\n".join(parts)
