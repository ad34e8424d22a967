"""Fine-tuning a tiny student on a small separable sentiment task: accuracy, saved classifier, report, early
stopping, the CLI, and clear errors."""
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

from pipeline.evaluation.classify_data import ClassifyDataError
from pipeline.evaluation.finetune import FinetuneConfig, FinetuneError, finetune

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


def tiny_student(folder: Path, wordpiece_dir: str, arch: str) -> str:
    """A 2-layer, hidden-32 masked LM with the real bert-base-uncased WordPiece tokenizer, saved like an export."""
    from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, DistilBertConfig,
                              DistilBertForMaskedLM)

    tok = AutoTokenizer.from_pretrained(wordpiece_dir)
    torch.manual_seed(0)
    if arch == "distilbert":
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2,
                                                       hidden_dim=64, max_position_embeddings=64,
                                                       pad_token_id=tok.pad_token_id))
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


@pytest.fixture(scope="module")
def csv_folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sentiment_csv")
    write_csv(d / "train.csv", sentiment_rows(200, seed=0))
    write_csv(d / "test.csv", sentiment_rows(60, seed=1))
    return d


def fast_config(model: str, data: str, output: Path, **kw) -> FinetuneConfig:
    # A randomly initialised 32-wide model needs a far larger learning rate than a pretrained one.
    settings = dict(epochs=6, lr=3e-3, batch_size=16, max_length=32, patience=3, progress=False)
    return FinetuneConfig(model=model, data=data, output=str(output), **{**settings, **kw})


@pytest.fixture(scope="module")
def csv_run(distil_student, csv_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("csv_run") / "out"
    return out, finetune(fast_config(distil_student, str(csv_folder), out))


def test_reaches_high_accuracy_on_test(csv_run):
    out, report = csv_run
    assert report["report_split"] == "test"
    assert report["test"]["accuracy"] >= 0.9, report["history"]
    assert set(report["test"]) >= {"negative", "positive", "accuracy", "macro avg", "weighted avg"}
    assert report["test"]["macro avg"]["support"] == 60
    assert report["data"]["sizes"] == {"train": 180, "validation": 20, "test": 60}
    saved = json.loads((out / "report.json").read_text())
    assert saved["test"] == report["test"] and saved["validation"]["accuracy"] >= 0.9
    assert saved["config"]["lr"] == 3e-3 and saved["timing"]["total_s"] > 0
    best = max(saved["history"], key=lambda h: (h["valid_accuracy"], -h["valid_loss"]))
    assert saved["best_epoch"] == best["epoch"] and saved["history"][best["epoch"] - 1]["best"]


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
    assert {"finetune/train_loss", "finetune/valid_accuracy", "finetune/valid_macro_f1"} <= tags
    assert len(acc.Scalars("finetune/valid_accuracy")) == report["epochs_run"]


@pytest.mark.parametrize("scores,epochs_run,best_epoch", [
    # accuracy 0.5, 0.9, 0.8, 0.7 with patience 2: stop after epoch 4, keep epoch 2
    ([(0.5, 0.7), (0.9, 0.5), (0.8, 0.4), (0.7, 0.3)], 4, 2),
    # ties on accuracy: the lower validation loss wins (epoch 2), a tie with a higher loss is no improvement
    ([(1.0, 0.6), (1.0, 0.4), (1.0, 0.5), (0.9, 0.3)], 4, 2),
])
def test_early_stopping_keeps_the_best_weights(distil_student, tmp_path, monkeypatch, scores, epochs_run,
                                               best_epoch):
    import pipeline.evaluation.finetune as ft
    from transformers import AutoModelForSequenceClassification

    scores, seen = iter(scores), []
    real_evaluate = ft.evaluate

    def fake_evaluate(model, *args):
        report, loss = real_evaluate(model, *args)
        seen.append(model.classifier.weight.detach().clone())
        fake = next(scores, None)
        if fake is None:  # the final evaluations (on the restored best weights) are left as computed
            return report, loss
        report["accuracy"] = fake[0]
        return report, fake[1]

    monkeypatch.setattr(ft, "evaluate", fake_evaluate)
    data = write_csv(tmp_path / "small.csv", sentiment_rows(40, seed=4))  # the scores are faked: keep it small
    report = finetune(fast_config(distil_student, str(data), tmp_path / "out", epochs=10, patience=2))
    assert report["epochs_run"] == epochs_run and report["best_epoch"] == best_epoch
    assert [h["best"] for h in report["history"]] == [e in (1, best_epoch) for e in range(1, epochs_run + 1)]
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(saved.classifier.weight, seen[best_epoch - 1])
    torch.testing.assert_close(seen[epochs_run], seen[best_epoch - 1])  # final report: restored best weights


def test_bad_inputs_are_clear_errors(distil_student, csv_folder, tmp_path):
    bad = write_csv(tmp_path / "nolabel.csv", [{"text": "a", "sentiment": "positive"}])
    with pytest.raises(ClassifyDataError, match=r"nolabel.csv: no label column 'label'.*\['sentiment', 'text'\]"):
        finetune(fast_config(distil_student, str(bad), tmp_path / "o1"))
    unknown = write_csv(tmp_path / "test.csv", sentiment_rows(3, seed=2) + [{"text": "meh", "label": "neutral"}])
    with pytest.raises(ClassifyDataError, match=r"line 5: label 'neutral' in the test split"):
        finetune(fast_config(distil_student, str(csv_folder / "train.csv"), tmp_path / "o2", test=str(unknown)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ClassifyDataError, match="the train split is empty"):
        finetune(fast_config(distil_student, str(empty), tmp_path / "o3"))
    with pytest.raises(FinetuneError, match="cannot load a tokenizer"):
        finetune(fast_config(str(tmp_path / "no_model"), str(csv_folder), tmp_path / "o4"))
    with pytest.raises(FinetuneError, match="patience must be >= 0"):
        finetune(fast_config(distil_student, str(csv_folder), tmp_path / "o5", patience=-1))
    assert not (tmp_path / "o1" / "report.json").exists()


def run_launcher(*args, timeout=240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "launch" / "finetune.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_launcher_on_jsonl_with_a_bert_student(bert_student, tmp_path):
    """JSON Lines with int labels and no test split: validation is held out of train and reported on."""
    data = write_jsonl(tmp_path / "reviews.jsonl", sentiment_rows(200, seed=3, labels=(1, 0)))
    out = tmp_path / "out"
    proc = run_launcher("--model", bert_student, "--data", data, "--output", out, "--epochs", 6, "--lr", 3e-3,
                        "--batch-size", 16, "--max-length", 32, "--patience", 3, "--valid-fraction", 0.2,
                        "--tensorboard-dir", tmp_path / "tb")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no test split" in proc.stdout and "validation (best epoch" in proc.stdout
    assert "macro avg" in proc.stdout and "weighted avg" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["report_split"] == "validation" and report["test"] is None
    assert report["validation"]["accuracy"] >= 0.9, report["history"]
    assert report["data"]["sizes"] == {"train": 160, "validation": 40}
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    from transformers import pipeline
    clf = pipeline("text-classification", model=str(out), device="cpu")
    assert clf("the concert was brilliant")[0]["label"] == "1"


def test_launcher_errors_exit_2_with_one_line(distil_student, tmp_path, monkeypatch, capsys):
    """Run in-process (main(argv)) to spare a second interpreter start; the subprocess run above covers the rest."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_finetune", ROOT / "launch" / "finetune.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert launcher.main(["--model", distil_student, "--data", "hf:stanfordnlp/imdb", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: hf:stanfordnlp/imdb: cannot load Hugging Face dataset") and "Traceback" not in err
    data = write_csv(tmp_path / "one_class.csv", sentiment_rows(10, seed=5, labels=("positive", "positive")))
    assert launcher.main(["--model", distil_student, "--data", str(data), "--output", str(tmp_path / "o")]) == 2
    assert "single class ['positive']" in capsys.readouterr().err
