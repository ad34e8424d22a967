"""Recipes and DeepSpeed configs: every shipped one validates; bad ones fail with every problem and its key."""
import glob
import os

import pytest

from pipeline.training.config import (RECIPE_DIR, ConfigError, describe_fields, load_config, parse_overrides,
                                      plan_batch)
from pipeline.training.ds_config import DS_CONFIG_DIR, finalize_ds_config, load_ds_config, precision, zero_stage

RECIPES = sorted(glob.glob(os.path.join(RECIPE_DIR, "*.yaml")))
DS_CONFIGS = sorted(glob.glob(os.path.join(DS_CONFIG_DIR, "*.json")))
REQUIRED = ["run_dir=/tmp/run", "data.path=/tmp/data"]


def _needs(recipe):
    extra = list(REQUIRED)
    if "teacher_mlm" in recipe:
        extra.append("student.pretrained=/tmp/enc")
    if "tiny_cpu" in recipe:
        extra.append("teacher.name_or_path=/tmp/teacher")
    return extra


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_shipped_recipes_validate_and_start_with_their_command(recipe):
    with open(recipe) as f:
        head = f.read(2000)
    assert head.startswith("#") and "launch/pretrain.py" in head, "every recipe starts with the command that runs it"
    cfg = load_config(recipe, _needs(recipe))
    assert plan_batch(cfg, 1).global_size == cfg.batch.global_size


def test_distilbert_base_is_the_paper_recipe():
    cfg = load_config("distilbert_base", REQUIRED)
    assert (cfg.loss.kd, cfg.loss.mlm, cfg.loss.cos, cfg.loss.temperature) == (5.0, 2.0, 1.0, 2.0)
    assert cfg.student.layers == [0, 2, 4, 7, 9, 11] and cfg.data.seq_len == 512
    assert cfg.optimizer.lr == 5e-4 and cfg.optimizer.betas == [0.9, 0.98] and cfg.optimizer.grad_clip == 5.0
    assert cfg.schedule.warmup_fraction == 0.05 and cfg.schedule.decay == "linear"
    assert cfg.batch.global_size == 4096
    assert plan_batch(cfg, 8).accumulation == 32


@pytest.mark.parametrize("path", DS_CONFIGS, ids=os.path.basename)
def test_shipped_ds_configs_finalize(path):
    raw = load_ds_config(path)
    stage0_no_skip = zero_stage(raw) == 0 and precision(raw) != "fp16"
    cfg = load_config("distilbert_base", REQUIRED + (["train.nonfinite=stop"] if stage0_no_skip else []))
    on_gpu = True
    ds = finalize_ds_config(raw, cfg, plan_batch(cfg, 8), on_gpu=on_gpu, source=path)
    assert ds["train_batch_size"] == 4096 and ds["gradient_accumulation_steps"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_clipping"] == 5.0
    if precision(ds) == "bf16" and ds.get("bf16", {}).get("enabled"):
        assert ds["data_types"]["grad_accum_dtype"] == "fp32"  # bf16 runs accumulate in fp32
    if precision(ds) != "fp16":  # everything but fp16 also runs on CPU
        finalize_ds_config(raw, cfg, plan_batch(cfg, 8), on_gpu=False, source=path)
    names = os.path.basename(path)
    assert f"zero{zero_stage(ds)}_" in names and precision(ds) in names


def test_ds_config_set_covers_the_matrix():
    names = {os.path.basename(p) for p in DS_CONFIGS}
    for stage in range(4):
        for prec in ("bf16", "fp16", "fp32"):
            assert f"zero{stage}_{prec}.json" in names
    assert any("offload" in n for n in names)


def test_every_problem_reported_at_once_with_its_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: /tmp/x\ndata:\n  path: /tmp/d\n  seq_len: 4\noptimizer:\n  lr: -1\n  nme: lamb\n"
                   "loss:\n  temperature: 0\nbatch:\n  global_size: 10\n  micro_size: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    msg = str(e.value)
    assert "optimizer.nme: unknown key (did you mean optimizer.name?)" in msg and str(bad) in msg
    with pytest.raises(ConfigError) as e:
        _load_fixed(bad)
    msg = str(e.value)
    for key in ("data.seq_len", "optimizer.lr", "loss.temperature", "batch.global_size"):
        assert key in msg, (key, msg)
    assert len(e.value.problems) == 4


def _load_fixed(bad):
    bad.write_text(bad.read_text().replace("  nme: lamb\n", ""))
    return load_config(str(bad))


def test_type_errors_and_yaml_syntax(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer.lr: expected float, got 'fast'"):
        load_config("distilbert_base", REQUIRED + ["optimizer.lr=fast"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("run_dir: x\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML, line"):
        load_config(str(broken))
    with pytest.raises(ConfigError, match="not a shipped recipe"):
        load_config("no_such_recipe")


def test_teacher_free_needs_no_teacher_and_distillation_does():
    sizes = ["student.hidden_size=64", "student.n_heads=2", "student.ffn_size=128"]
    cfg = load_config("distilbert_base", REQUIRED + sizes + ["teacher.name_or_path=null", "student.init=random",
                                                             "loss.kd=0", "loss.cos=0"])
    assert not cfg.loss.needs_teacher
    with pytest.raises(ConfigError, match="need a teacher"):
        load_config("distilbert_base", REQUIRED + ["teacher.name_or_path=null", "student.init=random",
                                                   "student.hidden_size=64", "student.n_heads=2",
                                                   "student.ffn_size=128"])


def test_overrides_parse_yaml_values():
    assert parse_overrides(["student.layers=[0, 3]", "train.max_steps=null", "a.b.c=1e-3"]) == {
        "student": {"layers": [0, 3]}, "train": {"max_steps": None}, "a": {"b": {"c": 1e-3}}}


def test_batch_arithmetic():
    cfg = load_config("distilbert_base", REQUIRED)
    assert plan_batch(cfg, 16).accumulation == 16
    with pytest.raises(ConfigError, match="not divisible"):
        plan_batch(cfg, 3)
    cfg = load_config("distilbert_base", REQUIRED + ["batch.accumulation=4"])
    with pytest.raises(ConfigError, match=r"batch.global_size \(4096\) != batch.micro_size \(16\) x "
                                          r"batch.accumulation \(4\) x world size \(8\)"):
        plan_batch(cfg, 8)
    assert plan_batch(cfg, 64).accumulation == 4


def test_ds_config_disagreements_are_reported_together(tmp_path):
    cfg = load_config("distilbert_base", REQUIRED + ["optimizer.name=lamb"])
    raw = {"train_batch_size": 1024, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "scheduler": {"type": "WarmupLR"},
           "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "bf16"}}
    with pytest.raises(ConfigError) as e:
        finalize_ds_config(raw, cfg, plan_batch(cfg, 8), on_gpu=True, source="ds.json")
    msg = str(e.value)
    for piece in ("train_batch_size is 1024", "gradient_clipping is 1.0", "optimizer.type is 'AdamW'",
                  "optimizer.params.lr", "\"scheduler\" section", "grad_accum_dtype is 'bf16'",
                  "optimizer.name=lamb with ZeRO stage 2"):
        assert piece in msg, (piece, msg)


def test_fp16_refused_on_cpu_and_bf16_stage0_pointed_to_autocast():
    cfg = load_config("distilbert_base", REQUIRED)
    with pytest.raises(ConfigError, match="fp16 is not supported by DeepSpeed on CPU"):
        finalize_ds_config(load_ds_config(os.path.join(DS_CONFIG_DIR, "zero2_fp16.json")), cfg, plan_batch(cfg, 8),
                           on_gpu=False, source="x")
    with pytest.raises(ConfigError, match="torch_autocast"):
        finalize_ds_config({"bf16": {"enabled": True}}, cfg, plan_batch(cfg, 8), on_gpu=True, source="x")


def test_bad_json_names_line(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{\n  "train_batch_size": 8,\n  oops\n}')
    with pytest.raises(ConfigError, match="line 3"):
        load_ds_config(str(p))


def test_help_config_lists_every_key_with_doc():
    lines = describe_fields()
    assert any(line.strip().startswith("loss.temperature = 2.0  # softmax temperature") for line in lines)
    assert all("#" in line for line in lines)


def test_skip_policy_needs_an_optimizer_that_skips():
    cfg = load_config("distilbert_base", REQUIRED)
    assert cfg.train.nonfinite == "skip"
    with pytest.raises(ConfigError, match="train.nonfinite=skip needs DeepSpeed to skip"):
        finalize_ds_config(load_ds_config(os.path.join(DS_CONFIG_DIR, "zero0_fp32.json")), cfg, plan_batch(cfg, 8),
                           on_gpu=True, source="x")
    with pytest.raises(ConfigError, match="check_grad_overflow=false"):
        finalize_ds_config({"bf16": {"enabled": True, "check_grad_overflow": False}, "zero_optimization": {"stage": 2}},
                           cfg, plan_batch(cfg, 8), on_gpu=True, source="x")
