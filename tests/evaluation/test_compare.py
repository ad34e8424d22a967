"""launch/compare.py on tiny models: sizes are counted right and every timing is measured and consistent."""
import os

import pytest

from pipeline.evaluation.compare import compare, disk_bytes


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    root = tmp_path_factory.mktemp("cmp")
    BertForMaskedLM(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=64)).save_pretrained(root / "t")
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                           max_position_embeddings=64)).save_pretrained(root / "s")
    return str(root / "t"), str(root / "s")


def test_sizes_and_timings(pair):
    t, s = pair
    r = compare({"teacher": t, "student": s}, batch_sizes=(1, 4), seq_lens=(16, 128), repeats=2, vocab_size=1000)
    from transformers import AutoModel
    assert r["models"]["teacher"]["parameters"] == sum(p.numel() for p in AutoModel.from_pretrained(t).parameters())
    assert r["models"]["student"]["parameters"] < r["models"]["teacher"]["parameters"]
    assert r["models"]["student"]["disk_bytes"] == os.path.getsize(os.path.join(s, "model.safetensors"))
    assert [(row["batch"], row["seq_len"]) for row in r["timings"]] == [(1, 16), (4, 16), (1, 64), (4, 64)]
    for row in r["timings"]:  # seq 128 is capped at the models' 64 positions
        for m in ("teacher", "student"):
            assert row[m]["latency_ms"] > 0
            assert row[m]["sequences_per_s"] == pytest.approx(row["batch"] / row[m]["latency_ms"] * 1e3)
        assert row["teacher"]["speedup_vs_teacher"] == 1.0
    assert disk_bytes("bert-base-uncased") is None


def test_student_vs_teacher_benchmark_builds_the_student_from_the_teacher(tmp_path):
    """benchmarks/student_vs_teacher.py (tiny models): the student is the pipeline's DistilBERT with half the
    teacher's layers, and the result JSON holds both models and every shape."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "student_vs_teacher.py"), "--tiny",
                           "--batch-sizes", "1", "2", "--seq-lens", "16", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r["models"]["teacher"]["layers"], r["models"]["student"]["layers"]) == (4, 2)
    assert r["models"]["student"]["parameters"] < r["models"]["teacher"]["parameters"]
    assert [(row["batch"], row["seq_len"]) for row in r["timings"]] == [(1, 16), (2, 16)]
    assert "speedup" in proc.stdout and r["tiny"] is True
