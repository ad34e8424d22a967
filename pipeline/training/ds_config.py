"""The DeepSpeed JSON: ZeRO stage and precision come from it; batch and optimiser fields are filled from the
recipe (where the JSON says "auto" or leaves them out) or must agree with it, so the two never disagree.
"""
from __future__ import annotations

import json
import os

from pipeline.training.config import BatchPlan, ConfigError, RunConfig

DS_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "ds_configs")
# DeepSpeed's own optimiser and scheduler sections: we build both from the recipe (one source of truth).
_OPTIMIZER_KEYS = {"lr": "optimizer.lr", "betas": "optimizer.betas", "eps": "optimizer.eps",
                   "weight_decay": "optimizer.weight_decay"}


def _as_floats(v):
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v)


def load_ds_config(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        shipped = sorted(os.listdir(DS_CONFIG_DIR)) if os.path.isdir(DS_CONFIG_DIR) else []
        raise ConfigError(path, [f"no such DeepSpeed config (shipped in ds_configs/: "
                                 f"{', '.join(s for s in shipped if s.endswith('.json'))})"]) from None
    except json.JSONDecodeError as e:
        raise ConfigError(path, [f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"]) from None


def precision(ds: dict) -> str:
    """'bf16', 'fp16' or 'fp32': the dtype the student computes in."""
    if ds.get("bf16", {}).get("enabled") or (ds.get("torch_autocast", {}).get("enabled")
                                              and ds["torch_autocast"].get("dtype") in ("bfloat16", "bf16")):
        return "bf16"
    if ds.get("fp16", {}).get("enabled") or (ds.get("torch_autocast", {}).get("enabled")
                                              and ds["torch_autocast"].get("dtype") in ("float16", "fp16")):
        return "fp16"
    return "fp32"


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") == "cpu"


def finalize_ds_config(ds: dict, cfg: RunConfig, plan: BatchPlan, *, on_gpu: bool, source: str) -> dict:
    """Fill the JSON from the recipe and the batch plan, or report every disagreement at once."""
    ds = json.loads(json.dumps(ds))  # deep copy
    problems: list[str] = []

    def fill(key, value, recipe_key):
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = value
        elif have != value:
            problems.append(f"{key} is {have!r} but the recipe gives {value!r} ({recipe_key}); set it to \"auto\" "
                            f"or remove it so the recipe fills it")

    fill("train_batch_size", plan.global_size, "batch.global_size")
    fill("train_micro_batch_size_per_gpu", plan.micro_size, "batch.micro_size")
    fill("gradient_accumulation_steps", plan.accumulation,
         f"batch.global_size / (batch.micro_size x world size {plan.world_size})")
    fill("gradient_clipping", float(cfg.optimizer.grad_clip), "optimizer.grad_clip")

    if "optimizer" in ds:  # allowed only when it says what the recipe says; we build the optimiser ourselves
        opt = ds.pop("optimizer")
        kind = str(opt.get("type", "")).lower()
        want = {"adamw": ("adamw", "adam"), "lamb": ("lamb",)}[cfg.optimizer.name]
        if kind not in want:
            problems.append(f"optimizer.type is {opt.get('type')!r} but the recipe's optimizer.name is "
                            f"{cfg.optimizer.name!r}; remove the \"optimizer\" section (the recipe sets it)")
        for k, recipe_key in _OPTIMIZER_KEYS.items():
            have = opt.get("params", {}).get(k, "auto")
            recipe_value = getattr(cfg.optimizer, recipe_key.split(".")[1])
            if have != "auto" and _as_floats(have) != _as_floats(recipe_value):
                problems.append(f"optimizer.params.{k} is {have!r} but the recipe's {recipe_key} is "
                                f"{recipe_value!r}; remove it from the DeepSpeed config (the recipe sets it)")
    if "scheduler" in ds:
        problems.append("\"scheduler\" section: remove it; the recipe's schedule.* keys define the learning-rate "
                        "schedule")

    prec = precision(ds)
    stage = zero_stage(ds)
    if prec == "fp16" and not on_gpu:
        problems.append("fp16 is not supported by DeepSpeed on CPU; use a bf16 or fp32 config (e.g. "
                        "ds_configs/zero2_bf16.json)")
    if prec == "bf16" and ds.get("bf16", {}).get("enabled"):
        if stage == 0:
            problems.append("bf16.enabled with ZeRO stage 0 accumulates gradients in bf16 in DeepSpeed; use "
                            "\"torch_autocast\": {\"enabled\": true, \"dtype\": \"bfloat16\"} instead "
                            "(ds_configs/zero0_bf16.json)")
        accum = ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        if accum != "fp32":
            problems.append(f"data_types.grad_accum_dtype is {accum!r}: bf16 runs must accumulate gradients in fp32")
    if cfg.train.nonfinite == "skip":
        # The update is dropped by DeepSpeed's overflow check: the ZeRO optimisers (and fp16) have one, and it
        # looks at the global gradient norm, so every rank skips together. Stage 0 in fp32/bf16 has none.
        if stage == 0 and prec != "fp16" or (prec == "fp16" and ds.get("torch_autocast", {}).get("enabled")):
            problems.append("train.nonfinite=skip needs DeepSpeed to skip non-finite steps, which it does with ZeRO "
                            "stage >= 1 (or DeepSpeed fp16); use a ZeRO config or train.nonfinite=stop")
        if ds.get("bf16", {}).get("check_grad_overflow") is False:
            problems.append("bf16.check_grad_overflow=false: DeepSpeed would apply non-finite updates; remove it or "
                            "set train.nonfinite=stop")
    if cfg.optimizer.name == "lamb" and stage > 0:
        problems.append(f"optimizer.name=lamb with ZeRO stage {stage}: ZeRO flattens parameters, which breaks LAMB's "
                        "per-layer trust ratio; use optimizer.name=adamw or a stage-0 config")
    if offloads_optimizer(ds) and cfg.optimizer.name != "adamw":
        problems.append("offload_optimizer needs optimizer.name=adamw (DeepSpeedCPUAdam)")
    if stage > 0:
        ds["zero_allow_untested_optimizer"] = True  # torch AdamW on CPU; DeepSpeed's fused ones are known to it
    if stage == 3:
        ds.setdefault("zero_optimization", {}).setdefault("stage3_gather_16bit_weights_on_model_save", True)
    ds.setdefault("steps_per_print", 10 ** 9)  # our own logger reports; DeepSpeed's would repeat it per rank
    ds.setdefault("wall_clock_breakdown", False)
    if problems:
        raise ConfigError(source, problems)
    return ds
