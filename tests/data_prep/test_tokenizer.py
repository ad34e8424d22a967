"""The data-preparation tokenizer: its picklable encoder equals the loaded tokenizer, the workers get it without
transformers, a worker that cannot rebuild it stops the run, and the identity cache gives the same tokenizer
without importing transformers."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipeline.data_prep.tokenizer import flat_ids, load_prep_tokenizer
from pipeline.tokenization import PROBES, load_tokenizer
from tests.conftest import ROOT

TEXTS = ["Hello, World! naïve CAFÉ", "日本語 emoji 🙂 [MASK] don't", "unbelievably  spaced\ttext\n"]


def stop_lowercasing(tokenizer_json) -> None:
    """A tokenizer.json whose normaliser keeps the case: another tokenizer with the same vocabulary."""
    with open(tokenizer_json) as f:
        spec = json.load(f)
    spec["normalizer"]["lowercase"] = False
    with open(tokenizer_json, "w") as f:
        json.dump(spec, f)


def edit_json(path, **changes) -> None:
    with open(path) as f:
        obj = json.load(f)
    obj.update(changes)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_encoder_equals_the_transformers_tokenizer_and_survives_pickling(wordpiece_dir, sentencepiece_model):
    """What the workers get (the encoder, pickled) gives the ids of the loaded tokenizer's own call."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(wordpiece_dir)
    tok = load_tokenizer(wordpiece_dir)
    assert tok.encoder.kind == "fast"
    want = hf(TEXTS + list(PROBES), add_special_tokens=False)["input_ids"]
    assert tok.encode_batch(TEXTS + list(PROBES)) == want
    assert pickle.loads(pickle.dumps(tok.encoder))(TEXTS) == want[:len(TEXTS)]
    sp = load_tokenizer(sentencepiece_model)
    assert pickle.loads(pickle.dumps(sp.encoder))(TEXTS) == sp.encode_batch(TEXTS)
    flat, lengths = flat_ids(want, np.uint16)
    assert flat.dtype == np.uint16 and flat.tolist() == [i for ids in want for i in ids]
    assert lengths.tolist() == [len(ids) for ids in want]
    assert flat_ids([], np.uint16)[0].size == 0


def test_prepare_workers_import_no_transformers(tmp_path, wordpiece_dir, sample_texts):
    """The whole command with two workers: the workers get the encoder, not the tokenizer, so they import no
    transformers (nor torch); with a warm identity cache the main process does not either."""
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(sample_texts[:40]) + "\n", encoding="utf-8")
    env = {**os.environ, "PIPELINE_CACHE_DIR": str(tmp_path / "cache")}
    imports = []
    for run in ("cold", "warm"):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", str(ROOT / "launch" / "prepare_data.py"), "--input", str(src),
             "--tokenizer", wordpiece_dir, "--output", str(tmp_path / run), "--workers", "2", "--unit-mb", "0.02",
             "--no-progress"], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        imports.append([line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                        if line.startswith("import time:")])
    cold, warm = imports
    assert cold.count("pipeline.data_prep.prepare") == 3  # the main process and two spawned workers
    assert cold.count("tokenizers") == 3 and cold.count("transformers") == 1  # transformers: the main process
    assert "transformers" not in warm and "torch" not in warm


def test_worker_that_cannot_rebuild_the_tokenizer_stops_the_run(tmp_path, wordpiece_dir, sample_texts):
    """The encoder is unpickled on a worker's first unit (a Pool initializer that raised would be restarted
    forever: a hang); when that fails the run stops with the reason, and no unit is written."""
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(sample_texts[:40]) + "\n", encoding="utf-8")
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import pipeline.data_prep.prepare as P
from pipeline.data_prep.prepare import PrepareConfig, PrepareError, prepare

class OnlyHere:  # defined in this script's __main__, which a spawned worker cannot import
    pass

real = P.load_prep_tokenizer
def load(*a, **kw):
    tok = real(*a, **kw)
    tok.encoder.impl = OnlyHere()
    return tok
P.load_prep_tokenizer = load
try:
    prepare(PrepareConfig(inputs=[{str(src)!r}], output={str(tmp_path / 'out')!r}, tokenizer={wordpiece_dir!r},
                          workers=2, unit_mb=0.02, progress=False))
except PrepareError as e:
    print("PrepareError:", e)
    sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
    assert "a worker process could not rebuild the tokenizer" in proc.stdout and "OnlyHere" in proc.stdout
    units = tmp_path / "out" / "units"
    assert not units.exists() or not os.listdir(units)


# -- identity cache -------------------------------------------------------------------------------------------
def cache_entries(cache) -> list:
    d = cache / "tokenizers"
    return sorted(d.iterdir()) if d.exists() else []


def test_identity_cache_hit_is_the_same_tokenizer(tmp_path, wordpiece_dir, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    cold = load_prep_tokenizer(wordpiece_dir)
    assert not cold.from_cache and len(cache_entries(tmp_path / "cache")) == 1
    warm = load_prep_tokenizer(wordpiece_dir)
    assert warm.from_cache
    assert warm.info().to_json() == cold.info().to_json()
    assert warm.encoder.impl.to_str() == cold.encoder.impl.to_str()
    assert warm.vocab_size == cold.vocab_size and warm.dtype == cold.dtype
    assert warm.encoder(TEXTS) == cold.encoder(TEXTS)


def test_identity_cache_hit_imports_no_transformers(tmp_path, wordpiece_dir):
    """What the cache is for: the driver's 2 s of transformers import while the workers wait."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            f"from pipeline.data_prep.tokenizer import load_prep_tokenizer\n"
            f"t = load_prep_tokenizer({wordpiece_dir!r})\n"
            f"print(t.from_cache, 'transformers' in sys.modules)")
    env = {**os.environ, "PIPELINE_CACHE_DIR": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
            for _ in range(2)]
    assert [r.stdout.split() for r in runs] == [["False", "True"], ["True", "False"]], \
        [r.stderr[-2000:] for r in runs]


@pytest.mark.parametrize("change", ["tokenizer_file", "new_file"])
def test_identity_cache_key_covers_the_folder(tmp_path, wordpiece_dir, monkeypatch, change):
    """Any change to the tokenizer's files (here: uncased -> cased, or a file added) is a miss and a new
    entry, never the old identity."""
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "tok"
    shutil.copytree(wordpiece_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx"))
    before = load_prep_tokenizer(str(folder)).info()
    if change == "tokenizer_file":
        stop_lowercasing(folder / "tokenizer.json")
        edit_json(folder / "tokenizer_config.json", do_lower_case=False)
    else:
        (folder / "README.md").write_text("notes\n")
    after = load_prep_tokenizer(str(folder))
    assert not after.from_cache and len(cache_entries(tmp_path / "cache")) == 2
    if change == "tokenizer_file":
        assert after.info().fingerprint != before.fingerprint
        assert after.encoder(["Hello"]) != load_tokenizer(wordpiece_dir).encode_batch(["Hello"])
    else:
        assert after.info().to_json() == before.to_json()
    assert load_prep_tokenizer(str(folder)).info().to_json() == after.info().to_json()


@pytest.mark.parametrize("damage", ["truncated", "wrong_probes", "unwritable"])
def test_damaged_or_unusable_cache_falls_back_to_the_real_tokenizer(tmp_path, wordpiece_dir, monkeypatch, damage):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(cache))
    real = load_prep_tokenizer(wordpiece_dir)
    [entry] = cache_entries(cache)
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:1000])
    elif damage == "wrong_probes":
        obj = json.loads(entry.read_text())
        obj["probe_ids"][0][0] += 1
        entry.write_text(json.dumps(obj))
    else:  # the cache folder cannot be made: a file is where it would go
        (tmp_path / "file").write_text("not a folder")
        monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "file" / "cache"))
    again = load_prep_tokenizer(wordpiece_dir)
    assert not again.from_cache  # the real one, not the damaged entry
    assert again.info().to_json() == real.info().to_json()
    if damage != "unwritable":
        assert load_prep_tokenizer(wordpiece_dir).from_cache  # the entry was rewritten


def test_prepare_with_a_warm_cache_writes_the_same_dataset(tmp_path, wordpiece_dir, sample_texts, monkeypatch):
    from pipeline.data_prep.prepare import PrepareConfig, prepare

    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(sample_texts[:60]) + "\n", encoding="utf-8")
    outs = []
    for run in ("cold", "warm"):
        prepare(PrepareConfig(inputs=[str(src)], output=str(tmp_path / run), tokenizer=wordpiece_dir, workers=2,
                              unit_mb=0.02, progress=False, command=["same"]))
        outs.append(tmp_path / run)
    assert len(cache_entries(tmp_path / "cache")) == 1
    m = [json.loads((o / "manifest.json").read_text()) for o in outs]
    assert m[0]["tokenizer"] == m[1]["tokenizer"] and m[0]["plan_id"] == m[1]["plan_id"]
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.bin"))
    assert files and all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files)
