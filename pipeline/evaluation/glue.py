"""The GLUE suite as the DistilBERT paper reports it: each task fine-tuned with several seeds, the median per task,
a table laid out like the paper's Table 1 with its rows beside ours, and the macro score.

Tasks, their columns and scores (GLUE's definitions):

| task | texts | labels | score |
| --- | --- | --- | --- |
| CoLA | sentence | 2 classes | Matthews correlation |
| SST-2 | sentence | 2 | accuracy |
| MRPC | sentence1, sentence2 | 2 | mean of F1 and accuracy |
| QQP | question1, question2 | 2 | mean of F1 and accuracy |
| STS-B | sentence1, sentence2 | score 0-5 (regression) | mean of Pearson and Spearman |
| MNLI | premise, hypothesis | 3 | mean of matched and mismatched accuracy |
| QNLI | question, sentence | 2 | accuracy |
| RTE | sentence1, sentence2 | 2 | accuracy |
| WNLI | sentence1, sentence2 | 2 | accuracy |

A task's score is the mean of its metrics (GLUE's convention for the tasks with two), in percent; the macro
score is the mean of the task scores. Every metric is also reported on its own. The median over seeds is taken
per metric and per task score.

`PAPER` holds the rows of Table 1 of Sanh et al., "DistilBERT, a distilled version of BERT: smaller, faster,
cheaper and lighter" (arXiv:1910.01108): GLUE dev sets, medians of 5 runs. The printed BERT-base score (79.5)
is the paper's; the mean of its nine cells is 79.7.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class GlueTask:
    name: str  # the hub config name (nyu-mll/glue) and the folder name under a local data root
    title: str  # the paper's column title
    text: str
    pair: str | None
    kind: str  # classification or regression
    metrics: tuple[str, ...]  # reported by fine-tuning; the first picks the best epoch
    # (split, metric) pairs averaged into the task score
    score_parts: tuple[tuple[str, str], ...]


def _parts(split: str, *metrics: str) -> tuple[tuple[str, str], ...]:
    return tuple((split, m) for m in metrics)


TASKS = {t.name: t for t in [
    GlueTask("cola", "CoLA", "sentence", None, "classification", ("mcc", "accuracy"), _parts("validation", "mcc")),
    GlueTask("mnli", "MNLI", "premise", "hypothesis", "classification", ("accuracy",),
             (("validation_matched", "accuracy"), ("validation_mismatched", "accuracy"))),
    GlueTask("mrpc", "MRPC", "sentence1", "sentence2", "classification", ("f1", "accuracy"),
             _parts("validation", "f1", "accuracy")),
    GlueTask("qnli", "QNLI", "question", "sentence", "classification", ("accuracy",),
             _parts("validation", "accuracy")),
    GlueTask("qqp", "QQP", "question1", "question2", "classification", ("f1", "accuracy"),
             _parts("validation", "f1", "accuracy")),
    GlueTask("rte", "RTE", "sentence1", "sentence2", "classification", ("accuracy",),
             _parts("validation", "accuracy")),
    GlueTask("sst2", "SST-2", "sentence", None, "classification", ("accuracy",), _parts("validation", "accuracy")),
    GlueTask("stsb", "STS-B", "sentence1", "sentence2", "regression", ("pearson", "spearman"),
             _parts("validation", "pearson", "spearman")),
    GlueTask("wnli", "WNLI", "sentence1", "sentence2", "classification", ("accuracy",),
             _parts("validation", "accuracy")),
]}
ORDER = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")  # the paper's column order
HUB_NAME = "nyu-mll/glue"

# Table 1 of arXiv:1910.01108 (GLUE dev; BERT-base and DistilBERT: medians of 5 seeds).
PAPER = {
    "ELMo": {"score": 68.7, "cola": 44.1, "mnli": 68.6, "mrpc": 76.6, "qnli": 71.1, "qqp": 86.2, "rte": 53.4,
             "sst2": 91.5, "stsb": 70.4, "wnli": 56.3},
    "BERT-base": {"score": 79.5, "cola": 56.3, "mnli": 86.7, "mrpc": 88.6, "qnli": 91.8, "qqp": 89.6, "rte": 69.3,
                  "sst2": 92.7, "stsb": 89.0, "wnli": 53.5},
    "DistilBERT": {"score": 77.0, "cola": 51.3, "mnli": 82.2, "mrpc": 87.5, "qnli": 89.2, "qqp": 88.5, "rte": 59.9,
                   "sst2": 91.3, "stsb": 86.9, "wnli": 56.3},
}

# Fine-tuning defaults of the suite: transformers' GLUE example settings (max length 128, batch 32, 3 epochs,
# linear decay, no warmup) with its default learning rate, and the paper's median of 5 seeds.
DEFAULTS = {"lr": 5e-5, "batch_size": 32, "epochs": 3.0, "max_length": 128, "warmup_ratio": 0.0,
            "weight_decay": 0.0, "seeds": (42, 43, 44, 45, 46)}


class GlueError(ValueError):
    """A bad task list or result set; the message says what to change."""


def parse_tasks(spec: str) -> list[str]:
    """"all" or a comma-separated list of task names, in the paper's order."""
    if spec.strip().lower() == "all":
        return list(ORDER)
    names = [s.strip().lower().replace("-", "") for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise GlueError(f"unknown GLUE task(s) {unknown or spec!r}; choose from {', '.join(ORDER)} or 'all'")
    return [n for n in ORDER if n in names]


def task_score(task: GlueTask, results: dict) -> float:
    """The task's score in percent from one run's report results ({split: {metric: value}})."""
    values = []
    for split, metric in task.score_parts:
        if split not in results or metric not in results[split]:
            raise GlueError(f"{task.name}: the run has no {metric} on {split} (splits: {sorted(results)})")
        values.append(results[split][metric])
    return 100.0 * sum(values) / len(values)


def summarize(task: GlueTask, runs: list[dict]) -> dict:
    """The median over seeds of the task score and of every (split, metric), with the per-seed values.
    `runs`: [{"seed": s, "results": report["results"], "seconds": t}, ...]."""
    if not runs:
        raise GlueError(f"{task.name}: no finished run")
    scores = [task_score(task, r["results"]) for r in runs]
    metrics = {}
    for split in sorted({s for r in runs for s in r["results"]}):
        for metric in task.metrics:
            vals = [100.0 * r["results"][split][metric] for r in runs if metric in r["results"].get(split, {})]
            if vals:
                metrics[f"{split}/{metric}"] = statistics.median(vals)
    return {"task": task.name, "score": statistics.median(scores), "metrics": metrics,
            "seeds": [r["seed"] for r in runs], "scores": scores,
            "seconds": sum(r.get("seconds", 0.0) for r in runs)}


def macro_score(summaries: dict[str, dict]) -> float:
    return statistics.fmean(s["score"] for s in summaries.values())


def table(summaries: dict[str, dict], ours: str = "this model") -> str:
    """Markdown table laid out like the paper's Table 1: the paper's rows, then ours."""
    head = "| model | score | " + " | ".join(TASKS[t].title for t in ORDER) + " |"
    rule = "| --- | ---: | " + " | ".join("---:" for _ in ORDER) + " |"
    lines = [head, rule]
    for name, row in PAPER.items():
        lines.append(f"| {name} (paper) | {row['score']:.1f} | " + " | ".join(f"{row[t]:.1f}" for t in ORDER) + " |")
    cells = [f"{summaries[t]['score']:.1f}" if t in summaries else "-" for t in ORDER]
    partial = "" if len(summaries) == len(ORDER) else f" ({len(summaries)} of {len(ORDER)} tasks)"
    score = f"{macro_score(summaries):.1f}{partial}" if summaries else "-"
    lines.append(f"| {ours} | {score} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_ratio(summaries: dict[str, dict], row: str = "BERT-base") -> float | None:
    """Our macro score over the paper row's macro score on the same tasks (the paper's "97% of BERT")."""
    if not summaries:
        return None
    ref = statistics.fmean(PAPER[row][t] for t in summaries)
    return macro_score(summaries) / ref
