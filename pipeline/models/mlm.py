"""One interface over Hugging Face masked LMs (BERT, DistilBERT, RoBERTa), so the losses and the trainer never
branch on the architecture.

    model = MaskedLM(BertForMaskedLM.from_pretrained(...))
    hidden, logits = model(input_ids, attention_mask, positions=masked)   # logits only where `masked`
    model.encode(ids); model.transform(h); model.logits(t)                # the three stages, for chunked losses

The stages exist separately because a distillation loss wants the last hidden state (cosine loss) and may
want to compute logits in chunks from the transformed states instead of holding tokens x vocab at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class ModelLoadError(RuntimeError):
    """A checkpoint could not be loaded as a usable masked LM; the message says which path and what to do."""


@dataclass(frozen=True)
class Family:
    """Where an architecture keeps the parts we read and copy: dotted submodule paths inside the HF model.

    Layer parts use common names (q, k, v, o, attn_norm, ffn_in, ffn_out, out_norm) so the student builder
    can copy between architectures without knowing either one's spelling.
    """

    name: str
    encoder: str
    layers: str
    word: str
    position: str
    token_type: str | None
    emb_norm: str
    head_dense: str
    head_norm: str
    decoder: str
    layer_parts: dict[str, str]


_BERT_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
               "o": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
               "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "out_norm": "output.LayerNorm"}

FAMILIES = {
    "bert": Family("bert", encoder="bert", layers="bert.encoder.layer",
                   word="bert.embeddings.word_embeddings", position="bert.embeddings.position_embeddings",
                   token_type="bert.embeddings.token_type_embeddings", emb_norm="bert.embeddings.LayerNorm",
                   head_dense="cls.predictions.transform.dense", head_norm="cls.predictions.transform.LayerNorm",
                   decoder="cls.predictions.decoder", layer_parts=_BERT_LAYER),
    "distilbert": Family("distilbert", encoder="distilbert", layers="distilbert.transformer.layer",
                         word="distilbert.embeddings.word_embeddings",
                         position="distilbert.embeddings.position_embeddings", token_type=None,
                         emb_norm="distilbert.embeddings.LayerNorm", head_dense="vocab_transform",
                         head_norm="vocab_layer_norm", decoder="vocab_projector",
                         layer_parts={"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin",
                                      "o": "attention.out_lin", "attn_norm": "sa_layer_norm", "ffn_in": "ffn.lin1",
                                      "ffn_out": "ffn.lin2", "out_norm": "output_layer_norm"}),
    # RoBERTa is supported as a teacher only: its position ids depend on padding, which a DistilBERT
    # student cannot reproduce, so the student builder refuses it.
    "roberta": Family("roberta", encoder="roberta", layers="roberta.encoder.layer",
                      word="roberta.embeddings.word_embeddings", position="roberta.embeddings.position_embeddings",
                      token_type="roberta.embeddings.token_type_embeddings", emb_norm="roberta.embeddings.LayerNorm",
                      head_dense="lm_head.dense", head_norm="lm_head.layer_norm", decoder="lm_head.decoder",
                      layer_parts=_BERT_LAYER),
}

# HF masked-LM class name -> family. Matched by exact class name, not isinstance, so a subclass with other
# module names (XLM-R, CamemBERT, ...) is rejected instead of half-working.
_CLASS_FAMILY = {"BertForMaskedLM": "bert", "DistilBertForMaskedLM": "distilbert", "RobertaForMaskedLM": "roberta"}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


class MaskedLM(nn.Module):
    """Wraps a Hugging Face BertForMaskedLM, DistilBertForMaskedLM or RobertaForMaskedLM (the `.hf` attribute)
    and exposes the parts a distillation loss needs: the final hidden states, the MLM transform, and the
    decoder (weight + bias).

    Every stage runs through the HF submodules' own forward calls, never through a bare read of `.weight`,
    so DeepSpeed ZeRO-3's per-module hooks gather the partitioned parameters when the engine wraps this
    module. The `decoder_weight`/`decoder_bias` properties are for code outside the engine's forward (or
    inside `deepspeed.zero.GatheredParameters`): under ZeRO-3 they are empty placeholders otherwise.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        name = type(hf_model).__name__
        if name not in _CLASS_FAMILY:
            raise TypeError(f"MaskedLM supports {', '.join(_CLASS_FAMILY)}; got {name}")
        self.hf = hf_model
        self.family = FAMILIES[_CLASS_FAMILY[name]]
        self.unpad = False  # see enable_unpadding
        # Parts are looked up by name, never stored as attributes: an nn.Module attribute registers a second
        # path to the same weights, which would repeat them in state_dict() (and in every checkpoint).

    @property
    def _encoder(self) -> nn.Module:
        return self.hf.get_submodule(self.family.encoder)

    @property
    def _decoder(self) -> nn.Linear:
        return self.hf.get_submodule(self.family.decoder)

    @property
    def config(self):
        return self.hf.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.get_submodule(self.family.layers)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.hf.get_submodule(self.family.word)

    @property
    def decoder_weight(self) -> Tensor:
        """[V, H]; the word embeddings when tied (the default for every model built here)."""
        return self._decoder.weight

    @property
    def decoder_bias(self) -> Tensor:
        """[V]; the same Parameter as BERT's `cls.predictions.bias` (HF ties the two)."""
        return self._decoder.bias

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Last hidden state [B, L, H], before the MLM head. Token types are never passed: BERT's are all 0."""
        if attention_mask is not None and bool(attention_mask.all()):
            # No padding: without a mask SDPA may use its fused (flash / memory-efficient) kernels. The check
            # syncs with the device once; transformers 5 makes the same check itself when given a mask, so
            # this costs nothing extra there and keeps the fast path on versions and backends that do not.
            attention_mask = None
        if attention_mask is not None and self.unpad:
            return self._encode_unpadded(input_ids, attention_mask)
        return self._encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def enable_unpadding(self) -> None:
        """Run padded batches unpadded from now on (pipeline/models/varlen.py): the real tokens packed into one
        sequence, attention per document (FlashAttention varlen on CUDA in bf16/fp16), the output scattered back
        to [B, L, H] with zeros on padding. Batches without padding run as before."""
        from . import varlen

        name = varlen.register()
        if hasattr(self.hf, "set_attn_implementation"):
            self.hf.set_attn_implementation(name)
        else:
            self.hf.config._attn_implementation = name
        self.unpad = True

    def _encode_unpadded(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        from .varlen import pack, unpack

        p = pack(input_ids, attention_mask)
        position_ids = p["position_ids"]  # BERT, DistilBERT: the token's column, as in the padded forward
        if self.family.name == "roberta":  # RoBERTa numbers the real tokens from padding_idx + 1
            rank = (attention_mask.long().cumsum(1) - 1).reshape(-1)[p["index"]]
            position_ids = (rank + self.config.pad_token_id + 1).unsqueeze(0)
        kwargs = dict(input_ids=p["input_ids"], position_ids=position_ids, cu_seq_lens_q=p["cu_seqlens"],
                      cu_seq_lens_k=p["cu_seqlens"], max_length_q=p["max_len"], max_length_k=p["max_len"])
        if self.family.name != "distilbert":
            # the token-type buffer only covers max_position tokens, and T (the batch's real tokens) is more
            kwargs["token_type_ids"] = torch.zeros_like(p["input_ids"])
        hidden = self._encoder(**kwargs).last_hidden_state
        return unpack(hidden, p["index"], tuple(input_ids.shape))

    def transform(self, hidden: Tensor) -> Tensor:
        """MLM head transform: dense -> activation -> LayerNorm, shape unchanged."""
        if self.family.name == "bert":
            return self.hf.cls.predictions.transform(hidden)
        if self.family.name == "distilbert":
            return self.hf.vocab_layer_norm(self.hf.activation(self.hf.vocab_transform(hidden)))
        head = self.hf.lm_head  # roberta: gelu is a plain function there, with no parameters to gather
        return head.layer_norm(nn.functional.gelu(head.dense(hidden)))

    def logits(self, transformed: Tensor) -> Tensor:
        """transformed @ W.T + b through the decoder Linear itself (so ZeRO-3 gathers W and b)."""
        return self._decoder(transformed)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                positions: Tensor | None = None, head=None):
        """Returns (hidden [B, L, H], logits). `positions` limits the logits to some tokens: a bool mask
        [B, L] (or flat [B*L]) or a flat index tensor into the B*L tokens; logits are then [n, V] in
        row-major token order, so MLM-only training does not pay for full-vocabulary logits everywhere.
        Without `positions`, logits are [B, L, V].

        `head(transformed, decoder_weight, decoder_bias)`, if given, replaces the decoder: it gets the MLM
        transform's output on `positions` and the decoder's parameters (a chunked loss builds the logits itself)
        and forward returns (hidden, head's result). It runs inside this forward, so under ZeRO-3 the decoder's
        parameters are gathered when they are registered as this module's external parameters
        (`register_decoder_for_zero3`)."""
        hidden = self.encode(input_ids, attention_mask)
        transformed = self.transform(select_positions(hidden, positions))
        if head is not None:
            return hidden, head(transformed, self.decoder_weight, self.decoder_bias)
        return hidden, self.logits(transformed)

    def enable_activation_checkpointing(self) -> None:
        """Recompute each layer's activations in the backward pass (non-reentrant torch.utils.checkpoint)."""
        hf = self.hf
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def register_decoder_for_zero3(self) -> None:
        """Let ZeRO-3 gather the decoder weight (the tied word embeddings) and bias for this module's whole forward,
        which a `head` reads directly (outside the decoder's own forward and its hooks)."""
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        for p in (self.decoder_weight, self.decoder_bias):
            if p is not None:
                register_external_parameter(self, p)


def select_positions(hidden: Tensor, positions: Tensor | None) -> Tensor:
    """The rows of `hidden` [B, L, H] named by `positions` (see MaskedLM.forward) as [n, H]; all of it if None."""
    if positions is None:
        return hidden
    flat = hidden.reshape(-1, hidden.shape[-1])
    if positions.dtype == torch.bool:
        if positions.shape == hidden.shape[:-1]:
            return hidden[positions]
        if positions.dim() == 1 and positions.numel() == flat.shape[0]:
            return flat[positions]
        raise ValueError(f"bool positions must be [B, L] = {list(hidden.shape[:-1])} or flat [{flat.shape[0]}], "
                         f"not {list(positions.shape)}")
    if positions.dim() != 1 or positions.is_floating_point():
        raise ValueError(f"index positions must be a 1-D integer tensor into the B*L tokens, not "
                         f"{positions.dtype} {list(positions.shape)}")
    return flat.index_select(0, positions)


def _is_local(name_or_path: str) -> bool:
    """Whether the string can only mean a local path: a hub id is 'name' or 'org/name', never absolute,
    never starting with '.' or '~', never with more than one '/'."""
    p = str(name_or_path)
    return (os.path.exists(p) or os.path.isabs(p) or p.startswith((".", "~")) or p.count("/") > 1
            or os.sep != "/" and os.sep in p)


# config keys of (hidden dropout, attention dropout) per model type: the names differ between architectures
DROPOUT_KEYS = {"bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
                "roberta": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
                "distilbert": ("dropout", "attention_dropout")}


def load_hf_masked_lm(name_or_path: str, *, dtype: torch.dtype | None = None,
                      dropout: tuple[float, float] | None = None):
    """Load any masked-LM checkpoint (local folder or hub name) with AutoModelForMaskedLM; `dropout` =
    (hidden, attention) overrides the checkpoint's config before the modules are built.

    Returns (hf_model, missing_head_keys, other_missing_keys). The caller decides whether a missing head is
    an error (a teacher) or something to initialise fresh (a student started from a plain encoder).
    Every failure to find or read the checkpoint becomes a ModelLoadError that says what to do.
    """
    from transformers import AutoConfig, AutoModelForMaskedLM

    path = os.path.expanduser(str(name_or_path))
    where = f"{name_or_path!r}"
    if _is_local(path):
        if not os.path.isdir(path):
            raise ModelLoadError(f"model folder {where} does not exist; pass a folder written by "
                                 f"save_pretrained() (config.json + weights) or a Hugging Face Hub name")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"model folder {where} has no config.json; pass the folder that "
                                 f"save_pretrained() wrote (config.json + model.safetensors)")
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise ModelLoadError(
            f"{where} is not a local folder and could not be fetched from the Hugging Face Hub"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {e}\nOn a machine with internet, run "
            f"`hf download {name_or_path} --local-dir DIR` (or load it once to fill the cache) and pass DIR "
            f"instead.") from e
    except ValueError as e:
        raise ModelLoadError(f"{where} has a config.json that transformers cannot read: {e}") from e
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"{where} is a {config.model_type!r} model; supported masked LMs: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if dropout is not None:
        for key, value in zip(DROPOUT_KEYS[config.model_type], dropout):
            setattr(config, key, value)
    try:
        hf, info = AutoModelForMaskedLM.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the weights of {where}: {e}") from e
    if info.get("mismatched_keys"):
        raise ModelLoadError(f"{where} has weights whose shapes do not match its config: "
                             f"{sorted(info['mismatched_keys'])[:8]}")
    encoder_prefix = FAMILIES[config.model_type].encoder + "."
    missing = sorted(info.get("missing_keys") or [])
    head = [k for k in missing if not k.startswith(encoder_prefix)]
    other = [k for k in missing if k.startswith(encoder_prefix)]
    return hf, head, other
