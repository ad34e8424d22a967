"""The student: built from the teacher (the DistilBERT construction), at random, or from a checkpoint.

    student = build_student(teacher=teacher)                                  # DistilBERT: 6 of 12 layers
    student = build_student(teacher=teacher, arch="bert", layers=[0, 5, 11])  # a 3-layer BERT
    student = build_student(init="random", n_layers=6, hidden_size=768, n_heads=12, vocab_size=30522)
    student = build_student(init="pretrained", pretrained="path/to/encoder")  # a new head if it has none

Every student is a MaskedLM in train mode whose `.hf.save_pretrained(dir)` loads back with
AutoModelForMaskedLM.from_pretrained(dir).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from .mlm import MaskedLM, ModelLoadError, load_hf_masked_lm

log = logging.getLogger(__name__)

ARCHS = ("distilbert", "bert")
INITS = ("teacher", "random", "pretrained")
DISTILBERT_LAYER_NORM_EPS = 1e-12  # hard-coded in transformers' DistilBERT, not a config field


def default_layer_map(n_teacher_layers: int, n_student_layers: int) -> list[int]:
    """Teacher layer to copy into each student layer: spread evenly from the first teacher layer to the last,
    student layer i <- round_half_up(i * (T - 1) / (S - 1)). For 12 -> 6 this is DistilBERT's own choice,
    [0, 2, 4, 7, 9, 11]; 12 -> 4 gives [0, 4, 7, 11], 6 -> 3 gives [0, 3, 5]. Keeping both ends keeps the
    layer that reads the embeddings and the one whose output the MLM head was trained on. One student layer
    gets teacher layer 0, the one that reads the embeddings the student keeps."""
    t, s = int(n_teacher_layers), int(n_student_layers)
    if not 1 <= s <= t:
        raise ValueError(f"a student of {s} layers cannot be taken from a teacher of {t}: need 1 <= {s} <= {t}")
    if s == 1:
        return [0]
    # exact integer form of floor(i * (t - 1) / (s - 1) + 1/2): no float ties, no banker's rounding
    return [(2 * i * (t - 1) + (s - 1)) // (2 * (s - 1)) for i in range(s)]


def build_student(*, arch: str | None = None, init: str = "teacher", teacher: MaskedLM | None = None,
                  layers: Sequence[int] | None = None, n_layers: int | None = None, hidden_size: int | None = None,
                  n_heads: int | None = None, ffn_size: int | None = None, vocab_size: int | None = None,
                  max_position: int | None = None, dropout: float = 0.1, attention_dropout: float = 0.1,
                  pretrained: str | None = None, seed: int = 0) -> MaskedLM:
    """Build the student, in train mode, with `dropout` (hidden) and `attention_dropout` in its config.

    arch: "distilbert" (default) or "bert"; with init "pretrained" the checkpoint's own architecture is kept
        (a different arch given there is ignored with a warning).
    init "teacher": the DistilBERT construction from `teacher`: its embeddings, layers `layers` (default
        default_layer_map(T, n_layers or T // 2)), MLM transform and decoder bias; the decoder weight is
        tied to the word embeddings. BERT's token-type embedding 0 is folded into a DistilBERT student's
        position embeddings, so the student's embedding output equals the teacher's exactly. Sizes, when
        given, must equal the teacher's, except `max_position`, which may shorten the position table.
        The student is built in fp32 on the CPU whatever the teacher's device; build it from an fp32
        teacher (a bf16 teacher's weights are already rounded) and load the bf16 teacher for training.
    init "random": seeded random weights with the given sizes, any size not given taken from `teacher`;
        n_layers, hidden_size, n_heads and vocab_size are needed (ffn_size defaults to 4 x hidden,
        max_position to 512, n_layers with a teacher to half its layers).
    init "pretrained": `pretrained` (folder or hub name) via AutoModelForMaskedLM; an MLM head missing from
        the checkpoint (a bare encoder) is initialised fresh under `seed`, with a warning naming it.
    Raises ValueError listing every problem with the arguments at once.
    """
    problems = []
    if init not in INITS:
        problems.append(f"init must be one of {INITS}, not {init!r}")
    if arch is not None and arch not in ARCHS:
        problems.append(f"arch must be one of {ARCHS}, not {arch!r}")
    for name, p in (("dropout", dropout), ("attention_dropout", attention_dropout)):
        if not 0.0 <= p < 1.0:
            problems.append(f"{name} must be in [0, 1), not {p}")
    if teacher is not None and not isinstance(teacher, MaskedLM):
        teacher = MaskedLM(teacher)
    if problems:
        _fail(problems)
    sizes = dict(n_layers=n_layers, hidden_size=hidden_size, n_heads=n_heads, ffn_size=ffn_size,
                 vocab_size=vocab_size, max_position=max_position)
    if init == "teacher":
        model = _from_teacher(arch or "distilbert", teacher, layers, sizes, dropout, attention_dropout, seed)
    elif init == "random":
        model = _random(arch or "distilbert", teacher, layers, sizes, dropout, attention_dropout, seed)
    else:
        model = _pretrained(arch, teacher, layers, sizes, pretrained, dropout, attention_dropout, seed)
    return model.train()


def _fail(problems: list[str]):
    raise ValueError("cannot build the student:\n  - " + "\n  - ".join(problems))


def dims_of(config) -> dict:
    """The sizes of a BERT/RoBERTa or DistilBERT config under one set of names."""
    if config.model_type == "distilbert":
        return dict(n_layers=config.n_layers, hidden_size=config.dim, n_heads=config.n_heads,
                    ffn_size=config.hidden_dim, vocab_size=config.vocab_size,
                    max_position=config.max_position_embeddings, activation=config.activation,
                    layer_norm_eps=DISTILBERT_LAYER_NORM_EPS, pad_token_id=config.pad_token_id,
                    initializer_range=config.initializer_range, type_vocab_size=None)
    return dict(n_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                n_heads=config.num_attention_heads, ffn_size=config.intermediate_size,
                vocab_size=config.vocab_size, max_position=config.max_position_embeddings,
                activation=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
                pad_token_id=config.pad_token_id, initializer_range=config.initializer_range,
                type_vocab_size=config.type_vocab_size)


def _new_model(arch: str, d: dict, dropout: float, attention_dropout: float, seed: int) -> MaskedLM:
    """An HF masked LM of `arch` with sizes `d`, its random init seeded without disturbing the global RNG."""
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    common = dict(vocab_size=d["vocab_size"], max_position_embeddings=d["max_position"],
                  pad_token_id=d.get("pad_token_id", 0), initializer_range=d.get("initializer_range", 0.02),
                  tie_word_embeddings=True)
    if arch == "distilbert":
        config = DistilBertConfig(n_layers=d["n_layers"], dim=d["hidden_size"], n_heads=d["n_heads"],
                                  hidden_dim=d["ffn_size"], activation=d.get("activation", "gelu"),
                                  dropout=dropout, attention_dropout=attention_dropout, sinusoidal_pos_embds=False,
                                  **common)
        cls = DistilBertForMaskedLM
    else:
        config = BertConfig(num_hidden_layers=d["n_layers"], hidden_size=d["hidden_size"],
                            num_attention_heads=d["n_heads"], intermediate_size=d["ffn_size"],
                            hidden_act=d.get("activation", "gelu"), hidden_dropout_prob=dropout,
                            attention_probs_dropout_prob=attention_dropout,
                            layer_norm_eps=d.get("layer_norm_eps", 1e-12),
                            type_vocab_size=d.get("type_vocab_size") or 2, **common)
        cls = BertForMaskedLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MaskedLM(cls(config))


def _resolve_layers(layers, n_layers, n_teacher: int, problems: list[str]) -> list[int]:
    if layers is None:
        n = n_layers if n_layers is not None else max(1, n_teacher // 2)
        if not 1 <= n <= n_teacher:
            problems.append(f"n_layers={n}: a student from a {n_teacher}-layer teacher needs 1..{n_teacher} layers")
            return []
        return default_layer_map(n_teacher, n)
    layers = [int(i) for i in layers]
    if not layers:
        problems.append("layers is empty: give at least one teacher layer index")
    if n_layers is not None and n_layers != len(layers):
        problems.append(f"layers {layers} has {len(layers)} entries but n_layers={n_layers}")
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad:
        problems.append(f"layers {layers}: {bad} out of range for a {n_teacher}-layer teacher (0..{n_teacher - 1})")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        problems.append(f"layers {layers} must be strictly increasing (each teacher layer once, in order)")
    return layers


def _from_teacher(arch, teacher, layers, sizes, dropout, attention_dropout, seed) -> MaskedLM:
    if teacher is None:
        _fail(["init 'teacher' needs a teacher (or use init 'random' / 'pretrained')"])
    if teacher.family.name not in ("bert", "distilbert"):
        _fail([f"init 'teacher' copies from BERT or DistilBERT teachers, not {teacher.family.name}: its "
               f"padding-dependent position ids have no DistilBERT equivalent; use init 'random'"])
    t = dims_of(teacher.config)
    problems = []
    for key in ("hidden_size", "n_heads", "ffn_size", "vocab_size"):
        if sizes[key] is not None and sizes[key] != t[key]:
            problems.append(f"{key}={sizes[key]} differs from the teacher's {t[key]}: init 'teacher' copies "
                            f"the teacher's weights, so the sizes must match (or use init 'random')")
    if sizes["max_position"] is not None and not 1 <= sizes["max_position"] <= t["max_position"]:
        problems.append(f"max_position={sizes['max_position']} must be 1..{t['max_position']} (the teacher's)")
    if not isinstance(t["activation"], str):
        problems.append("the teacher's activation is not a named function and cannot be written to a config")
    if arch == "distilbert" and t["layer_norm_eps"] != DISTILBERT_LAYER_NORM_EPS:
        problems.append(f"the teacher's layer_norm_eps {t['layer_norm_eps']} differs from DistilBERT's fixed "
                        f"{DISTILBERT_LAYER_NORM_EPS}: use arch 'bert' for an exact copy")
    layers = _resolve_layers(layers, sizes["n_layers"], t["n_layers"], problems)
    if problems:
        _fail(problems)

    d = {**t, "n_layers": len(layers), "max_position": sizes["max_position"] or t["max_position"]}
    student = _new_model(arch, d, dropout, attention_dropout, seed)
    with torch.no_grad():
        _copy_embeddings(teacher, student, d["max_position"])
        for i, j in enumerate(layers):
            for part in student.family.layer_parts:
                _copy_module(teacher.layers[j].get_submodule(teacher.family.layer_parts[part]),
                             student.layers[i].get_submodule(student.family.layer_parts[part]))
        for part in ("head_dense", "head_norm"):
            _copy_module(teacher.hf.get_submodule(getattr(teacher.family, part)),
                         student.hf.get_submodule(getattr(student.family, part)))
        student.decoder_bias.copy_(teacher.decoder_bias)
    if student.decoder_weight is not student.word_embeddings.weight:
        raise RuntimeError("the student's decoder is not tied to its word embeddings")  # a transformers change
    if not torch.equal(teacher.decoder_weight, teacher.word_embeddings.weight):
        log.warning("the teacher's decoder weight is not tied to its word embeddings; the student's decoder is "
                    "tied to the copied word embeddings, so its logits start away from the teacher's")
    log.info("student %s: %d layers from teacher layers %s", arch, len(layers), layers)
    return student


def _copy_module(src: nn.Module, dst: nn.Module):
    for name, p in dst.named_parameters(recurse=False):
        p.copy_(getattr(src, name))


def _copy_embeddings(teacher: MaskedLM, student: MaskedLM, max_position: int):
    tf, sf = teacher.family, student.family
    t, s = teacher.hf.get_submodule, student.hf.get_submodule
    s(sf.word).weight.copy_(t(tf.word).weight)
    _copy_module(t(tf.emb_norm), s(sf.emb_norm))
    position = t(tf.position).weight[:max_position].float()
    if tf.token_type is not None and sf.token_type is None:
        # BERT adds token_type_embeddings[0] to every token (token types are never used here); a DistilBERT
        # student has no token types, so the constant moves into its position table (summed in fp32).
        position = position + t(tf.token_type).weight[0].float()
    s(sf.position).weight.copy_(position)
    if sf.token_type is not None:
        if tf.token_type is not None:
            s(sf.token_type).weight.copy_(t(tf.token_type).weight)
        else:  # from a DistilBERT teacher: adding type 0 must change nothing
            s(sf.token_type).weight.zero_()


def _random(arch, teacher, layers, sizes, dropout, attention_dropout, seed) -> MaskedLM:
    problems = []
    if layers is not None:
        problems.append("layers only applies to init 'teacher' (a random student copies no layers)")
    d = dict(sizes)
    t = dims_of(teacher.config) if teacher is not None else None
    if t is not None:
        if d["n_layers"] is None:
            d["n_layers"] = max(1, t["n_layers"] // 2)
        for key in ("hidden_size", "n_heads", "ffn_size", "vocab_size", "max_position"):
            if d[key] is None:
                d[key] = t[key]
        if d["vocab_size"] != t["vocab_size"]:
            problems.append(f"vocab_size={d['vocab_size']} differs from the teacher's {t['vocab_size']}: "
                            f"distillation compares logits over the same vocabulary")
        d.update(activation=t["activation"], pad_token_id=t["pad_token_id"],
                 initializer_range=t["initializer_range"], layer_norm_eps=t["layer_norm_eps"])
    missing = [k for k in ("n_layers", "hidden_size", "n_heads", "vocab_size") if d[k] is None]
    if missing:
        problems.append(f"init 'random' without a teacher needs {', '.join(missing)}")
    if d["hidden_size"] is not None and d["n_heads"] and d["hidden_size"] % d["n_heads"]:
        problems.append(f"hidden_size={d['hidden_size']} is not a multiple of n_heads={d['n_heads']}")
    for key in ("n_layers", "hidden_size", "n_heads", "ffn_size", "vocab_size", "max_position"):
        if d[key] is not None and d[key] < 1:
            problems.append(f"{key}={d[key]} must be positive")
    if problems:
        _fail(problems)
    d["ffn_size"] = d["ffn_size"] or 4 * d["hidden_size"]
    d["max_position"] = d["max_position"] or 512
    return _new_model(arch, d, dropout, attention_dropout, seed)


def _pretrained(arch, teacher, layers, sizes, pretrained, dropout, attention_dropout, seed) -> MaskedLM:
    problems = []
    if not pretrained:
        problems.append("init 'pretrained' needs pretrained= a folder or hub name")
    if layers is not None:
        problems.append("layers only applies to init 'teacher' (a pretrained student keeps its own layers)")
    if problems:
        _fail(problems)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the fresh head, if any, is initialised under this seed
        hf, missing_head, missing_other = load_hf_masked_lm(pretrained, dropout=(dropout, attention_dropout))
    if missing_other:
        raise ModelLoadError(f"{pretrained!r} is missing encoder weights ({len(missing_other)}, e.g. "
                             f"{', '.join(missing_other[:4])}); they would start random")
    model = MaskedLM(hf)
    d = dims_of(model.config)
    if arch is not None and arch != model.family.name:
        # a warning, not an error: run configs carry an arch (default distilbert) whatever the init
        log.warning("arch=%r ignored: %s is a %s model and init 'pretrained' keeps the checkpoint's architecture",
                    arch, pretrained, model.family.name)
    for key, value in sizes.items():
        if value is not None and value != d[key]:
            problems.append(f"{key}={value} differs from the checkpoint's {d[key]}; leave it unset")
    if teacher is not None and d["vocab_size"] != teacher.config.vocab_size:
        problems.append(f"{pretrained!r} has vocab_size {d['vocab_size']} but the teacher "
                        f"{teacher.config.vocab_size}: distillation compares logits over the same vocabulary")
    if problems:
        _fail(problems)
    if missing_head:
        log.warning("%s has no MLM head; initialised fresh (seed %d): %s. Decoder weight tied to the word "
                    "embeddings: %s", pretrained, seed, ", ".join(missing_head),
                    model.decoder_weight is model.word_embeddings.weight)
    return model
