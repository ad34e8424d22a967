"""Fine-tuning on transformers' Trainer (pipeline/evaluation/finetune.py, launch/finetune.py) with a tiny student
on small separable tasks: a single-text task, a pair task, a regression task; the report against scikit-learn
and scipy, the saved classifier in `pipeline("text-classification")`, TensorBoard, the log-file progress lines,
and bad input as exit 2."""
from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.evaluation.finetune import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parents[2]
POS = ["great", "excellent", "wonderful", "fantastic", "superb", "delightful", "brilliant", "lovely"]
NEG = ["terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "bad", "poor"]
NOUNS = ["movie", "book", "meal", "concert", "hotel", "game", "show", "trip", "album", "play"]
TEMPLATES = ["the {n} was {a}", "i thought the {n} was {a} and the {m} too", "what a {a} {n}",
             "honestly the {n} felt {a} from start to end", "{a} {n}, {a} {m}"]


def sentiment_rows(n: int, seed: int, labels=("positive", "negative")) -> list[dict]:
    """Sentences whose label is decided by one clearly positive or negative adjective."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        positive = i % 2 == 0
        text = rng.choice(TEMPLATES).format(n=rng.choice(NOUNS), m=rng.choice(NOUNS),
                                            a=rng.choice(POS if positive else NEG))
        out.append({"text": text, "label": labels[0] if positive else labels[1]})
    return out


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, list(rows[0]) if rows else ["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_student(folder: Path, wordpiece_dir: str, arch: str, dropout: float = 0.1) -> str:
    """A 2-layer, hidden-32 masked LM with the real bert-base-uncased WordPiece tokenizer, saved like an export."""
    from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, DistilBertConfig,
                              DistilBertForMaskedLM)

    tok = AutoTokenizer.from_pretrained(wordpiece_dir)
    torch.manual_seed(0)
    if arch == "distilbert":
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2,
                                                       hidden_dim=64, max_position_embeddings=64,
                                                       dropout=dropout, attention_dropout=dropout,
                                                       seq_classif_dropout=dropout, pad_token_id=tok.pad_token_id))
    else:
        model = BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                           pad_token_id=tok.pad_token_id))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def distil_student(tmp_path_factory, wordpiece_dir) -> str:
    return tiny_student(tmp_path_factory.mktemp("distil_student"), wordpiece_dir, "distilbert")


@pytest.fixture(scope="module")
def bert_student(tmp_path_factory, wordpiece_dir) -> str:
    return tiny_student(tmp_path_factory.mktemp("bert_student"), wordpiece_dir, "bert")
def pair_rows(n: int, seed: int) -> list[dict]:
    """Pairs whose label is the sentiment of the second text only: the first is a neutral distractor, so a model
    that did not read the pair column would stay at chance."""
    rng = random.Random(seed)
    out = []
    for r in sentiment_rows(n, seed):
        out.append({"sentence1": f"the {rng.choice(NOUNS)} arrived on {rng.choice(['monday', 'friday'])}",
                    "sentence2": r["text"], "label": r["label"]})
    return out


def score_rows(n: int, seed: int) -> list[dict]:
    """Regression: four adjectives, the label is the number of positive ones (0-4) plus a fraction."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(0, 4)
        words = rng.sample(POS, k) + rng.sample(NEG, 4 - k)
        rng.shuffle(words)
        out.append({"text": "the " + rng.choice(NOUNS) + " was " + " ".join(words), "label": k + 0.25})
    return out


def fast_config(model: str, data: str, output: Path, **kw) -> FinetuneConfig:
    # A randomly initialised 32-wide model needs a far larger learning rate than a pretrained one.
    settings = dict(epochs=6, lr=3e-3, batch_size=16, max_length=32, patience=3, seed=0, tqdm=False,
                    progress_every_s=0.0)
    return FinetuneConfig(model=model, data=data, output=str(output), **{**settings, **kw})


def predict(folder, texts, pairs=None):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    enc = tok(texts, pairs, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


@pytest.fixture(scope="module")
def csv_folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sentiment_csv")
    write_csv(d / "train.csv", sentiment_rows(160, seed=0))
    write_csv(d / "validation.csv", sentiment_rows(20, seed=2))
    write_csv(d / "test.csv", sentiment_rows(40, seed=1))
    return d


@pytest.fixture(scope="module")
def csv_run(distil_student, csv_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("csv_run") / "out"
    return out, finetune(fast_config(distil_student, str(csv_folder), out))


def test_single_text_task_learns_and_reports_like_scikit_learn(csv_run, csv_folder):
    import sklearn.metrics

    out, report = csv_run
    test = report["results"]["test"]
    assert test["accuracy"] >= 0.9, report["history"]
    assert report["data"]["sizes"] == {"train": 160, "validation": 20, "test": 40}
    assert report["best_split"] == "validation" and report["best_epoch"] is not None
    saved = json.loads((out / "report.json").read_text())
    assert saved["results"]["test"]["classes"] == test["classes"] and saved["config"]["lr"] == 3e-3
    assert not (out / "checkpoints").exists()  # removed once the best model is saved
    # the report's numbers are those of the saved model's predictions, as scikit-learn computes them
    rows = list(csv.DictReader(open(csv_folder / "test.csv")))
    pred = predict(out, [r["text"] for r in rows]).argmax(-1).tolist()
    names = ["negative", "positive"]
    truth = [names.index(r["label"]) for r in rows]
    sk = sklearn.metrics.classification_report(truth, pred, labels=[0, 1], target_names=names, output_dict=True,
                                               zero_division=0)
    for key in ("negative", "positive", "macro avg", "weighted avg"):
        assert test["classes"][key] == pytest.approx(sk[key]), key
    assert test["accuracy"] == pytest.approx(sk["accuracy"])
    assert test["macro_f1"] == pytest.approx(sklearn.metrics.f1_score(truth, pred, average="macro"))
    assert test["confusion_matrix"] == {"labels": names,
                                        "matrix": sklearn.metrics.confusion_matrix(truth, pred).tolist()}


def test_saved_classifier_loads_in_pipeline_with_label_names(csv_run):
    from transformers import AutoConfig, pipeline

    out, _ = csv_run
    config = AutoConfig.from_pretrained(out)
    assert config.id2label == {0: "negative", 1: "positive"} and config.label2id == {"negative": 0, "positive": 1}
    clf = pipeline("text-classification", model=str(out), device="cpu")
    preds = clf(["the movie was wonderful", "what a terrible book"])
    assert [p["label"] for p in preds] == ["positive", "negative"]


def test_tensorboard_scalars(csv_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, report = csv_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/accuracy", "eval/macro_f1", "eval/loss"} <= tags, tags
    assert len(acc.Scalars("eval/accuracy")) == len(report["history"])


def test_pair_task_reads_the_second_text(distil_student, tmp_path):
    d = tmp_path / "pairs"
    d.mkdir()
    write_jsonl(d / "train.jsonl", pair_rows(160, seed=0))
    write_jsonl(d / "validation.jsonl", pair_rows(40, seed=1))
    report = finetune(fast_config(distil_student, str(d), tmp_path / "out", text_column="sentence1",
                                  text_pair_column="sentence2", metrics=("f1", "accuracy")))
    val = report["results"]["validation"]
    assert val["accuracy"] >= 0.9 and val["f1"] >= 0.9, report["history"]
    assert report["data"]["text_columns"] == ["sentence1", "sentence2"] and report["config"]["metric"] == "f1"


def test_regression_task_reports_pearson_and_spearman_like_scipy(distil_student, tmp_path):
    import scipy.stats

    d = tmp_path / "scores"
    d.mkdir()
    write_csv(d / "train.csv", score_rows(200, seed=0))
    valid = score_rows(40, seed=1)
    write_csv(d / "validation.csv", valid)
    report = finetune(fast_config(distil_student, str(d), tmp_path / "out", epochs=8))
    assert report["data"]["kind"] == "regression" and report["config"]["metrics"] == ["pearson", "spearman"]
    val = report["results"]["validation"]
    assert val["pearson"] > 0.5, report["history"]
    pred = predict(tmp_path / "out", [r["text"] for r in valid]).reshape(-1).numpy()
    gold = [r["label"] for r in valid]
    assert val["pearson"] == pytest.approx(scipy.stats.pearsonr(pred, gold)[0], abs=1e-5)
    assert val["spearman"] == pytest.approx(scipy.stats.spearmanr(pred, gold)[0], abs=1e-5)
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(tmp_path / "out")
    assert cfg.num_labels == 1 and cfg.problem_type == "regression"


def run_launcher(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "finetune.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_launcher_logs_progress_lines_and_holds_out_validation(bert_student, tmp_path):
    """JSON Lines with int labels and no validation split, stdout a file (as in a batch job): periodic progress
    lines with step, loss, examples/s and ETA; no tqdm carriage returns."""
    data = write_jsonl(tmp_path / "reviews.jsonl", sentiment_rows(120, seed=3, labels=(1, 0)))
    out = tmp_path / "out"
    proc = run_launcher("--model", bert_student, "--data", data, "--output", out, "--epochs", 4, "--lr", 3e-3,
                        "--batch-size", 16, "--max-length", 32, "--valid-fraction", 0.2, "--progress-every", 0,
                        "--seed", 0, "--patience", 0)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no validation split: held out 24 of 120 train records" in proc.stdout
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[finetune] step ")]
    assert len(lines) == 4 * 6 and all(" loss " in ln and " ex/s ETA " in ln for ln in lines), lines
    assert lines[-1].startswith("[finetune] step 24/24 (100%) epoch 4.00 loss ")
    assert "[finetune] eval epoch 4.00 step 24: validation loss " in proc.stdout
    assert "\r" not in proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["sizes"] == {"train": 96, "validation": 24} and report["steps"] == 24
    assert len(report["history"]) == 4 and report["config"]["patience"] == 0


def test_launcher_bad_input_exits_2_with_one_line(distil_student, tmp_path, monkeypatch, capsys):
    """In-process (main(argv)) to spare interpreter starts: each bad input is one line naming file and column."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_finetune", ROOT / "launch" / "finetune.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def run(*args):
        code = launcher.main(["--model", distil_student, "--output", str(tmp_path / "o"), *map(str, args)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
        return err

    assert "hf:stanfordnlp/imdb: cannot load Hugging Face dataset" in run("--data", "hf:stanfordnlp/imdb")
    rows = sentiment_rows(10, seed=5)
    single = write_csv(tmp_path / "single.csv", rows)
    err = run("--data", single, "--text-pair-column", "sentence2")
    assert f"{single}: column 'sentence2': no such column" in err and "drop --text-pair-column" in err
    assert f"{single}: column 'review': no such column" in run("--data", single, "--text-column", "review")
    err = run("--data", single, "--task", "regression")
    assert "column 'label' row 1: the label 'positive' is not a number" in err
    (tmp_path / "empty.csv").write_text("text,label\n")
    assert "empty.csv: the split is empty (no records)" in run("--data", tmp_path / "empty.csv")
    assert "metrics ['pearson'] do not apply to a classification task" in run("--data", single, "--metrics",
                                                                               "pearson")
    assert "cannot load a tokenizer" in launcher_main_bad_model(launcher, tmp_path, single, capsys)
    assert not (tmp_path / "o" / "report.json").exists()


def launcher_main_bad_model(launcher, tmp_path, data, capsys) -> str:
    assert launcher.main(["--model", str(tmp_path / "no_model"), "--data", str(data), "--output",
                          str(tmp_path / "o")]) == 2
    return capsys.readouterr().err
