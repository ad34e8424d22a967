"""Loading tokenizers without AutoTokenizer (which imports torch): the same tokenizer as AutoTokenizer's,
for every folder the direct path takes, and AutoTokenizer for every other; workers check that they
tokenize like the main process, and a worker that cannot build its tokenizer stops the run."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from pipeline.data_prep import tokenizer as tokmod
from pipeline.data_prep.tokenizer import (_PROBES, BackendEncoder, CachedTokenizer, TextTokenizer, TokenizerLoadError,
                                          load_prep_tokenizer, load_tokenizer)
from tests.conftest import ROOT

TEXTS = ["Hello, World! naïve CAFÉ", "日本語 emoji 🙂 [MASK] don't", "unbelievably  spaced\ttext\n"]


def auto_tokenizer(folder: str, monkeypatch):
    """load_tokenizer as it was: through AutoTokenizer."""
    with monkeypatch.context() as m:
        m.setattr(tokmod, "_direct_class", lambda folder: None)
        return load_tokenizer(folder)


def assert_same_tokenizer(a, b) -> None:
    assert type(a._hf) is type(b._hf)
    assert a.info().to_json() == b.info().to_json()
    assert a.vocab_size == b.vocab_size and a.dtype == b.dtype
    assert a.vocab() == b.vocab() and a.special_ids() == b.special_ids()
    assert a.encode_batch(TEXTS) == b.encode_batch(TEXTS)
    ids = a.encode(TEXTS[0] + " " + TEXTS[1])
    assert a.decode(ids) == b.decode(ids)
    assert a.worker_spec() == b.worker_spec()


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
    for k, v in changes.items():
        if v is None:
            obj.pop(k, None)
        else:
            obj[k] = v
    with open(path, "w") as f:
        json.dump(obj, f)


def test_real_wordpiece_folder_loads_directly_and_equals_autotokenizer(wordpiece_dir, monkeypatch):
    assert tokmod._direct_class(wordpiece_dir).__name__ == "BertTokenizer"
    assert_same_tokenizer(load_tokenizer(wordpiece_dir), auto_tokenizer(wordpiece_dir, monkeypatch))


@pytest.mark.parametrize("variant", [
    "BertTokenizerFast", "DistilBertTokenizer", "DistilBertTokenizerFast", "PreTrainedTokenizerFast",
    "TokenizersBackend", "no config.json", "distilbert config", "tokenizer.json not lowercasing",
    "config not lowercasing",
])
def test_direct_load_equals_autotokenizer(tmp_path, wordpiece_dir, monkeypatch, variant):
    """Every kind of folder the direct path accepts, including ones whose files disagree (the BERT classes
    take lowercasing from tokenizer_config.json, TokenizersBackend from tokenizer.json): same tokenizer."""
    d = tmp_path / "tok"
    shutil.copytree(wordpiece_dir, d, ignore=shutil.ignore_patterns("*.safetensors", "1_Pooling"))
    if variant.endswith(("Fast", "Tokenizer", "Backend")):
        edit_json(d / "tokenizer_config.json", tokenizer_class=variant)
    elif variant == "no config.json":
        os.unlink(d / "config.json")
    elif variant == "distilbert config":
        edit_json(d / "config.json", model_type="distilbert")
        edit_json(d / "tokenizer_config.json", tokenizer_class="DistilBertTokenizerFast")
    elif variant == "tokenizer.json not lowercasing":
        stop_lowercasing(d / "tokenizer.json")
    else:
        edit_json(d / "tokenizer_config.json", do_lower_case=False)
    assert tokmod._direct_class(str(d)) is not None
    direct, auto = load_tokenizer(str(d)), auto_tokenizer(str(d), monkeypatch)
    assert_same_tokenizer(direct, auto)
    if "lowercas" in variant:  # the variant is really another tokenizer for at least one of the two classes
        plain = load_tokenizer(wordpiece_dir)
        edited = {"tokenizer.json not lowercasing": False, "config not lowercasing": True}[variant]
        assert (direct.encode("Hello") != plain.encode("Hello")) == edited


@pytest.mark.parametrize("change", ["roberta config", "auto_map", "no tokenizer_class", "other class",
                                    "no tokenizer.json", "broken tokenizer_config.json"])
def test_other_folders_go_through_autotokenizer(tmp_path, wordpiece_dir, change):
    d = tmp_path / "tok"
    shutil.copytree(wordpiece_dir, d, ignore=shutil.ignore_patterns("*.safetensors", "1_Pooling"))
    if change == "roberta config":
        edit_json(d / "config.json", model_type="roberta")
    elif change == "auto_map":
        edit_json(d / "tokenizer_config.json", auto_map={"AutoTokenizer": ["x.XTokenizer", None]})
    elif change == "no tokenizer_class":
        edit_json(d / "tokenizer_config.json", tokenizer_class=None)
    elif change == "other class":
        edit_json(d / "tokenizer_config.json", tokenizer_class="RobertaTokenizer")
    elif change == "no tokenizer.json":
        os.unlink(d / "tokenizer.json")
    else:
        (d / "tokenizer_config.json").write_text("{not json")
    assert tokmod._direct_class(str(d)) is None


def test_transformers_without_tokenizers_backend_goes_through_autotokenizer(wordpiece_dir, monkeypatch):
    """transformers 4 (allowed by pyproject) has no TokenizersBackend, and its BertTokenizer is the slow
    class that AutoTokenizer does not pick there."""
    monkeypatch.setitem(sys.modules, "transformers.tokenization_utils_tokenizers", None)  # import -> ImportError
    assert tokmod._direct_class(wordpiece_dir) is None


def test_prepare_imports_no_torch(tmp_path, wordpiece_dir, sample_texts):
    """The whole command, main process and both workers. The CLI's process is single-threaded when its pool
    starts, so the workers are forked: they import nothing again, and -X importtime shows any import they make
    afterwards (torch would be one)."""
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(sample_texts[:40]) + "\n", encoding="utf-8")
    tmp = tmp_path / "tmp"  # the workers' context file goes to the temp folder and must be gone at the end
    tmp.mkdir()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "launch" / "prepare_data.py"), "--input", str(src),
         "--tokenizer", wordpiece_dir, "--output", str(tmp_path / "out"), "--workers", "2", "--unit-mb", "0.02",
         "--no-progress"], capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(tmp) == []
    imported = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert imported.count("pipeline.data_prep.tokenizer") == 1  # the main process; forked workers share it
    assert "torch" not in imported and "transformers.models.auto" not in imported


def test_worker_rebuilt_tokenizer_must_encode_the_probes_alike(wordpiece_dir):
    spec = load_tokenizer(wordpiece_dir).worker_spec()
    assert spec[0] == "backend" and len(spec[4]) == len(_PROBES)
    BackendEncoder(*spec[1:])
    wrong = [list(p) for p in spec[4]]
    wrong[2][0] += 1
    with pytest.raises(TokenizerLoadError, match=re.escape(repr(_PROBES[2]))):
        BackendEncoder(*spec[1:4], wrong)


def test_worker_that_cannot_build_its_tokenizer_stops_the_run(tmp_path, wordpiece_dir, sample_texts):
    """A pool initializer that raises would be restarted by multiprocessing.Pool forever (a hang): the
    workers build the tokenizer on their first unit instead and the driver stops on the first failure.
    Spawned workers rebuild it (forked ones inherit the main process's): the run is made to spawn, as it does
    off Linux or from a process with threads."""
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(sample_texts[:40]) + "\n", encoding="utf-8")
    script = f"""
import multiprocessing, sys
sys.path.insert(0, {str(ROOT)!r})
import pipeline.data_prep.prepare as P
from pipeline.data_prep.prepare import PrepareConfig, PrepareError, prepare
from pipeline.data_prep.tokenizer import TextTokenizer

P._pool_context = lambda: multiprocessing.get_context("spawn")

real = TextTokenizer.worker_spec
def worker_spec(self):  # the workers get probe ids that their tokenizer does not produce
    spec = real(self)
    return spec[:4] + ([[1, 2, 3]] * len(spec[4]),)
TextTokenizer.worker_spec = worker_spec
try:
    prepare(PrepareConfig(inputs=[{str(src)!r}], output={str(tmp_path / 'out')!r}, tokenizer={wordpiece_dir!r},
                          workers=2, unit_mb=0.02, progress=False))
except PrepareError as e:
    print("PrepareError:", e)
    sys.exit(3)
"""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "TMPDIR": str(tmp), "PIPELINE_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
    assert os.listdir(tmp) == []
    assert "a worker process could not build the tokenizer" in proc.stdout
    assert "TokenizerLoadError" in proc.stdout and "instead of the main process's" in proc.stdout
    units = tmp_path / "out" / "units"
    assert not units.exists() or not os.listdir(units)  # no unit was written with the wrong tokenizer


# -- identity cache -------------------------------------------------------------------------------------------
def cache_entries(cache) -> list:
    d = cache / "tokenizers"
    return sorted(d.iterdir()) if d.exists() else []


def test_identity_cache_hit_is_the_same_tokenizer(tmp_path, wordpiece_dir, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    cold = load_prep_tokenizer(wordpiece_dir)
    assert isinstance(cold, TextTokenizer) and len(cache_entries(tmp_path / "cache")) == 1
    warm = load_prep_tokenizer(wordpiece_dir)
    assert isinstance(warm, CachedTokenizer)
    assert warm.info().to_json() == cold.info().to_json()
    assert warm.worker_spec() == cold.worker_spec()
    assert warm.vocab_size == cold.vocab_size and warm.dtype == cold.dtype
    assert warm.encode_batch(TEXTS) == cold.encode_batch(TEXTS)


def test_identity_cache_hit_imports_no_transformers(tmp_path, wordpiece_dir):
    """What the cache is for: the driver's 2 s of transformers import while the workers wait."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            f"from pipeline.data_prep.tokenizer import load_prep_tokenizer\n"
            f"t = load_prep_tokenizer({wordpiece_dir!r})\n"
            f"print(type(t).__name__, 'transformers' in sys.modules)")
    env = {**os.environ, "PIPELINE_CACHE_DIR": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
            for _ in range(2)]
    assert [r.stdout.split() for r in runs] == [["TextTokenizer", "True"], ["CachedTokenizer", "False"]], \
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
    assert isinstance(after, TextTokenizer) and len(cache_entries(tmp_path / "cache")) == 2
    if change == "tokenizer_file":
        assert after.info().fingerprint != before.fingerprint
        assert after.encode("Hello") != load_tokenizer(wordpiece_dir).encode("Hello")
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
    assert isinstance(again, TextTokenizer)  # the real one, not the damaged entry
    assert again.info().to_json() == real.info().to_json()
    if damage != "unwritable":
        assert isinstance(load_prep_tokenizer(wordpiece_dir), CachedTokenizer)  # the entry was rewritten


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


# -- joined encoding (JoinedEncoder) -----------------------------------------------------------------------------

def _mixed_docs(sample_texts, seed: int) -> list[str]:
    """Real sentences and every kind of boundary trouble, in random order: documents holding the separator's
    text (the batch must fall back), ones that tokenize to nothing, one-character ones, long ones that make
    several groups, whitespace and punctuation at either end."""
    import random

    rng = random.Random(seed)
    words = " ".join(sample_texts).split()
    odd = ["[PAD] inside", "x[SEP]y", "\u200b", "\u00a0", "é", "end.", " lead", "trail ", "'q'", "[MASK]", "##ing",
           "中文", "🙂", "\tTab\n", "SEP]", "[PA", "D]"]
    docs = []
    for _ in range(400):
        r = rng.random()
        if r < 0.7:
            docs.append(" ".join(rng.sample(words, rng.randint(1, 40))) + rng.choice(["", "\n", " ", "."]))
        elif r < 0.95:
            docs.append(rng.choice(odd))
        else:
            docs.append(" ".join(rng.choice(words) for _ in range(rng.randint(800, 2000))))
    return docs


def test_joined_encoding_equals_per_document_encoding(wordpiece_dir, sample_texts):
    """encode_flat (documents joined by a special token, a group of ~GROUP_CHARS characters per tokenizer
    input) gives exactly the per-document ids and lengths, on the real bert-base-uncased WordPiece; batches
    where a document holds the separator's text fall back and are still exact; both code paths are taken."""
    import numpy as np

    main = load_prep_tokenizer(wordpiece_dir, threads=False)
    worker = tokmod.worker_tokenizer(main.worker_spec(), threads=False)
    sep_text, sep_id = worker._joined.sep
    assert worker._joined.sep in tokmod._separators(worker._backend)
    paths = {"joined": 0, "fallback": 0}
    for seed in range(6):
        docs = _mixed_docs(sample_texts, seed)
        for lo in range(0, len(docs), 97):
            batch = docs[lo:lo + 97]
            want = tokmod.ids_to_flat(worker.encode_batch(batch), worker.dtype)
            for enc in (worker, main):
                flat, lengths = enc.encode_flat(batch)
                assert flat.dtype == worker.dtype and lengths.dtype == np.int64
                np.testing.assert_array_equal(flat, want[0])
                np.testing.assert_array_equal(lengths, want[1])
            paths["joined" if worker._joined._joined(batch) is not None else "fallback"] += 1
    assert paths["joined"] > 5 and paths["fallback"] > 5, paths
    assert (worker.encode_flat([])[0].size, worker.encode_flat(["one"])[1].tolist()) == (0, [1])


def test_joining_is_off_for_a_tokenizer_that_reads_text_after_a_special_token_differently():
    """Metaspace with prepend_scheme="first" marks only the start of the whole input as a word start: a
    document after the separator would tokenize differently, and the start-up check must refuse to join.
    With "always" it is exact and joining is on."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[SEP]": 1}
    for w in "▁hello ▁world ▁foo ▁bar hello world foo bar ▁".split():
        vocab.setdefault(w, len(vocab))
    seps = {}
    for scheme in ("first", "always"):
        t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
        t.add_special_tokens(["[SEP]"])
        enc = tokmod.JoinedEncoder(t, np.uint16)
        seps[scheme] = enc.sep
        docs = ["hello world", "foo bar", "bar", "hello"] * 3
        flat, lengths = enc.flat(docs)
        np.testing.assert_array_equal(flat, [i for e in t.encode_batch(docs, add_special_tokens=False) for i in e.ids])
        assert lengths.tolist() == [2, 2, 1, 1] * 3
    assert seps == {"first": None, "always": ("[SEP]", 1)}


@pytest.mark.parametrize("content, ok", [("[SEP]", True), ("aba", False), ("<|x|>", True), ("##", False)])
def test_a_separator_has_no_border(content, ok):
    """A separator with a border ("aba": "a" is prefix and suffix) could form a new occurrence across a join
    ("ab" + "aba" -> "ababa" holds two); those are never used."""
    from tokenizers import Tokenizer, models

    t = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    t.add_special_tokens([content])
    assert (tokmod._separators(t) != []) == ok
