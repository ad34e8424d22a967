"""launch/benchmark.py: the reference step's batches follow the dataset's real document lengths with padding, ours are
packed; the loss-memory probe runs both losses; the whole command runs end to end (tiny models) and writes its JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.step_speed import Job, doc_lengths, loss_memory, make_batches
from tests.training.conftest import ROOT


def job(variant, data, **kw):
    return Job(**{**dict(variant=variant, preset="tiny", seq_len=32, micro=4, steps=1, warmup=0, device="cpu",
                         data=data), **kw})


def test_reference_batches_are_padded_documents_of_real_lengths(sample_data):
    from pipeline.data import PreparedDataset

    real = set((PreparedDataset(sample_data, "train").doc_lengths() + 2).tolist())
    assert set(doc_lengths(sample_data, 0, 50).tolist()) <= real
    drawn = np.minimum(doc_lengths(sample_data, 0, 3 * 4), 32).reshape(3, 4)
    for b, lengths in zip(make_batches(job("reference", sample_data), 3), drawn):
        am = b["attention_mask"]
        assert am.shape == (4, lengths.max())                # padded to the batch's longest document
        assert am.sum(1).tolist() == lengths.tolist()
        assert (b["input_ids"][am == 0] == 0).all() and (b["labels"][am == 0] == -100).all()
    ours = make_batches(job("ours", sample_data), 2)
    assert all(b["attention_mask"].all() and b["input_ids"].shape == (4, 32) for b in ours)
    assert any((b["labels"] != -100).any() for b in ours)


@pytest.mark.parametrize("variant", ["plain", "chunked"])
def test_loss_memory_probe_runs(variant):
    r = loss_memory(variant, rows=64, hidden=16, vocab=500, device="cpu", chunk_size=8)
    assert r["variant"] == variant and r["peak_extra_gib"] >= 0 and r["seconds"] > 0


@pytest.mark.integration
def test_benchmark_command_end_to_end(tmp_path, sample_data):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "benchmark.py"), "--preset", "tiny", "--seq-lens", "32",
                           "--rounds", "1", "--steps", "2", "--warmup", "1", "--data", sample_data, "--output", str(out),
                           "--document", "--profile", str(tmp_path / "prof")],
                          capture_output=True, text=True, timeout=600, cwd=str(ROOT),
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    (row,) = r["summary"]
    assert row["ratio_tokens_per_s"] == pytest.approx(row["ours"]["tokens_per_s"] / row["reference"]["tokens_per_s"])
    runs = {x["variant"]: x for x in r["runs"]}
    assert runs["ours"]["tokens"] == 2 * 2 * 32                      # packed: every position is a real token
    assert runs["reference"]["tokens"] < runs["reference"]["padded_tokens"] or row["reference"]["pad_fraction"] == 0
    assert set(r["loss_memory"]) == {"plain", "chunked"}
    assert "ours/ref" in proc.stdout
    # --document: our step on the reference's own padded document batches, unpadded and padded
    for v in ("ours_document", "ours_document_padded"):
        assert (runs[v]["tokens"], runs[v]["padded_tokens"]) == (runs["reference"]["tokens"],
                                                                 runs["reference"]["padded_tokens"])
    assert row["ratio_unpad_over_padded"] == pytest.approx(row["ours_document"]["tokens_per_s"]
                                                           / row["ours_document_padded"]["tokens_per_s"])
    assert "unpadded / padded document batches" in proc.stdout
    # --profile: where each variant's time goes, from torch.profiler
    for v in ("reference", "ours", "ours_document", "ours_document_padded"):
        text = (tmp_path / "prof" / f"profile_{v}_32.txt").read_text()
        assert text.startswith(f"# {v}, tiny, seq 32, micro 2: 2 steps under torch.profiler")
        assert "## by self host time" in text and "aten::" in text
