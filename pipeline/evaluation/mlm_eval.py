"""Masked-LM evaluation of Hugging Face checkpoints on a prepared split, with the trainer's fixed masks."""
from __future__ import annotations

import torch

from pipeline.data import PreparedDataset
from pipeline.data.loader import EvalBatches
from pipeline.data.masking import Masker
from pipeline.data.sequences import SequenceDataset
from pipeline.models import load_teacher
from pipeline.tokenization import load_tokenizer
from pipeline.training.config import LossConfig
from pipeline.training.evaluate import evaluate


def eval_batches(data: PreparedDataset, *, seq_len: int, mode: str, n_samples: int, batch_size: int) -> EvalBatches:
    s = data.special_ids
    seqs = SequenceDataset(data, seq_len, mode, cls_id=s["cls"], sep_id=s["sep"], pad_id=s["pad"])
    masker = Masker(data.vocab_size, [v for v in s.values() if v is not None], s["mask"], s["pad"])
    # EvalBatches masks with its own fixed seed: the same masks as the trainer's held-out evaluation.
    return EvalBatches(seqs, masker, n_samples=n_samples, micro_batch=batch_size, rank=0, world_size=1)


def evaluate_models(models: list[str], *, data: str, split: str = "valid", teacher: str | None = None,
                    seq_len: int = 128, mode: str = "packed", n_samples: int = 512, batch_size: int = 16,
                    device: str | None = None) -> list[dict]:
    """One row per model: MLM loss, perplexity, accuracy on masked tokens, agreement with `teacher`."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ds = PreparedDataset(data, split, verify="size")
    batches = eval_batches(ds, seq_len=seq_len, mode=mode, n_samples=n_samples, batch_size=batch_size)
    names = ([teacher] if teacher and teacher not in models else []) + list(models)
    ref = None
    if teacher:
        ds.check_tokenizer(load_tokenizer(teacher))  # before loading any weights
        ref = load_teacher(teacher, device=device)
    rows = []
    for name in names:
        if name != teacher:  # ids must mean the same words for every model (the teacher was checked above)
            ds.check_tokenizer(load_tokenizer(name))
        model = ref if name == teacher else load_teacher(name, device=device)
        with_ref = ref is not None and name != teacher
        cfg = LossConfig(kd=1.0 if with_ref else 0.0, mlm=1.0, cos=0.0, mse=0.0, kd_tokens="masked")
        out = evaluate(model, ref if with_ref else None, batches, cfg, device)
        rows.append({"model": name, "mlm_loss": out["eval/student_mlm_loss"],
                     "perplexity": out["eval/student_perplexity"], "mlm_acc": out["eval/student_mlm_acc"],
                     "agreement": out.get("eval/agreement") if with_ref else (1.0 if name == teacher else None),
                     "kd_loss": out.get("eval/kd_loss"), "masked_tokens": int(out["eval/masked_tokens"]),
                     "sequences": batches.n_samples,
                     "parameters": sum(p.numel() for p in model.parameters())})
    return rows
