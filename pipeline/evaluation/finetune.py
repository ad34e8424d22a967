"""Fine-tune an exported student (or the teacher, or any Hugging Face encoder) on sequence classification and
report per-class metrics: the downstream check of a distillation.

    report = finetune(FinetuneConfig(model="runs/distil/student", data="data/sst2/", output="runs/sst2"))

The model is `AutoModelForSequenceClassification` from the checkpoint (a masked-LM checkpoint gets a fresh
classification head; its MLM head is dropped) with the tokenizer saved beside it. AdamW (no weight decay on
biases and LayerNorm), linear warmup then linear decay, gradient clipping, one evaluation on validation per
epoch.

Engines (`engine`): "torch", one plain process; "deepspeed", a DeepSpeed engine (ZeRO stage 0-2) in every
rank started by `deepspeed launch/finetune.py ...`, torchrun or srun; "auto" (default) picks DeepSpeed on a
GPU or under a distributed launcher, plain PyTorch otherwise. Under DeepSpeed, `batch_size` stays the global
batch: each step's examples are dealt out over the ranks, each rank's mean loss is weighted by its share, and
DeepSpeed's gradient average then equals the gradient of the whole batch's mean loss (a rank left without an
example runs one with weight 0). Evaluation is sharded over the ranks and gathered, so every rank takes the
same early-stopping decision; rank 0 logs, writes TensorBoard and saves. With dropout off, 2 ranks reproduce
the single-process run (tests/evaluation/test_finetune_deepspeed.py).

Early stopping watches validation accuracy by default (`metric="macro_f1"` for imbalanced
label sets); an epoch is better if it raises the metric, or ties it with a lower validation loss (small
validation sets often tie at 100%); `patience` epochs in a row that are not better stop the run. The best
weights are kept in memory, put back at the end, saved, and reported on test (on validation when there is no
test split). On CUDA the forward runs under bf16 autocast (fp32 weights and
optimiser state); on CPU everything is fp32.

Outputs in `output`: the model and tokenizer (`transformers.pipeline("text-classification", model=output)` returns
the original label names, stored as id2label/label2id), `report.json` (config, data summary, per-epoch history,
the test and validation reports, timing), and TensorBoard scalars `finetune/train_loss`,
`finetune/valid_accuracy`, `finetune/valid_macro_f1`, `finetune/valid_loss`, `finetune/lr`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from pipeline.training.distributed import barrier
from pipeline.training.ds_config import zero_stage

from .classify_data import ClassificationData, Split, load_classification_data
from .report import classification_report, format_report

log = logging.getLogger(__name__)

METRICS = {"accuracy": lambda r: r["accuracy"], "macro_f1": lambda r: r["macro avg"]["f1-score"]}
ENGINES = ("auto", "torch", "deepspeed")
# The DeepSpeed settings of a fine-tuning run unless --deepspeed-config names others. Batch sizes and gradient
# clipping are filled in from the fine-tuning settings. Weights and optimiser state stay fp32 (the forward runs
# under bf16 autocast on GPU): the model saved at the end is the one trained, not a rounded copy.
DEFAULT_DS_CONFIG = {"zero_optimization": {"stage": 1}, "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


class FinetuneError(RuntimeError):
    """The run cannot start (model or tokenizer not loadable, bad setting); the message says what to change."""


@dataclass
class FinetuneConfig:
    model: str  # Hugging Face checkpoint folder or hub name (masked LM or bare encoder), with its tokenizer
    data: str  # file, folder of split files, or hf:NAME[#config=C]
    output: str  # folder for the fine-tuned model, tokenizer, report.json and TensorBoard logs
    text_column: str = "text"  # column (field) holding the text
    label_column: str = "label"  # column (field) holding the label (string or int)
    valid_fraction: float = 0.1  # share of train held out as validation when there is no validation split
    test: str | None = None  # separate test source (overrides a test file of a `data` folder)
    epochs: int = 3  # maximum number of epochs
    lr: float = 5e-5  # peak learning rate of AdamW
    batch_size: int = 32  # examples per optimiser step
    max_length: int = 256  # tokens per example (truncated; capped at the model's position embeddings)
    patience: int = 2  # stop after this many epochs without a better validation metric (0: never stop early)
    seed: int = 0  # data split, shuffling, head initialisation and dropout
    tensorboard_dir: str | None = None  # default <output>/tensorboard; "" disables TensorBoard
    metric: str = "accuracy"  # early-stopping metric on validation: accuracy or macro_f1
    warmup_fraction: float = 0.1  # share of the optimiser steps with a linear warmup
    weight_decay: float = 0.01  # AdamW weight decay (not on biases and LayerNorm weights)
    grad_clip: float = 1.0  # gradient-norm clipping (0: off)
    device: str | None = None  # default: cuda if available, else cpu (engine torch; DeepSpeed uses its rank's)
    progress: bool = True  # tqdm bars (on a terminal only)
    engine: str = "auto"  # "auto", "torch" or "deepspeed" (see the module docstring)
    deepspeed_config: str | None = None  # DeepSpeed JSON for engine deepspeed (default: DEFAULT_DS_CONFIG)

    def validate(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            problems.append(f"max_length must be >= 2, got {self.max_length}")
        if self.patience < 0:
            problems.append(f"patience must be >= 0, got {self.patience}")
        if self.metric not in METRICS:
            problems.append(f"metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            problems.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 < self.valid_fraction < 1.0:
            problems.append(f"valid_fraction must be in (0, 1), got {self.valid_fraction}")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.deepspeed_config and not os.path.isfile(self.deepspeed_config):
            problems.append(f"deepspeed_config: no such file {self.deepspeed_config!r}")
        if problems:
            raise FinetuneError("bad fine-tuning settings:\n  " + "\n  ".join(problems))


def load_model(name_or_path: str, data: ClassificationData):
    """Tokenizer and sequence classifier from one checkpoint, with the data's labels in the config."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        raise FinetuneError(f"cannot load a tokenizer from {name_or_path!r} ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}); the folder must "
                            "hold the tokenizer files (launch/export.py writes them)") from None
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=len(data.label_names), id2label=data.id2label, label2id=data.label2id,
            problem_type="single_label_classification")
    except Exception as e:
        raise FinetuneError(f"cannot load {name_or_path!r} as a sequence classifier ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})") from None
    return tokenizer, model


def _max_length(cfg_max: int, model, tokenizer) -> int:
    limits = [cfg_max, getattr(model.config, "max_position_embeddings", cfg_max)]
    if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 1_000_000:
        limits.append(tokenizer.model_max_length)
    return min(limits)


def encode(tokenizer, split: Split, max_length: int) -> list[dict]:
    """Token ids per example (truncated, unpadded); batches are padded to their longest example."""
    enc = tokenizer(split.texts, truncation=True, max_length=max_length, padding=False)
    return [{"input_ids": ids, "label": label} for ids, label in zip(enc["input_ids"], split.labels)]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[i, :len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long)}


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class _Ranks:
    """This process's place among the ranks (rank 0 of 1 for a plain run) and the collectives fine-tuning uses."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        return [sum(v) for v in zip(*self.gather(values))] if self.world > 1 else list(values)

    def barrier(self) -> None:
        if self.world > 1:
            barrier()


def rank_share(items: list, rank: int, world: int) -> tuple[list, float]:
    """This rank's part of one global batch, and the weight of its mean loss.

    DeepSpeed averages the ranks' gradients; with weight = (its examples) x world / (batch examples), that average
    is the gradient of the whole batch's mean loss, however unevenly the last batch splits. A rank left without
    an example gets the batch's first one with weight 0 (it must still run forward and backward with the rest)."""
    part = items[rank::world]
    if not part:
        return items[:1], 0.0
    return part, len(part) * world / len(items)


@torch.inference_mode()
def predict(model, examples: list[dict], batch_size: int, pad_id: int, device: torch.device,
            ranks: _Ranks | None = None) -> tuple[list[int], float]:
    """Predicted label ids, in order, and the mean cross-entropy. Examples run sorted by length so that batches
    carry little padding; with several ranks each runs every world-th of them and the results are gathered."""
    ranks = ranks or _Ranks()
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))[ranks.rank::ranks.world]
    mine: list[tuple[int, int]] = []
    loss_sum = torch.zeros((), device=device)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        with _autocast(device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        mine.extend(zip(idx, logits.argmax(-1).tolist()))
    preds = [0] * len(examples)
    total = 0.0
    for pairs, loss in ranks.gather((mine, loss_sum.item())):
        total += loss
        for i, p in pairs:
            preds[i] = p
    return preds, total / len(examples)


def evaluate(model, examples, labels: list[int], label_names: list[str], batch_size: int, pad_id: int,
             device: torch.device, ranks: _Ranks | None = None) -> tuple[dict, float]:
    """The classification report (label names as keys) and the mean cross-entropy on `examples`."""
    preds, loss = predict(model, examples, batch_size, pad_id, device, ranks)
    report = classification_report([label_names[i] for i in labels], [label_names[i] for i in preds], label_names)
    return report, loss


def resolve_engine(engine: str, env=os.environ) -> str:
    """"auto": DeepSpeed on a GPU or when a launcher started several ranks, plain PyTorch otherwise."""
    if engine != "auto":
        return engine
    return "deepspeed" if torch.cuda.is_available() or int(env.get("WORLD_SIZE", "1")) > 1 else "torch"


def deepspeed_config(cfg: "FinetuneConfig", world: int) -> dict:
    """The DeepSpeed config of a fine-tuning run: `cfg.deepspeed_config` (or DEFAULT_DS_CONFIG) with the batch
    and clipping fields filled in. Raises FinetuneError naming the file and key for what fine-tuning cannot use."""
    import copy

    if cfg.deepspeed_config:
        from pipeline.training.config import ConfigError
        from pipeline.training.ds_config import load_ds_config

        try:
            ds = load_ds_config(cfg.deepspeed_config)
        except ConfigError as e:
            raise FinetuneError(str(e)) from None
        where = cfg.deepspeed_config
    else:
        ds, where = copy.deepcopy(DEFAULT_DS_CONFIG), "the default DeepSpeed config"
    micro = math.ceil(cfg.batch_size / world)
    want = {"train_batch_size": micro * world, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": 1, "gradient_clipping": cfg.grad_clip}
    problems = []
    for key in ("optimizer", "scheduler"):
        if key in ds:
            problems.append(f'"{key}": fine-tuning builds its own AdamW and linear schedule from --lr and '
                            f"--warmup-fraction; remove the section")
    for key in ("fp16", "bf16"):
        if ds.get(key, {}).get("enabled"):
            problems.append(f'"{key}.enabled": fine-tuning keeps fp32 weights (the forward runs under bf16 autocast '
                            f"on GPU); use an fp32 config such as ds_configs/zero1_fp32.json")
    stage = zero_stage(ds)
    if stage > 2:
        problems.append(f'"zero_optimization.stage" {stage}: fine-tuning supports ZeRO stages 0-2 (the student is '
                        f"small; its evaluation runs the ranks on different batches, which ZeRO-3 cannot)")
    for key, value in want.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            problems.append(f'"{key}" is {given!r} but the fine-tuning settings give {value!r} (--batch-size '
                            f'{cfg.batch_size} over {world} rank(s)); set it to "auto" or leave it out')
        ds[key] = value
    if problems:
        raise FinetuneError(f"{where}: cannot fine-tune with it:\n  " + "\n  ".join(problems))
    return ds


class _TorchEngine:
    """One plain process: loss.backward, clipping, AdamW step, schedule step."""

    def __init__(self, model, cfg: "FinetuneConfig", total_steps: int):
        self.module = model
        self.opt, self.sched = _optimizer(model, cfg, total_steps)
        self.grad_clip = cfg.grad_clip

    def __call__(self, **batch):
        return self.module(**batch)

    def step(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]


class _DeepSpeedEngine(_TorchEngine):
    """A DeepSpeed engine around the same AdamW and schedule: engine.backward (gradients averaged over the ranks),
    engine.step (clipping from the config, optimiser and schedule)."""

    def __init__(self, model, cfg: "FinetuneConfig", total_steps: int, ds: dict):
        import deepspeed

        opt, sched = _optimizer(model, cfg, total_steps)
        self.engine, self.opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
        self.sched = sched
        self.module = self.engine.module

    def __call__(self, **batch):
        return self.engine(**batch)

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()


def _optimizer(model, cfg: FinetuneConfig, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(cfg.warmup_fraction * total_steps), total_steps)
    return opt, sched


def _summary_writer(path: str | None):
    if not path:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(path)


def finetune(cfg: FinetuneConfig, data: ClassificationData | None = None) -> dict:
    """Fine-tune, save the best model to `cfg.output`, write report.json and return the report (a dict).

    Under DeepSpeed every rank runs this; rank 0 logs and writes, and every rank returns the report."""
    t_start = time.time()
    cfg.validate()
    engine_name = resolve_engine(cfg.engine)
    ranks, device, ds = _Ranks(), None, None
    if engine_name == "deepspeed":
        from pipeline.training.distributed import init_distributed

        info = init_distributed()
        ranks, device = _Ranks(info.rank, info.world_size), info.device
        ds = deepspeed_config(cfg, info.world_size)  # before loading anything: a bad config fails fast
    else:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    say = log.info if ranks.is_main else (lambda *a, **k: None)
    if data is None:
        data = load_classification_data(cfg.data, cfg.text_column, cfg.label_column, test=cfg.test,
                                        valid_fraction=cfg.valid_fraction, seed=cfg.seed)
    for note in data.notes:
        say("[finetune] %s", note)
    say("[finetune] labels %s; %s", data.label_names,
        ", ".join(f"{k} {v}" for k, v in data.summary()["sizes"].items()))

    from transformers import set_seed
    set_seed(cfg.seed)  # the fresh head's initialisation (the same on every rank), dropout and shuffling
    tokenizer, model = load_model(cfg.model, data)
    model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    max_length = _max_length(cfg.max_length, model, tokenizer)
    train_ex = encode(tokenizer, data.train, max_length)
    valid_ex = encode(tokenizer, data.validation, max_length)
    test_ex = encode(tokenizer, data.test, max_length) if data.test is not None else None
    t_loaded = time.time()

    steps_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    runner = (_DeepSpeedEngine(model, cfg, total_steps, ds) if engine_name == "deepspeed"
              else _TorchEngine(model, cfg, total_steps))
    model = runner.module
    say("[finetune] engine %s: %d rank(s) on %s, %d examples per step%s", engine_name, ranks.world, device.type,
        cfg.batch_size, f", ZeRO stage {zero_stage(ds)}" if ds else "")
    if ranks.is_main:
        os.makedirs(cfg.output, exist_ok=True)
    tb_dir = os.path.join(cfg.output, "tensorboard") if cfg.tensorboard_dir is None else cfg.tensorboard_dir
    writer = _summary_writer(tb_dir) if ranks.is_main else None
    gen = torch.Generator().manual_seed(cfg.seed)
    log_every = max(1, steps_per_epoch // 4)
    show_bar = cfg.progress and ranks.is_main and sys.stderr.isatty()
    eval_batch = 2 * cfg.batch_size

    history, best, best_state, best_epoch, bad_epochs = [], None, None, 0, 0
    step, train_s, eval_s = 0, 0.0, 0.0
    try:
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.time()
            model.train()
            order = torch.randperm(len(train_ex), generator=gen).tolist()  # the same on every rank
            # Per-example cross-entropy summed over the log interval, and its example count (all ranks).
            loss_sum, loss_n = torch.zeros((), device=device), 0
            epoch_loss, epoch_n = 0.0, 0
            bar = None
            if show_bar:
                from tqdm import tqdm
                bar = tqdm(total=steps_per_epoch, desc=f"finetune epoch {epoch}/{cfg.epochs}", unit="step",
                           dynamic_ncols=True, file=sys.stderr, leave=False)
            for start in range(0, len(order), cfg.batch_size):
                part, weight = rank_share(order[start:start + cfg.batch_size], ranks.rank, ranks.world)
                batch = collate([train_ex[i] for i in part], pad_id)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with _autocast(device):
                    logits = runner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                ce = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")  # fp32
                runner.step(ce.mean() * weight)
                step += 1
                if weight:
                    loss_sum += ce.detach().sum()
                    loss_n += len(part)
                if step % log_every == 0 or start + cfg.batch_size >= len(order):
                    total, n = ranks.sum([loss_sum.item(), float(loss_n)])  # host sync: log interval only
                    mean = total / max(n, 1.0)
                    epoch_loss, epoch_n = epoch_loss + total, epoch_n + n
                    loss_sum.zero_()
                    loss_n = 0
                    if writer is not None:
                        writer.add_scalar("finetune/train_loss", mean, step)
                        writer.add_scalar("finetune/lr", runner.lr(), step)
                    if bar is not None:
                        bar.set_postfix_str(f"loss {mean:.4f}")
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            t1 = time.time()
            train_s += t1 - t0
            rep, valid_loss = evaluate(model, valid_ex, data.validation.labels, data.label_names, eval_batch, pad_id,
                                       device, ranks)
            eval_s += time.time() - t1
            acc, f1 = rep["accuracy"], rep["macro avg"]["f1-score"]
            # Ties on the metric are common on small validation sets (several epochs at 100%): the lower
            # validation loss breaks them, so early stopping does not keep an epoch that is right but unsure.
            # Every rank has the same gathered figures, so every rank takes the same decision.
            score = (METRICS[cfg.metric](rep), -valid_loss)
            improved = best is None or score > best
            history.append({"epoch": epoch, "step": step, "train_loss": epoch_loss / max(epoch_n, 1),
                            "valid_accuracy": acc, "valid_macro_f1": f1, "valid_loss": valid_loss,
                            "seconds": round(time.time() - t0, 3), "best": improved})
            if writer is not None:
                writer.add_scalar("finetune/valid_accuracy", acc, step)
                writer.add_scalar("finetune/valid_macro_f1", f1, step)
                writer.add_scalar("finetune/valid_loss", valid_loss, step)
                writer.flush()
            say("[finetune] epoch %d/%d train loss %.4f valid loss %.4f accuracy %.4f macro-F1 %.4f%s (%.1fs)",
                epoch, cfg.epochs, history[-1]["train_loss"], valid_loss, acc, f1, " *best" if improved else "",
                history[-1]["seconds"])
            if improved:
                best, best_epoch, bad_epochs = score, epoch, 0
                # Kept in host memory: a copy on disk per improvement would cost a full save each epoch.
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
                if cfg.patience and bad_epochs >= cfg.patience:
                    say("[finetune] early stop: no better validation %s for %d epochs", cfg.metric, bad_epochs)
                    break
    finally:
        if writer is not None:
            writer.close()

    model.load_state_dict(best_state)
    t2 = time.time()
    valid_report, valid_loss = evaluate(model, valid_ex, data.validation.labels, data.label_names, eval_batch,
                                        pad_id, device, ranks)
    test_report, test_loss = (evaluate(model, test_ex, data.test.labels, data.label_names, eval_batch, pad_id,
                                       device, ranks) if test_ex is not None else (None, None))
    eval_s += time.time() - t2

    report = {
        "model": cfg.model,
        "config": {**asdict(cfg), "max_length_used": max_length, "tensorboard_dir": tb_dir or None},
        "data": data.summary(),
        "device": str(device),
        "engine": engine_name,
        "ranks": ranks.world,
        "zero_stage": zero_stage(ds) if ds else None,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "early_stopping_metric": f"valid_{cfg.metric}",
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "steps": step,
        "history": history,
        "report_split": "test" if test_report is not None else "validation",
        "test": test_report,
        "validation": valid_report,
        "test_loss": test_loss,
        "validation_loss": valid_loss,
        "timing": {"load_s": round(t_loaded - t_start, 3), "train_s": round(train_s, 3), "eval_s": round(eval_s, 3),
                   "total_s": round(time.time() - t_start, 3),
                   "train_examples_per_s": round(len(train_ex) * len(history) / max(train_s, 1e-9), 1)},
    }
    if ranks.is_main:
        model.save_pretrained(cfg.output)
        tokenizer.save_pretrained(cfg.output)
        with open(os.path.join(cfg.output, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
    ranks.barrier()  # the model is on disk before any rank returns
    return report


def report_tables(report: dict) -> str:
    """The test (or validation) and validation reports as text tables."""
    parts = []
    if report["test"] is not None:
        parts.append(format_report(report["test"], f"test (best epoch {report['best_epoch']})"))
    else:
        parts.append("no test split: reporting on validation")
    parts.append(format_report(report["validation"], f"validation (best epoch {report['best_epoch']})"))
    return "\n\n".join(parts)

