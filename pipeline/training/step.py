"""One distillation micro-step: teacher forward under inference mode, student forward through the DeepSpeed engine,
the fp32 losses, and the few on-device counters logged later (no host sync here)."""
from __future__ import annotations

import torch

from pipeline.losses.chunked import chunked_kd_loss
from pipeline.losses.distill import LossTerms, cosine_loss, distillation_loss

# Order of the on-device counters summed over micro-steps and ranks between two log lines.
COUNTERS = ("micro_steps", "loss", "kd", "mlm", "cos", "mse", "tokens", "masked", "student_correct",
            "teacher_correct", "agree", "student_mlm", "teacher_mlm")


def rows_for(batch: dict, loss_cfg, with_teacher: bool) -> torch.Tensor:
    """Which tokens get logits: every non-pad token when the KD term covers all tokens, else the masked ones
    (and the teacher-free run only ever needs masked-token logits)."""
    if with_teacher and loss_cfg.kd_tokens == "all":
        return batch["attention_mask"].bool()
    return batch["labels"] != -100


@torch.no_grad()
def teacher_rows(teacher, input_ids, attention_mask, rows):
    """The teacher's last hidden states on `rows` and their MLM transform, as ordinary tensors.

    The encoder runs under inference mode (no autograd records, the cheapest path); its output rows are cloned out of
    inference mode (autograd refuses inference tensors in the loss's backward), then the small MLM transform runs
    under no_grad on those rows only: the teacher never works on tokens the loss ignores.
    """
    with torch.inference_mode():
        hidden = teacher.encode(input_ids, attention_mask)[rows]
    hidden = hidden.clone()
    return hidden, teacher.transform(hidden)


@torch.no_grad()
def teacher_outputs(teacher, input_ids, attention_mask, rows):
    """The teacher's last hidden states and full-vocabulary logits on `rows` (the plain loss's inputs)."""
    hidden, transformed = teacher_rows(teacher, input_ids, attention_mask, rows)
    return hidden, teacher.logits(transformed)


def uses_chunked_loss(loss_cfg, with_teacher: bool) -> bool:
    """The fused chunked loss serves KD (+ MLM) against a teacher; a teacher-free run only builds logits for the
    masked rows anyway, and the MSE term needs full logits (refused by the config with a chunk size)."""
    return with_teacher and loss_cfg.chunk_size > 0 and loss_cfg.kd > 0 and loss_cfg.mse == 0


def forward_losses(engine, teacher, batch: dict, loss_cfg, eval_stats: bool = False) -> tuple[LossTerms, dict]:
    """Losses of one micro-batch and its on-device counters. `eval_stats` adds the per-token CE sums of student and
    teacher, which only held-out evaluation reports (training logs the loss terms themselves)."""
    with_teacher = teacher is not None
    rows = rows_for(batch, loss_cfg, with_teacher)
    if uses_chunked_loss(loss_cfg, with_teacher):
        return _chunked_forward_losses(engine, teacher, batch, rows, loss_cfg, eval_stats)
    am = batch["attention_mask"]
    s_hidden, s_logits = engine(batch["input_ids"], am, rows)
    s_rows = s_hidden[rows]
    labels = batch["labels"][rows]
    t_hidden = t_logits = None
    if with_teacher:
        t_hidden, t_logits = teacher_outputs(teacher, batch["input_ids"], am, rows)
    terms = distillation_loss(student_logits=s_logits, labels=labels, student_hidden=s_rows, teacher_hidden=t_hidden,
                              teacher_logits=t_logits, weights=loss_cfg, temperature=loss_cfg.temperature)
    with torch.no_grad():
        masked = labels != -100
        gold = labels[masked]
        s_masked = s_logits[masked]
        s_pred = s_masked.argmax(-1)
        stats = {"tokens": am.sum(), "masked": masked.sum(), "student_correct": (s_pred == gold).sum()}
        if eval_stats and gold.numel():
            stats["student_mlm"] = torch.nn.functional.cross_entropy(s_masked.float(), gold, reduction="sum")
        if with_teacher:
            t_masked = t_logits[masked]
            t_pred = t_masked.argmax(-1)
            stats["teacher_correct"] = (t_pred == gold).sum()
            stats["agree"] = (t_pred == s_pred).sum()
            if eval_stats and gold.numel():
                stats["teacher_mlm"] = torch.nn.functional.cross_entropy(t_masked.float(), gold, reduction="sum")
    return terms, stats


def _chunked_forward_losses(engine, teacher, batch, rows, loss_cfg, eval_stats):
    """The same losses and counters through `chunked_kd_loss`: neither model's [rows, V] logits ever exist whole.

    The teacher runs its encoder and MLM transform on the covered rows only; the student's transformed rows go
    through the chunked KD + MLM loss inside the engine's forward (MaskedLM's `head`), which reads the decoder
    weight and bias there (gathered under ZeRO-3 as external parameters). One pair of decoder products per chunk:
    the gradient built is that of kd_weight * kd + mlm_weight * mlm, the same weights as the total loss below."""
    am = batch["attention_mask"]
    labels = batch["labels"][rows]
    t_hidden, t_transformed = teacher_rows(teacher, batch["input_ids"], am, rows)

    def head(s_transformed, weight, bias):
        return chunked_kd_loss(s_transformed, t_transformed, weight, bias, teacher.decoder_weight,
                               teacher.decoder_bias, loss_cfg.temperature, labels, loss_cfg.chunk_size,
                               kd_weight=loss_cfg.kd, mlm_weight=loss_cfg.mlm,
                               compiled=loss_cfg.compile_chunks and s_transformed.is_cuda)

    s_hidden, (kd, mlm, cstats) = engine(batch["input_ids"], am, rows, head=head)
    terms = LossTerms(total=loss_cfg.kd * kd, kd=kd)  # fp32 (fp64 for an fp64 model)
    if loss_cfg.mlm > 0:
        terms.mlm = mlm
        terms.total = terms.total + loss_cfg.mlm * terms.mlm
    if loss_cfg.cos > 0:
        terms.cos = cosine_loss(s_hidden[rows], t_hidden)
        terms.total = terms.total + loss_cfg.cos * terms.cos
    stats = {"tokens": am.sum(), **{k: cstats[k] for k in ("masked", "student_correct", "teacher_correct", "agree")}}
    if eval_stats:
        stats["student_mlm"], stats["teacher_mlm"] = cstats["student_mlm"], cstats["teacher_mlm"]
    return terms, stats


class Counters:
    """Sums kept on the device between log lines; one all-reduce and one host copy per log line."""

    def __init__(self, device):
        self.device = device
        self.values = torch.zeros(len(COUNTERS), dtype=torch.float64, device=device)

    def add(self, terms: LossTerms, stats: dict) -> None:
        v = self.values
        v[0] += 1
        v[1] += terms.total.detach().double()
        for i, name in enumerate(("kd", "mlm", "cos", "mse"), start=2):
            t = getattr(terms, name)
            if t is not None:
                v[i] += t.detach().double()
        for name, x in stats.items():
            v[COUNTERS.index(name)] += x.double()

    def reduce_and_reset(self, all_reduce) -> dict:
        v = all_reduce(self.values.clone())
        out = dict(zip(COUNTERS, v.tolist()))  # host sync: once per log interval
        self.values.zero_()
        return out
