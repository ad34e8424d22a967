"""The run configuration: a recipe (YAML) of typed sections, one per concern, plus `key=value` overrides.

    cfg = load_config("distilbert_base", ["optimizer.lr=3e-4", "batch.micro_size=16"])

Every section is a dataclass whose fields carry a one-line doc (the dialect of pipeline/settings.py, shared with
data preparation). `validate` gathers every problem of a recipe into
one ConfigError that names the key to change, so a user fixes a config in one round trip, not one error per run.
Precision and ZeRO stage live in the DeepSpeed JSON (pipeline/training/ds_config.py); everything else lives here.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, get_args, get_origin, get_type_hints

import yaml

from pipeline.settings import ConfigError, doc  # the project's one config dialect

RECIPE_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "recipes")


@dataclass
class TeacherConfig:
    name_or_path: Optional[str] = doc("Hugging Face masked-LM checkpoint (hub name or local folder); null = "
                                      "teacher-free MLM pretraining", "bert-base-uncased")
    dtype: str = doc("teacher precision: auto (bf16 on GPU, fp32 on CPU), bf16 or fp32", "auto")


@dataclass
class StudentConfig:
    arch: str = doc("distilbert (no token types, no pooler: the DistilBERT construction) or bert", "distilbert")
    init: str = doc("teacher (copy teacher layers), random (no-teacher baseline) or pretrained", "teacher")
    layers: Optional[list] = doc("teacher layers copied into the student (init=teacher); null = spread evenly, "
                                 "[0,2,4,7,9,11] for 12->6", None)
    n_layers: int = doc("number of student layers", 6)
    hidden_size: Optional[int] = doc("hidden size for init=random without a teacher (else the teacher's)", None)
    n_heads: Optional[int] = doc("attention heads for init=random without a teacher", None)
    ffn_size: Optional[int] = doc("feed-forward size for init=random without a teacher", None)
    max_position: int = doc("position embeddings for init=random without a teacher", 512)
    pretrained: Optional[str] = doc("checkpoint to start from when init=pretrained", None)
    dropout: float = doc("hidden dropout probability", 0.1)
    attention_dropout: float = doc("attention dropout probability", 0.1)
    activation_checkpointing: bool = doc("recompute each layer's activations in the backward pass: far less "
                                         "activation memory for big micro batches, ~1/3 more student compute", False)


@dataclass
class DataConfig:
    path: Optional[str] = doc("prepared dataset folder (launch/prepare_data.py --output)", None)
    train_split: str = doc("split to train on", "train")
    valid_split: str = doc("split for held-out evaluation", "valid")
    seq_len: int = doc("training sequence length in tokens, [CLS] included", 512)
    mode: str = doc("packed (consecutive documents, no padding) or document (one document per sample, padded)",
                    "packed")
    unpad: bool = doc("document mode: run the padded batches of teacher and student unpadded (real tokens packed, "
                      "attention per document: FlashAttention varlen on GPU in bf16/fp16); packed batches have no "
                      "padding and are unaffected", True)
    num_workers: int = doc("background data-loader processes per rank", 2)
    verify: str = doc("checksums checked at start by rank 0: full (sha256 of every shard) or size", "full")


@dataclass
class MaskingConfig:
    probability: float = doc("fraction of maskable tokens selected per sequence", 0.15)
    mask_fraction: float = doc("of the selected tokens, fraction replaced by [MASK]", 0.8)
    random_fraction: float = doc("of the selected tokens, fraction replaced by a random token", 0.1)
    whole_word: bool = doc("select whole words instead of single word pieces", False)
    smoothing: bool = doc("weight selection by token count^-exponent from the dataset (rare tokens masked more)",
                          False)
    smoothing_exponent: float = doc("exponent of the count smoothing", 0.7)


@dataclass
class LossConfig:
    kd: float = doc("weight of the soft-target KL term (x T^2)", 5.0)
    mlm: float = doc("weight of the masked-LM cross-entropy", 2.0)
    cos: float = doc("weight of the cosine term between last hidden states", 1.0)
    mse: float = doc("weight of the MSE between logits (0 = off)", 0.0)
    temperature: float = doc("softmax temperature T of the KD term", 2.0)
    kd_tokens: str = doc("tokens the KD, MSE and cosine terms cover: all (every non-pad token) or masked", "all")
    chunk_size: int = doc("rows of logits the fused KD + MLM loss builds at a time (teacher and student, through "
                          "the decoder, gradients per chunk): memory O(chunk x vocab) instead of O(rows x vocab); "
                          "0 = the plain loss on full logits (needed for loss.mse)", 4096)
    compile_chunks: bool = doc("on GPU, fuse each chunk's softmax math into a few kernels with torch.compile "
                               "(the chunked loss's element-wise passes were ~45% of an H100 step eager)", True)

    @property
    def needs_teacher(self) -> bool:
        return self.kd > 0 or self.cos > 0 or self.mse > 0


@dataclass
class OptimizerConfig:
    name: str = doc("adamw or lamb (fused CUDA kernels on GPU, torch implementations on CPU)", "adamw")
    lr: float = doc("peak learning rate", 5e-4)
    betas: list = doc("Adam betas", default_factory=lambda: [0.9, 0.98])
    eps: float = doc("Adam epsilon", 1e-6)
    weight_decay: float = doc("decoupled weight decay (biases and LayerNorms excluded)", 0.0)
    grad_clip: float = doc("gradient-norm clipping (0 = off)", 5.0)


@dataclass
class ScheduleConfig:
    warmup_fraction: float = doc("warmup as a fraction of the total steps (ignored if warmup_steps is set)", 0.05)
    warmup_steps: Optional[int] = doc("warmup steps", None)
    decay: str = doc("after warmup: linear, cosine or constant", "linear")
    min_lr_ratio: float = doc("final learning rate as a fraction of the peak", 0.0)


@dataclass
class BatchConfig:
    global_size: int = doc("sequences per optimiser step (= micro x accumulation x world size)", 4096)
    micro_size: int = doc("sequences per rank per forward/backward", 16)
    accumulation: Optional[int] = doc("micro-steps per optimiser step; null = global / (micro x world)", None)


@dataclass
class TrainConfig:
    max_steps: Optional[int] = doc("optimiser steps to train; null = derived from epochs", None)
    epochs: float = doc("passes over the training split when max_steps is null", 3.0)
    seed: int = doc("seed of initialisation, shuffling, masking and dropout", 56)
    nonfinite: str = doc("on a non-finite loss: skip (DeepSpeed drops the update; counted in train/skipped_steps) "
                         "or stop (checkpoint the last good weights, exit 1)", "skip")
    stop_at_step: Optional[int] = doc("stop (with a checkpoint) after this step without changing the schedule; "
                                      "for staged runs", None)
    compile: bool = doc("torch.compile the student (DeepSpeed's engine.compile) and the teacher's encoder; the "
                        "first steps pay for the compilation", False)
    stall_timeout_s: float = doc("a rank that completes no optimiser step for this long (seconds) reports its rank, "
                                 "host and last step and the job exits 1 (SLURM can requeue it); above the slowest "
                                 "step, evaluation or checkpoint", 300.0)


@dataclass
class CheckpointConfig:
    every_steps: int = doc("checkpoint interval in optimiser steps (0 = only at the end)", 1000)
    keep_last: int = doc("complete checkpoints kept (older ones are deleted)", 3)
    export_hf: bool = doc("also export the student in Hugging Face format into each checkpoint", True)


@dataclass
class LoggingConfig:
    every_steps: int = doc("console/TensorBoard interval in optimiser steps", 10)
    tensorboard: bool = doc("write TensorBoard events to <run_dir>/tensorboard", True)
    progress: bool = doc("show a progress bar on rank 0", True)
    sample_ids: bool = doc("log the global positions and sample ids each rank trains on (for audits)", False)


@dataclass
class EvalConfig:
    every_steps: int = doc("held-out evaluation interval in optimiser steps (0 = only at the end)", 500)
    n_samples: int = doc("validation sequences evaluated (fixed masks)", 1024)
    micro_size: Optional[int] = doc("sequences per rank per evaluation batch; null = batch.micro_size", None)


@dataclass
class RunConfig:
    run_dir: Optional[str] = doc("output folder: checkpoints, TensorBoard, logs, exported student", None)
    teacher: TeacherConfig = doc("teacher model", default_factory=TeacherConfig)
    student: StudentConfig = doc("student model", default_factory=StudentConfig)
    tokenizer: Optional[str] = doc("tokenizer saved with the student; null = the teacher's (or the dataset's)", None)
    data: DataConfig = doc("training data", default_factory=DataConfig)
    masking: MaskingConfig = doc("dynamic masking", default_factory=MaskingConfig)
    loss: LossConfig = doc("loss weights", default_factory=LossConfig)
    optimizer: OptimizerConfig = doc("optimiser", default_factory=OptimizerConfig)
    schedule: ScheduleConfig = doc("learning-rate schedule", default_factory=ScheduleConfig)
    batch: BatchConfig = doc("batch sizes", default_factory=BatchConfig)
    train: TrainConfig = doc("training length and seed", default_factory=TrainConfig)
    checkpoint: CheckpointConfig = doc("checkpoints", default_factory=CheckpointConfig)
    logging: LoggingConfig = doc("logging", default_factory=LoggingConfig)
    eval: EvalConfig = doc("held-out evaluation", default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- loading ---------------------------------------------------------------------------------------------------------
def resolve_recipe(name_or_path: str) -> str:
    """A recipe path, or the name of a shipped recipe (pipeline/recipes/<name>.yaml)."""
    if os.path.exists(name_or_path):
        return name_or_path
    shipped = os.path.join(RECIPE_DIR, name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if os.path.exists(shipped):
        return shipped
    names = sorted(f[:-5] for f in os.listdir(RECIPE_DIR) if f.endswith(".yaml"))
    raise ConfigError(name_or_path, [f"no such recipe file, and not a shipped recipe (shipped: {', '.join(names)})"])


def _typecheck(value, hint) -> bool:
    origin = get_origin(hint)
    if origin is not None and type(None) in get_args(hint):  # Optional[X]
        return value is None or _typecheck(value, [a for a in get_args(hint) if a is not type(None)][0])
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is bool:
        return isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is list:
        return isinstance(value, list)
    return True


def _coerce_number(value, hint):
    """YAML 1.1 reads `1e-4` (no dot) as a string; every user writes learning rates that way."""
    float_field = hint is float or (get_origin(hint) is not None and float in get_args(hint))
    if float_field and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _build(cls, data: Any, prefix: str, problems: list[str]):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping of keys, got {type(data).__name__}")
        return cls()
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(fields)})"
            problems.append(f"{prefix}{key}: unknown key{hint}")
            continue
        hint = hints[key]
        value = _coerce_number(value, hint)
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.", problems)
        elif not _typecheck(value, hint):
            want = getattr(hint, "__name__", str(hint)).replace("typing.", "")
            problems.append(f"{prefix}{key}: expected {want}, got {value!r}")
        else:
            kwargs[key] = float(value) if hint is float else value
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` strings into a nested dict; values are parsed as YAML (numbers, lists, null, true)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError("command line", [f"{item!r}: overrides are key=value (e.g. optimizer.lr=3e-4)"])
        key, value = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError("command line", [f"{key}: {p} is not a section"])
        parsed = yaml.safe_load(value) if value != "" else None
        if isinstance(parsed, str):
            try:
                parsed = float(parsed) if any(c in parsed.lower() for c in ".e") else int(parsed)
            except ValueError:
                pass
        node[parts[-1]] = parsed
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(recipe: str, overrides: list[str] | None = None, *, validate_now: bool = True) -> RunConfig:
    """Read a recipe, apply overrides, check every field; relative paths in the recipe are kept as written."""
    path = resolve_recipe(recipe)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(path, [f"not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    raw = _merge(raw, parse_overrides(overrides or []))
    problems: list[str] = []
    cfg = _build(RunConfig, raw, "", problems)
    if problems:
        raise ConfigError(path, problems)
    if validate_now:
        validate(cfg, source=path)
    return cfg


def validate(cfg: RunConfig, source: str = "recipe") -> None:
    """Gather every inconsistency of a run config into one ConfigError (the world size is checked later)."""
    p: list[str] = non_finite_numbers(cfg)

    def need(cond, msg):
        if not cond and not any(msg.split(":")[0] == q.split(":")[0] for q in p):  # one line per key
            p.append(msg)

    need(cfg.run_dir, "run_dir: required (the output folder), e.g. run_dir=runs/my_run")
    need(cfg.data.path, "data.path: required (a folder made by launch/prepare_data.py)")
    need(cfg.data.seq_len >= 8, f"data.seq_len: must be >= 8, got {cfg.data.seq_len}")
    need(cfg.data.mode in ("packed", "document"), f"data.mode: packed or document, got {cfg.data.mode!r}")
    need(cfg.data.num_workers >= 0, "data.num_workers: must be >= 0")
    need(cfg.data.verify in ("full", "size"), f"data.verify: full or size, got {cfg.data.verify!r}")
    need(cfg.teacher.dtype in ("auto", "bf16", "fp32"), f"teacher.dtype: auto, bf16 or fp32, got {cfg.teacher.dtype!r}")

    s = cfg.student
    need(s.arch in ("distilbert", "bert"), f"student.arch: distilbert or bert, got {s.arch!r}")
    need(s.init in ("teacher", "random", "pretrained"), f"student.init: teacher, random or pretrained, got {s.init!r}")
    need(s.n_layers >= 1, "student.n_layers: must be >= 1")
    need(0 <= s.dropout < 1 and 0 <= s.attention_dropout < 1, "student.dropout/attention_dropout: must be in [0, 1)")
    if s.layers is not None:
        need(len(s.layers) == s.n_layers, f"student.layers: {len(s.layers)} layers listed but student.n_layers is "
                                          f"{s.n_layers}")
    if s.init == "teacher":
        need(cfg.teacher.name_or_path, "student.init=teacher needs teacher.name_or_path (or set student.init=random)")
    if s.init == "pretrained":
        need(s.pretrained, "student.pretrained: required when student.init=pretrained")
    if s.init == "random" and not cfg.teacher.name_or_path:
        for k in ("hidden_size", "n_heads", "ffn_size"):
            need(getattr(s, k), f"student.{k}: required for student.init=random without a teacher")

    l = cfg.loss
    for k in ("kd", "mlm", "cos", "mse"):
        need(getattr(l, k) >= 0, f"loss.{k}: weights must be >= 0")
    need(l.kd + l.mlm + l.cos + l.mse > 0, "loss: every weight is 0; set loss.mlm (teacher-free) or loss.kd")
    need(l.temperature > 0, "loss.temperature: must be > 0")
    need(l.kd_tokens in ("all", "masked"), f"loss.kd_tokens: all or masked, got {l.kd_tokens!r}")
    need(isinstance(l.chunk_size, int) and l.chunk_size >= 0, f"loss.chunk_size: an integer >= 0, got {l.chunk_size!r}")
    need(not (l.mse > 0 and l.chunk_size), "loss.mse > 0 needs the full logits, which the chunked loss never holds: "
                                           "set loss.chunk_size=0 (or loss.mse=0)")
    if l.needs_teacher:
        need(cfg.teacher.name_or_path, "loss.kd/cos/mse > 0 need a teacher: set teacher.name_or_path, or set "
                                       "loss.kd=0 loss.cos=0 loss.mse=0 for teacher-free MLM pretraining")

    m = cfg.masking
    need(0 < m.probability < 1, "masking.probability: must be in (0, 1)")
    need(0 <= m.mask_fraction and 0 <= m.random_fraction and m.mask_fraction + m.random_fraction <= 1,
         "masking.mask_fraction + masking.random_fraction: must be within [0, 1]")
    need(m.smoothing_exponent >= 0, "masking.smoothing_exponent: must be >= 0")

    o = cfg.optimizer
    need(o.name in ("adamw", "lamb"), f"optimizer.name: adamw or lamb, got {o.name!r}")
    need(o.lr > 0, "optimizer.lr: must be > 0")
    need(len(o.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas),
         f"optimizer.betas: two numbers in [0, 1), got {o.betas!r}")
    need(o.eps > 0, "optimizer.eps: must be > 0")
    need(o.weight_decay >= 0, "optimizer.weight_decay: must be >= 0")
    need(o.grad_clip >= 0, "optimizer.grad_clip: must be >= 0")

    sc = cfg.schedule
    need(0 <= sc.warmup_fraction < 1, "schedule.warmup_fraction: must be in [0, 1)")
    need(sc.warmup_steps is None or sc.warmup_steps >= 0, "schedule.warmup_steps: must be >= 0")
    need(sc.decay in ("linear", "cosine", "constant"), f"schedule.decay: linear, cosine or constant, got {sc.decay!r}")
    need(0 <= sc.min_lr_ratio <= 1, "schedule.min_lr_ratio: must be in [0, 1]")

    b = cfg.batch
    need(b.global_size >= 1, "batch.global_size: must be >= 1")
    need(b.micro_size >= 1, "batch.micro_size: must be >= 1")
    need(b.accumulation is None or b.accumulation >= 1, "batch.accumulation: must be >= 1 or null")
    if b.global_size >= 1 and b.micro_size >= 1:
        need(b.global_size % b.micro_size == 0, f"batch.global_size ({b.global_size}) must be a multiple of "
                                                f"batch.micro_size ({b.micro_size})")

    t = cfg.train
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps: must be >= 1 or null")
    need(t.max_steps is not None or t.epochs > 0, "train.epochs: must be > 0 when train.max_steps is null")
    need(t.stop_at_step is None or t.stop_at_step >= 1, "train.stop_at_step: must be >= 1 or null")
    need(t.nonfinite in ("skip", "stop"), f"train.nonfinite: skip or stop, got {t.nonfinite!r}")
    need(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps: must be >= 0")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last: must be >= 1")
    need(cfg.logging.every_steps >= 1, "logging.every_steps: must be >= 1")
    need(cfg.eval.every_steps >= 0, "eval.every_steps: must be >= 0")
    need(cfg.eval.n_samples >= 0, "eval.n_samples: must be >= 0")
    need(cfg.eval.micro_size is None or cfg.eval.micro_size >= 1, "eval.micro_size: must be >= 1 or null")
    need(0 <= t.seed < 2 ** 63, f"train.seed: a non-negative integer, got {t.seed}")
    need(t.stall_timeout_s > 0, f"train.stall_timeout_s: seconds, must be > 0, got {t.stall_timeout_s}")
    need(s.max_position >= 1, "student.max_position: must be >= 1")
    for k in ("hidden_size", "n_heads", "ffn_size"):
        need(getattr(s, k) is None or getattr(s, k) >= 1, f"student.{k}: must be >= 1 or null")
    if s.layers is not None:
        need(all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in s.layers),
             f"student.layers: teacher layer indices (integers >= 0), got {s.layers!r}")
    if p:
        raise ConfigError(source, p)


def non_finite_numbers(cfg, prefix: str = "") -> list[str]:
    """A problem for every float key (and number in a list) that is NaN or infinite: YAML reads `.inf` and `nan`
    as numbers, and no key of a recipe means anything with them (an infinite learning rate trains on NaN)."""
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            problems += non_finite_numbers(value, f"{prefix}{f.name}.")
            continue
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            problems.append(f"{prefix}{f.name}: must be a finite number, got {value!r}")
    return problems


@dataclass
class BatchPlan:
    """Batch arithmetic, computed once for a world size: global = micro x accumulation x world."""
    global_size: int
    micro_size: int
    accumulation: int
    world_size: int


def plan_batch(cfg: RunConfig, world_size: int, source: str = "recipe") -> BatchPlan:
    b = cfg.batch
    per_step = b.micro_size * world_size
    if b.accumulation is not None:
        if b.micro_size * b.accumulation * world_size != b.global_size:
            raise ConfigError(source, [
                f"batch.global_size ({b.global_size}) != batch.micro_size ({b.micro_size}) x batch.accumulation "
                f"({b.accumulation}) x world size ({world_size}) = {per_step * b.accumulation}; set "
                f"batch.accumulation=null to derive it, or change batch.global_size"])
        return BatchPlan(b.global_size, b.micro_size, b.accumulation, world_size)
    if b.global_size % per_step:
        raise ConfigError(source, [
            f"batch.global_size ({b.global_size}) is not divisible by batch.micro_size ({b.micro_size}) x world size "
            f"({world_size}) = {per_step}; change batch.micro_size or batch.global_size"])
    return BatchPlan(b.global_size, b.micro_size, b.global_size // per_step, world_size)


def describe_fields(cls=RunConfig, prefix: str = "") -> list[str]:
    """Every key with its default and doc line, for `--help-config`."""
    lines = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{prefix}{f.name}:  # {f.metadata.get('doc', '')}")
            lines += describe_fields(type(value), prefix + f.name + ".")
        else:
            lines.append(f"  {prefix}{f.name} = {value!r}  # {f.metadata.get('doc', '')}")
    return lines
