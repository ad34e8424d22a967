"""Extractive question answering (SQuAD v1.1) on transformers' Trainer: the sliding-window preprocessing, the
n-best span post-processing and the official exact-match / F1 scores.

Data: rows of `id`, `question`, `context` and `answers` (`{"text": [...], "answer_start": [...]}`, character
offsets into the context), as `hf:rajpurkar/squad` has them, as JSON Lines, or SQuAD's own nested JSON file
(`train-v1.1.json`, `dev-v1.1.json`), through `pipeline/evaluation/data.py`.

Preprocessing: question and context are tokenized together, the context only truncated, in windows of
`max_length` tokens overlapping by `doc_stride`; the offset mapping gives each token's characters. Training
windows are labelled with the answer's first and last token, or with [CLS] (index 0) when the answer is not
wholly inside the window. Evaluation windows keep their example id and the offsets of context tokens only.

Post-processing: for every example, over all of its windows, the `n_best` best starts and ends are paired;
a pair is a candidate when both are context tokens, end >= start and the span is at most
`max_answer_length` tokens; the answer is the context characters of the candidate with the highest
start + end logit.

Scores: the official v1.1 evaluation (lower case, punctuation and the articles a/an/the removed, white space
collapsed; exact match and token-overlap F1, each the best over the gold answers, averaged, in percent). Written
here: the `evaluate` library's "squad" metric downloads its script at run time, which an offline cluster refuses.

What the Trainer cannot do alone, and `QATrainer` adds: scoring needs the examples and the windows' offsets,
which the Trainer's `compute_metrics` never sees; `QATrainer.evaluate` runs the prediction loop, post-processes
and scores, so best-epoch selection and early stopping work on F1.
"""
from __future__ import annotations

import collections
import logging
import re
import string
import time
from dataclasses import asdict

import numpy as np
from transformers import Trainer

from .data import DataError, check_columns, load_raw

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- official scores


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Exact match and F1 in percent over the references' ids (a missing prediction scores 0)."""
    em = total_f1 = 0.0
    for qid, golds in references.items():
        pred = predictions.get(qid, "")
        em += max(exact_match(pred, g) for g in golds)
        total_f1 += max(f1(pred, g) for g in golds)
    n = max(len(references), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * total_f1 / n}


# ----------------------------------------------------------------------------------------------- windows


def _window(tokenizer, examples, q_col: str, c_col: str, max_length: int, doc_stride: int):
    questions = [q.lstrip() for q in examples[q_col]]  # leading spaces would only waste window room
    pad_right = tokenizer.padding_side == "right"
    first, second = (questions, examples[c_col]) if pad_right else (examples[c_col], questions)
    return tokenizer(first, second, truncation="only_second" if pad_right else "only_first",
                     max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
                     return_offsets_mapping=True), (1 if pad_right else 0)


def train_features(examples, tokenizer, q_col: str, c_col: str, a_col: str, max_length: int, doc_stride: int):
    """Training windows with `start_positions` / `end_positions` (0, the [CLS] token, for no answer)."""
    enc, ctx_id = _window(tokenizer, examples, q_col, c_col, max_length, doc_stride)
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    starts, ends = [], []
    for i, offsets in enumerate(offsets_all):
        answers = examples[a_col][sample_map[i]]
        seq = enc.sequence_ids(i)
        ctx = [t for t, s in enumerate(seq) if s == ctx_id]
        if not answers["answer_start"] or not ctx:
            starts.append(0)
            ends.append(0)
            continue
        a_start = answers["answer_start"][0]
        a_end = a_start + len(answers["text"][0])
        if offsets[ctx[0]][0] > a_start or offsets[ctx[-1]][1] < a_end:
            starts.append(0)  # the answer is not wholly in this window
            ends.append(0)
            continue
        start = next(t for t in ctx if offsets[t][1] > a_start)
        end = next(t for t in reversed(ctx) if offsets[t][0] < a_end)
        starts.append(start)
        ends.append(end)
    enc["start_positions"], enc["end_positions"] = starts, ends
    return enc


def eval_features(examples, tokenizer, q_col: str, c_col: str, max_length: int, doc_stride: int):
    """Evaluation windows with their `example_id` and `offset_mapping` (None outside the context)."""
    enc, ctx_id = _window(tokenizer, examples, q_col, c_col, max_length, doc_stride)
    sample_map = enc.pop("overflow_to_sample_mapping")
    enc["example_id"] = [examples["id"][j] for j in sample_map]
    enc["offset_mapping"] = [[o if s == ctx_id else None for o, s in zip(offsets, enc.sequence_ids(i))]
                             for i, offsets in enumerate(enc["offset_mapping"])]
    return enc


def postprocess(examples, features, start_logits, end_logits, c_col: str = "context", n_best: int = 20,
                max_answer_length: int = 30) -> dict[str, str]:
    """{example id: predicted answer text} from the windows' start and end logits (see the module docstring)."""
    windows = collections.defaultdict(list)
    for i, example_id in enumerate(features["example_id"]):
        windows[example_id].append(i)
    offsets_all = features["offset_mapping"]
    answers = {}
    for example in examples:
        best = None
        for i in windows[example["id"]]:
            offsets = offsets_all[i]
            s_logits, e_logits = np.asarray(start_logits[i]), np.asarray(end_logits[i])
            s_top = np.argsort(s_logits)[::-1][:n_best]
            e_top = np.argsort(e_logits)[::-1][:n_best]
            for s in s_top:
                if s >= len(offsets) or offsets[s] is None:
                    continue
                for e in e_top:
                    if e >= len(offsets) or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = float(s_logits[s] + e_logits[e])
                    if best is None or score > best[0]:
                        best = (score, offsets[s][0], offsets[e][1])
        answers[example["id"]] = example[c_col][best[1]:best[2]] if best else ""
    return answers


# ------------------------------------------------------------------------------------------------- data


def check_qa_split(ds, origin: str, q_col: str, c_col: str, a_col: str):
    """Columns present, texts are strings, answers well formed and inside the context; adds `id` if absent."""
    check_columns(ds, origin, {q_col: "--text-column", c_col: "--text-pair-column", a_col: "--label-column"})
    if len(ds) == 0:
        raise DataError(origin, "the split is empty (no records)")
    if "id" not in ds.column_names:
        ds = ds.add_column("id", [str(i) for i in range(len(ds))])
    for row, (q, c, a) in enumerate(zip(ds[q_col], ds[c_col], ds[a_col]), 1):
        for col, v in ((q_col, q), (c_col, c)):
            if not isinstance(v, str) or not v.strip():
                raise DataError(origin, f"the text is {'empty' if not v else repr(v)}", column=col, row=row)
        if (not isinstance(a, dict) or not isinstance(a.get("text"), list)
                or not isinstance(a.get("answer_start"), list) or len(a["text"]) != len(a["answer_start"])):
            raise DataError(origin, f"answers must be {{'text': [...], 'answer_start': [...]}} of equal lengths, "
                                    f"got {a!r}", column=a_col, row=row)
        for text, start in zip(a["text"], a["answer_start"]):
            if not isinstance(start, int) or start < 0 or start + len(text) > len(c):
                raise DataError(origin, f"answer {text!r} at {start} is outside the context ({len(c)} characters)",
                                column=a_col, row=row)
    return ds


def load_qa_data(cfg) -> tuple[dict, dict[str, str], list[str]]:
    raw, origins = load_raw(cfg.data, cfg.test)
    q_col, c_col, a_col = cfg.text_column, cfg.text_pair_column or "context", cfg.label_column
    splits = {name: check_qa_split(ds, origins[name], q_col, c_col, a_col) for name, ds in raw.items()}
    notes = []
    if not any(s.startswith("validation") for s in splits):
        held = splits["train"].train_test_split(test_size=cfg.valid_fraction, seed=cfg.seed)
        splits["train"], splits["validation"] = held["train"], held["test"]
        origins["validation"] = f"{origins['train']} (seeded {cfg.valid_fraction:g} of it, seed {cfg.seed})"
        notes.append(f"no validation split: held out {len(held['test'])} questions of train")
    if any(not a["text"] for a in splits[_first_eval(splits)][a_col]):
        raise DataError(origins[_first_eval(splits)], "questions without answers: SQuAD v1.1 scoring needs at "
                                                      "least one gold answer per question", column=a_col)
    return splits, origins, notes


def _first_eval(splits) -> str:
    names = [s for s in splits if s != "train"]
    return sorted(names, key=lambda s: (not s.startswith("validation"), s != "validation", s))[0]


# ---------------------------------------------------------------------------------------------- trainer


class QATrainer(Trainer):
    """A Trainer whose evaluation post-processes the windows' logits into answers and scores them."""

    def __init__(self, *args, eval_examples=None, c_col="context", a_col="answers", n_best=20,
                 max_answer_length=30, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_examples, self.c_col, self.a_col = eval_examples, c_col, a_col
        self.n_best, self.max_answer_length = n_best, max_answer_length

    def score(self, examples, features, metric_key_prefix: str = "eval") -> tuple[dict, dict]:
        """(metrics, {id: answer}) of the model on `examples` through their windows `features`."""
        t0 = time.time()
        output = self.evaluation_loop(self.get_eval_dataloader(features), description=metric_key_prefix,
                                      prediction_loss_only=False, metric_key_prefix=metric_key_prefix)
        start_logits, end_logits = output.predictions[:2]
        answers = postprocess(examples, features, start_logits, end_logits, self.c_col, self.n_best,
                              self.max_answer_length)
        refs = {ex["id"]: ex[self.a_col]["text"] for ex in examples}
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in squad_scores(answers, refs).items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - t0, 4)
        return metrics, answers

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        metrics, _ = self.score(self.eval_examples, eval_dataset or self.eval_dataset, metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def finetune_qa(cfg) -> dict:
    """`finetune` for task "qa" (see pipeline/evaluation/finetune.py): the same engine, outputs and report."""
    import torch
    from transformers import AutoModelForQuestionAnswering, DataCollatorWithPadding, set_seed

    from .finetune import (FinetuneError, best_epoch, build_trainer, check_deepspeed_config, finish, history,
                           is_main_process, load_model, load_tokenizer, max_length_for, resolve_deepspeed,
                           training_arguments)

    t_start = time.time()
    ds_path = resolve_deepspeed(cfg.deepspeed, torch.cuda.is_available())
    if ds_path:
        check_deepspeed_config(ds_path)
    splits, origins, notes = load_qa_data(cfg)
    say = log.info if is_main_process() else (lambda *a, **k: None)
    for note in notes:
        say("[finetune] %s", note)
    q_col, c_col, a_col = cfg.text_column, cfg.text_pair_column or "context", cfg.label_column
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    if not getattr(tokenizer, "is_fast", False):
        raise FinetuneError(f"{cfg.model}: question answering needs a fast tokenizer (tokenizer.json) for the "
                            "offset mapping")
    model = load_model(AutoModelForQuestionAnswering, cfg.model)
    max_length = max_length_for(cfg.max_length, model, tokenizer)
    if not 0 < cfg.doc_stride < max_length:
        raise FinetuneError(f"doc_stride {cfg.doc_stride} must be below the window length {max_length}")
    train = splits["train"]
    if cfg.max_train_samples:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    train_feats = train.map(lambda b: train_features(b, tokenizer, q_col, c_col, a_col, max_length, cfg.doc_stride),
                            batched=True, remove_columns=train.column_names, desc="windows train")
    eval_names = sorted([s for s in splits if s != "train"],
                        key=lambda s: (not s.startswith("validation"), s != "validation", s))
    examples, features = {}, {}
    for name in eval_names:
        ex = splits[name]
        if cfg.max_eval_samples:
            ex = ex.select(range(min(cfg.max_eval_samples, len(ex))))
        examples[name] = ex
        features[name] = ex.map(lambda b: eval_features(b, tokenizer, q_col, c_col, max_length, cfg.doc_stride),
                                batched=True, remove_columns=ex.column_names, desc=f"windows {name}")
    best = eval_names[0]
    say("[finetune] question answering: train %d questions (%d windows), %s", len(train), len(train_feats),
        ", ".join(f"{n} {len(examples[n])} ({len(features[n])} windows)" for n in eval_names))
    args = training_arguments(cfg, "f1", ds_path, len(train_feats))
    trainer = build_trainer(cfg, QATrainer, model, tokenizer, args, train_feats, features[best], None,
                            DataCollatorWithPadding(tokenizer), best)
    trainer.eval_examples, trainer.c_col, trainer.a_col = examples[best], c_col, a_col
    trainer.n_best, trainer.max_answer_length = cfg.n_best, cfg.max_answer_length
    t_loaded = time.time()
    train_out = trainer.train()
    t_trained = time.time()
    results = {}
    for name in eval_names:
        metrics, answers = trainer.score(examples[name], features[name], "test")
        results[name] = {k[len("test_"):]: v for k, v in metrics.items() if not k.endswith("_runtime")}
        results[name]["questions"] = len(examples[name])
    report = {
        "model": cfg.model,
        "config": {**asdict(cfg), "max_length_used": max_length, "metrics": ["exact_match", "f1"], "metric": "f1"},
        "data": {"kind": "qa", "sizes": {k: len(v) for k, v in splits.items()}, "sources": origins, "notes": notes},
        "engine": {"deepspeed": ds_path, "ranks": args.world_size, "device": args.device.type,
                   "bf16": bool(args.bf16)},
        "best_split": best, "best_checkpoint_metric": trainer.state.best_metric,
        "best_epoch": best_epoch(trainer, "f1"),
        "epochs_run": trainer.state.epoch, "steps": trainer.state.global_step,
        "train_loss": train_out.training_loss, "history": history(trainer), "results": results,
        "timing": {"load_s": round(t_loaded - t_start, 3), "train_s": round(t_trained - t_loaded, 3),
                   "total_s": round(time.time() - t_start, 3),
                   "train_examples_per_s": round(train_out.metrics.get("train_samples_per_second", 0.0), 1)},
    }
    return finish(cfg, trainer, tokenizer, report)
