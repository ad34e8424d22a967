"""The FLOP model against a hand count for BERT-base -> 6-layer DistilBERT, and the reference's figures."""
import pytest

from pipeline.training.flops import H100_MEASURED_BF16, PEAK_FLOPS, ModelShape, mfu, step_flops

TEACHER = ModelShape(n_layers=12, hidden=768, ffn=3072, vocab=30522)
STUDENT = ModelShape(n_layers=6, hidden=768, ffn=3072, vocab=30522)
SEQ = 512


def _hand_count_per_token(kd_rows: float) -> float:
    H, F, V, S = 768, 3072, 30522, 512
    layer = 4 * 2 * H * H + 2 * 2 * H * F + 2 * 2 * S * H   # 4,718,592 + 9,437,184 + 1,572,864 = 15,728,640
    assert layer == 15_728_640
    head = 2 * H * H + 2 * H * V                              # 1,179,648 + 46,881,792 = 48,061,440
    assert head == 48_061_440
    teacher = 12 * layer + kd_rows * head                     # forward only
    student = 3 * (6 * layer + kd_rows * head)                # forward + backward (2 x forward)
    return teacher + student


def test_hand_count_all_tokens_exact_and_near_reference():
    want = _hand_count_per_token(1.0)
    assert want == 664_104_960  # 188,743,680 teacher + 283,115,520 student layers + 4 x 48,061,440 heads
    tokens = 4096 * SEQ
    f = step_flops(TEACHER, STUDENT, SEQ, tokens, kd_rows_fraction=1.0)
    assert f["per_token"] == want
    assert f["total"] == want * tokens
    assert f["total"] == f["teacher_forward"] + f["student_forward"] + f["student_backward"]
    assert f["student_backward"] == 2 * f["student_forward"]
    assert f["teacher_forward"] == (12 * 15_728_640 + 48_061_440) * tokens
    assert f["attention"] == (12 + 3 * 6) * 2 * 2 * SEQ * 768 * tokens
    assert f["output_layers"] == 4 * 48_061_440 * tokens
    assert f["per_token"] == pytest.approx(664e6, rel=0.02)


def test_hand_count_masked_kd_near_reference():
    want = _hand_count_per_token(0.15)
    f = step_flops(TEACHER, STUDENT, SEQ, tokens=1, kd_rows_fraction=0.15, mlm_rows_fraction=0.15)
    assert f["per_token"] == pytest.approx(want, rel=1e-12)
    assert f["total"] == pytest.approx(want, rel=1e-12)
    assert f["per_token"] == pytest.approx(501e6, rel=0.02)


def test_logit_rows_are_the_union_of_kd_and_mlm_rows_and_teacher_free_counts_mlm_only():
    a = step_flops(TEACHER, STUDENT, SEQ, 1000, kd_rows_fraction=0.0, mlm_rows_fraction=0.15)
    b = step_flops(TEACHER, STUDENT, SEQ, 1000, kd_rows_fraction=0.15, mlm_rows_fraction=0.15)
    assert a == b
    free = step_flops(None, STUDENT, SEQ, 1000, kd_rows_fraction=1.0, mlm_rows_fraction=0.15)
    assert free["teacher_forward"] == 0
    assert free["total"] == pytest.approx(3 * (6 * 15_728_640 + 0.15 * 48_061_440) * 1000, rel=1e-12)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        step_flops(TEACHER, STUDENT, 0, 10)
    with pytest.raises(ValueError):
        step_flops(TEACHER, STUDENT, SEQ, 10, kd_rows_fraction=1.5)
    with pytest.raises(ValueError):
        mfu(1e12, 0.0, PEAK_FLOPS["H100-bf16"])


def test_mfu_arithmetic():
    # 4096 x 512 tokens at 664,104,960 FLOP each in 2 s on 8 H100s
    flops = 664_104_960 * 4096 * 512
    got = mfu(flops, 2.0, 8 * PEAK_FLOPS["H100-bf16"])
    assert got == pytest.approx(flops / 2.0 / (8 * 989e12), rel=1e-15)
    assert got == pytest.approx(0.088014, rel=1e-4)
    assert mfu(790e12, 1.0, PEAK_FLOPS["H100-bf16"]) == pytest.approx(790 / 989)
    assert H100_MEASURED_BF16 < PEAK_FLOPS["H100-bf16"]


def test_model_shape_reads_bert_and_distilbert_configs():
    from transformers import BertConfig, DistilBertConfig

    from pipeline.training.flops import model_shape

    assert model_shape(BertConfig()) == ModelShape(12, 768, 3072, 30522)
    assert model_shape(DistilBertConfig(n_layers=6, dim=768, hidden_dim=3072)) == ModelShape(6, 768, 3072, 30522)


def test_peak_flops_by_device_name_and_precision():
    from pipeline.training.flops import peak_flops_for

    assert peak_flops_for("NVIDIA H100 80GB HBM3", "bf16") == PEAK_FLOPS["H100-bf16"]
    assert peak_flops_for("NVIDIA H200", "bf16") == PEAK_FLOPS["H200-bf16"]
    assert peak_flops_for("NVIDIA A100-SXM4-80GB", "fp32") == PEAK_FLOPS["A100-tf32"]
    assert peak_flops_for("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 tensor cores: no MFU rather than a wrong one
    assert peak_flops_for("some other GPU", "bf16") is None
