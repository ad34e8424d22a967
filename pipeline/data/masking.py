"""Dynamic MLM masking that is a pure function of (seed, key, ids).

The loader passes the sample's global stream position as the key. So a sample is masked the same way
whichever rank or worker reads it and whatever the world size (resume at another world size continues the
exact stream), and differently each time the stream comes back to it in a later epoch (dynamic masking,
as in RoBERTa and DistilBERT), without any RNG state to checkpoint.

Selection follows the DistilBERT recipe (Sanh et al. 2019, after BERT): 15% of the maskable tokens of each sequence, 80% of
them replaced by [MASK], 10% by a random non-special id, 10% kept; optionally weighted by count**-0.7 so
that rare ids are masked more often, and optionally by whole words.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index

_SP_CONTROL = re.compile(r"^(<[^<>\s]+>|\[[A-Z_]+\])$")  # <s>, </s>, <pad>, [CLS], [MASK], ...
_SP_BYTE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # byte-fallback pieces continue a word


def word_starts(vocab: list[str], kind: str, special_ids: Iterable[int] = ()) -> np.ndarray:
    """Whether each id begins a word, for whole-word masking.

    kind "huggingface": WordPiece marks continuations with "##", byte-level BPE marks starts with "Ġ"; the
    vocabulary tells which (one without either is refused rather than silently treated as all starts).
    kind "sentencepiece": pieces starting with "▁" begin words, and so do control and user-defined pieces
    (<s>, [CLS], ...), recognised by shape. Ids in `special_ids` always count as starts.
    """
    if kind == "huggingface":
        if any(t.startswith("##") for t in vocab):
            starts = np.fromiter((not t.startswith("##") for t in vocab), bool, len(vocab))
        elif any(t.startswith("\u0120") for t in vocab):
            starts = np.fromiter((t.startswith("\u0120") or _SP_CONTROL.match(t) is not None for t in vocab),
                                 bool, len(vocab))
        else:
            raise ValueError("word_starts: this Hugging Face vocabulary has neither '##' continuation pieces "
                             "(WordPiece) nor 'Ġ' word-start pieces (byte-level BPE); word boundaries unknown, "
                             "so whole-word masking cannot be used with it")
    elif kind == "sentencepiece":
        starts = np.fromiter(
            (t.startswith("\u2581") or (_SP_CONTROL.match(t) is not None and _SP_BYTE.match(t) is None)
             for t in vocab), bool, len(vocab))
    else:
        raise ValueError(f"word_starts: kind must be 'huggingface' or 'sentencepiece', got {kind!r}")
    for i in special_ids:
        if i is not None and 0 <= int(i) < len(starts):
            starts[int(i)] = True
    return starts


class Masker:
    """MLM masking of one sequence or a batch; see the module docstring for why it is keyed.

    The 80/10/10 decision is drawn per token, also in whole-word mode (a chosen word can mix [MASK], random
    and kept tokens), as in BERT's and Hugging Face's whole-word maskers. The number of chosen tokens is
    round(probability * maskable) per sequence; whole-word mode adds words until it reaches that number, so
    it may exceed it by less than the last word's length.
    """

    def __init__(self, vocab_size: int, special_ids: Iterable[int], mask_id: int, pad_id: int, *,
                 probability: float = 0.15, mask_fraction: float = 0.8, random_fraction: float = 0.1,
                 whole_word: bool = False, word_start: np.ndarray | None = None,
                 token_counts: np.ndarray | None = None, smoothing_exponent: float = 0.7, seed: int = 0):
        problems = []
        vocab_size = int(vocab_size)
        if vocab_size < 2:
            problems.append(f"vocab_size must be >= 2, got {vocab_size}")
        special = sorted({int(i) for i in special_ids if i is not None})
        for name, value in (("mask_id", mask_id), ("pad_id", pad_id)):
            if value is None or not 0 <= int(value) < vocab_size:
                problems.append(f"{name} must be an id in [0, {vocab_size}), got {value!r}")
        if mask_id is not None and pad_id is not None and mask_id == pad_id:
            problems.append(f"mask_id and pad_id must differ (both {mask_id})")
        if [i for i in special if not 0 <= i < vocab_size]:
            problems.append(f"special_ids outside [0, {vocab_size}): {[i for i in special if not 0 <= i < vocab_size]}")
        if not 0 < probability < 1:
            problems.append(f"probability must be in (0, 1), got {probability}")
        for name, value in (("mask_fraction", mask_fraction), ("random_fraction", random_fraction)):
            if not 0 <= value <= 1:
                problems.append(f"{name} must be in [0, 1], got {value}")
        if mask_fraction + random_fraction > 1 + 1e-9:
            problems.append(f"mask_fraction + random_fraction must be <= 1 (the rest stay unchanged), got "
                            f"{mask_fraction} + {random_fraction}")
        if whole_word:
            if word_start is None:
                problems.append("whole_word=True needs word_start (see word_starts())")
            elif np.shape(word_start) != (vocab_size,):
                problems.append(f"word_start must have one entry per id ({vocab_size}), got shape "
                                f"{np.shape(word_start)}")
        if token_counts is not None:
            if np.shape(token_counts) != (vocab_size,):
                problems.append(f"token_counts must have one entry per id ({vocab_size}), got shape "
                                f"{np.shape(token_counts)}")
            if not smoothing_exponent >= 0:
                problems.append(f"smoothing_exponent must be >= 0, got {smoothing_exponent}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            problems.append(f"seed must be a non-negative integer, got {seed!r}")
        if problems:
            raise ValueError("Masker: " + "; ".join(problems))

        self.vocab_size = vocab_size
        self.mask_id, self.pad_id = int(mask_id), int(pad_id)
        self.probability = float(probability)
        self.mask_fraction, self.random_fraction = float(mask_fraction), float(random_fraction)
        self.whole_word = bool(whole_word)
        self.smoothing_exponent = float(smoothing_exponent)
        self.seed = int(seed)
        # [MASK] and [PAD] are never targets whether or not the caller listed them.
        self.is_special = np.zeros(vocab_size, bool)
        self.is_special[special + [self.mask_id, self.pad_id]] = True
        self.special_ids = np.flatnonzero(self.is_special)
        self.replacement_ids = np.flatnonzero(~self.is_special)  # the pool of the "random id" replacement
        if len(self.replacement_ids) == 0:
            raise ValueError("Masker: every id is special; nothing can be masked or used as a random replacement")
        self.word_start = None if word_start is None else np.asarray(word_start, bool) | self.is_special
        if token_counts is not None:
            counts = np.maximum(np.asarray(token_counts, np.float64), 1.0)
            self.weights = counts ** -self.smoothing_exponent
        else:
            self.weights = None

    def with_seed(self, seed: int) -> "Masker":
        """The same masker under another seed: evaluation masks with its own fixed seed, so its masks do not
        depend on (or collide with) the training seed."""
        import copy

        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        other = copy.copy(self)
        other.seed = int(seed)
        return other

    def _choose(self, ids: np.ndarray, maskable: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Positions to predict, drawn without replacement (weighted by smoothing when configured)."""
        n = int(maskable.sum())
        if n == 0:
            return np.zeros(0, np.int64)
        target = max(1, int(np.floor(self.probability * n + 0.5)))
        u = rng.random(len(ids))
        # Efraimidis-Spirakis: the k largest of log(u)/w are a weighted sample without replacement of size k.
        # 1 - u lies in (0, 1], so the log is finite.
        score = np.log1p(-u)
        if self.weights is not None:
            score = score / self.weights[ids]
        if not self.whole_word:
            score[~maskable] = -np.inf
            return np.sort(np.argpartition(-score, target - 1)[:target])
        positions = np.flatnonzero(maskable)
        # A word starts at a word-start id, or where a run of maskable tokens begins (a sample may open mid-word).
        starts = self.word_start[ids[positions]]
        starts[0] = True
        starts[1:] |= np.diff(positions) > 1
        word = np.cumsum(starts) - 1
        first = positions[starts]
        sizes = np.bincount(word)
        order = np.argsort(-score[first], kind="stable")
        n_words = int(np.searchsorted(np.cumsum(sizes[order]), target)) + 1
        chosen_words = np.zeros(len(first), bool)
        chosen_words[order[:n_words]] = True
        return positions[chosen_words[word]]

    def mask(self, ids: np.ndarray, key: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) for one sequence: int64, labels IGNORE_INDEX (-100) where nothing is predicted."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"mask: ids must be one sequence (1-D), got shape {ids.shape}")
        if not isinstance(key, (int, np.integer)) or key < 0:
            raise ValueError(f"mask: key must be a non-negative integer, got {key!r}")
        ids = ids.astype(np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"mask: ids outside [0, {self.vocab_size}): min {ids.min()}, max {ids.max()}")
        rng = np.random.default_rng([self.seed, int(key)])
        chosen = self._choose(ids, ~self.is_special[ids], rng)
        labels = np.full(len(ids), IGNORE_INDEX, np.int64)
        labels[chosen] = ids[chosen]
        out = ids.copy()
        r = rng.random(len(chosen))
        to_mask = r < self.mask_fraction
        to_random = (r >= self.mask_fraction) & (r < self.mask_fraction + self.random_fraction)
        out[chosen[to_mask]] = self.mask_id
        out[chosen[to_random]] = self.replacement_ids[rng.integers(0, len(self.replacement_ids),
                                                                   int(to_random.sum()))]
        return out, labels

    def mask_batch(self, samples: np.ndarray, keys: Sequence[int]) -> dict[str, torch.Tensor]:
        """A model-ready batch: input_ids, attention_mask (1 on non-pad tokens) and labels, int64 tensors."""
        samples = np.asarray(samples)
        if samples.ndim != 2 or len(keys) != len(samples):
            raise ValueError(f"mask_batch: samples must be [batch, seq_len] with one key each, got shape "
                             f"{samples.shape} and {len(keys)} keys")
        input_ids = np.empty(samples.shape, np.int64)
        labels = np.empty(samples.shape, np.int64)
        for b, (sample, key) in enumerate(zip(samples, keys)):
            input_ids[b], labels[b] = self.mask(sample, int(key))
        return {"input_ids": torch.from_numpy(input_ids),
                "attention_mask": torch.from_numpy((samples != self.pad_id).astype(np.int64)),
                "labels": torch.from_numpy(labels)}
