"""Fine-tune an exported student (or the teacher, or any Hugging Face encoder) on sequence classification and
report per-class metrics: the downstream check of a distillation.

    report = finetune(FinetuneConfig(model="runs/distil/student", data="data/sst2/", output="runs/sst2"))

The model is `AutoModelForSequenceClassification` from the checkpoint (a masked-LM checkpoint gets a fresh
classification head; its MLM head is dropped) with the tokenizer saved beside it. Plain PyTorch: AdamW (no
weight decay on biases and LayerNorm), linear warmup then linear decay, gradient clipping, one evaluation on
validation per epoch. Early stopping watches validation accuracy by default (`metric="macro_f1"` for imbalanced
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

from .classify_data import ClassificationData, Split, load_classification_data
from .report import classification_report, format_report

log = logging.getLogger(__name__)

METRICS = {"accuracy": lambda r: r["accuracy"], "macro_f1": lambda r: r["macro avg"]["f1-score"]}


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
    device: str | None = None  # default: cuda if available, else cpu
    progress: bool = True  # tqdm bars (on a terminal only)

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


@torch.inference_mode()
def predict(model, examples: list[dict], batch_size: int, pad_id: int, device: torch.device) -> tuple[list[int], float]:
    """Predicted label ids, in order, and the mean cross-entropy. Examples run sorted by length so that batches
    carry little padding."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    preds = [0] * len(examples)
    loss_sum = torch.zeros((), device=device)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        with _autocast(device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            preds[i] = p
    return preds, loss_sum.item() / len(examples)


def evaluate(model, examples, labels: list[int], label_names: list[str], batch_size: int, pad_id: int,
             device: torch.device) -> tuple[dict, float]:
    """The classification report (label names as keys) and the mean cross-entropy on `examples`."""
    preds, loss = predict(model, examples, batch_size, pad_id, device)
    report = classification_report([label_names[i] for i in labels], [label_names[i] for i in preds], label_names)
    return report, loss


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
    """Fine-tune, save the best model to `cfg.output`, write report.json and return the report (a dict)."""
    t_start = time.time()
    cfg.validate()
    if data is None:
        data = load_classification_data(cfg.data, cfg.text_column, cfg.label_column, test=cfg.test,
                                        valid_fraction=cfg.valid_fraction, seed=cfg.seed)
    for note in data.notes:
        log.info("[finetune] %s", note)
    log.info("[finetune] labels %s; %s", data.label_names,
             ", ".join(f"{k} {v}" for k, v in data.summary()["sizes"].items()))

    from transformers import set_seed
    set_seed(cfg.seed)  # the fresh head's initialisation, dropout and shuffling
    tokenizer, model = load_model(cfg.model, data)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    max_length = _max_length(cfg.max_length, model, tokenizer)
    train_ex = encode(tokenizer, data.train, max_length)
    valid_ex = encode(tokenizer, data.validation, max_length)
    test_ex = encode(tokenizer, data.test, max_length) if data.test is not None else None
    t_loaded = time.time()

    steps_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    opt, sched = _optimizer(model, cfg, total_steps)
    os.makedirs(cfg.output, exist_ok=True)
    tb_dir = os.path.join(cfg.output, "tensorboard") if cfg.tensorboard_dir is None else cfg.tensorboard_dir
    writer = _summary_writer(tb_dir)
    gen = torch.Generator().manual_seed(cfg.seed)
    log_every = max(1, steps_per_epoch // 4)
    show_bar = cfg.progress and sys.stderr.isatty()

    history, best, best_state, best_epoch, bad_epochs = [], None, None, 0, 0
    step, train_s, eval_s = 0, 0.0, 0.0
    try:
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.time()
            model.train()
            order = torch.randperm(len(train_ex), generator=gen).tolist()
            loss_sum, loss_n = torch.zeros((), device=device), 0
            epoch_loss, epoch_n = 0.0, 0
            bar = None
            if show_bar:
                from tqdm import tqdm
                bar = tqdm(total=steps_per_epoch, desc=f"finetune epoch {epoch}/{cfg.epochs}", unit="step",
                           dynamic_ncols=True, file=sys.stderr, leave=False)
            for start in range(0, len(order), cfg.batch_size):
                batch = collate([train_ex[i] for i in order[start:start + cfg.batch_size]], pad_id)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with _autocast(device):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])  # fp32 loss
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                loss_sum += loss.detach()
                loss_n += 1
                if step % log_every == 0 or start + cfg.batch_size >= len(order):
                    mean = (loss_sum / loss_n).item()  # host sync: log interval only
                    epoch_loss, epoch_n = epoch_loss + mean * loss_n, epoch_n + loss_n
                    loss_sum.zero_()
                    loss_n = 0
                    if writer is not None:
                        writer.add_scalar("finetune/train_loss", mean, step)
                        writer.add_scalar("finetune/lr", sched.get_last_lr()[0], step)
                    if bar is not None:
                        bar.set_postfix_str(f"loss {mean:.4f}")
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            t1 = time.time()
            train_s += t1 - t0
            rep, valid_loss = evaluate(model, valid_ex, data.validation.labels, data.label_names,
                                       2 * cfg.batch_size, pad_id, device)
            eval_s += time.time() - t1
            acc, f1 = rep["accuracy"], rep["macro avg"]["f1-score"]
            # Ties on the metric are common on small validation sets (several epochs at 100%): the lower
            # validation loss breaks them, so early stopping does not keep an epoch that is right but unsure.
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
            log.info("[finetune] epoch %d/%d train loss %.4f valid loss %.4f accuracy %.4f macro-F1 %.4f%s (%.1fs)",
                     epoch, cfg.epochs, history[-1]["train_loss"], valid_loss, acc, f1, " *best" if improved else "",
                     history[-1]["seconds"])
            if improved:
                best, best_epoch, bad_epochs = score, epoch, 0
                # Kept in host memory: a copy on disk per improvement would cost a full save each epoch.
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
                if cfg.patience and bad_epochs >= cfg.patience:
                    log.info("[finetune] early stop: no better validation %s for %d epochs", cfg.metric, bad_epochs)
                    break
    finally:
        if writer is not None:
            writer.close()

    model.load_state_dict(best_state)
    t2 = time.time()
    valid_report, valid_loss = evaluate(model, valid_ex, data.validation.labels, data.label_names,
                                        2 * cfg.batch_size, pad_id, device)
    test_report, test_loss = (evaluate(model, test_ex, data.test.labels, data.label_names, 2 * cfg.batch_size,
                                       pad_id, device) if test_ex is not None else (None, None))
    eval_s += time.time() - t2

    model.save_pretrained(cfg.output)
    tokenizer.save_pretrained(cfg.output)
    report = {
        "model": cfg.model,
        "config": {**asdict(cfg), "max_length_used": max_length, "tensorboard_dir": tb_dir or None},
        "data": data.summary(),
        "device": str(device),
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
    with open(os.path.join(cfg.output, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
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

