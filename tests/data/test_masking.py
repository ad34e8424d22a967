"""Dynamic MLM masking: the recipe's statistics on real WordPiece sequences, determinism by key, frequency
smoothing, whole-word masking, and argument checks."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.data.masking import IGNORE_INDEX, Masker, word_starts
from pipeline.data.prepared import PreparedDataset
from pipeline.data.sequences import SequenceDataset
from tests.data.test_sequences import build_prepared

CLS, SEP, PAD, MASK, UNK = 101, 102, 0, 103, 100
SPECIAL = [PAD, UNK, CLS, SEP, MASK]
V = 30522


@pytest.fixture(scope="module")
def data(tmp_path_factory, sample_texts, wordpiece_dir):
    """Real packed and per-document (padded) sequences, the training token counts and the WordPiece vocabulary."""
    path = build_prepared(tmp_path_factory, sample_texts, wordpiece_dir)
    ds = PreparedDataset(path, "train")
    assert ds.special_ids["mask"] == MASK and ds.special_ids["pad"] == PAD
    packed = SequenceDataset(ds, 128, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    document = SequenceDataset(ds, 128, "document", cls_id=CLS, sep_id=SEP, pad_id=PAD)
    with open(os.path.join(wordpiece_dir, "vocab.txt"), encoding="utf-8") as f:
        vocab = f.read().split("\n")[:V]
    assert len(vocab) == V and vocab[MASK] == "[MASK]"
    return {"packed": np.stack([packed[i] for i in range(len(packed))]),
            "document": np.stack([document[i] for i in range(len(document))]),
            "counts": ds.token_counts(), "vocab": vocab}


def masker(**kw):
    return Masker(V, SPECIAL, MASK, PAD, **kw)


def mask_all(m, samples, key0=0):
    out = [m.mask(s, key0 + i) for i, s in enumerate(samples)]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


def test_recipe_statistics(data):
    samples = np.concatenate([data["packed"], data["document"]])
    inputs, labels = mask_all(masker(), samples)
    chosen = labels != IGNORE_INDEX
    special = np.isin(samples, SPECIAL)
    # exactly round(15%) of each sequence's maskable tokens, never a special token or padding
    maskable = (~special).sum(1)
    np.testing.assert_array_equal(chosen.sum(1), np.maximum(1, np.floor(0.15 * maskable + 0.5)))
    assert not np.any(chosen & special)
    assert np.all(inputs[special] == samples[special])
    assert np.all(inputs[~chosen] == samples[~chosen])
    np.testing.assert_array_equal(labels[chosen], samples[chosen])
    # 80% [MASK], 10% random, 10% unchanged (within 5 standard deviations)
    n = chosen.sum()
    assert n > 5000
    as_mask = (inputs[chosen] == MASK).mean()
    kept = (inputs[chosen] == samples[chosen]).mean()
    replaced = 1 - as_mask - kept
    assert abs(as_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.02 and abs(replaced - 0.1) < 0.02, (as_mask, kept)
    # positions are spread over the whole sequence, not packed at one end
    per_position = chosen[:, 1:].mean(0)
    assert per_position[:60].mean() == pytest.approx(per_position[60:].mean(), abs=0.03)


def test_random_replacements_are_never_special(data):
    m = masker(mask_fraction=0.0, random_fraction=1.0)
    inputs, labels = mask_all(m, data["document"])
    chosen = labels != IGNORE_INDEX
    replaced = inputs[chosen]
    assert not np.isin(replaced, SPECIAL).any()
    assert (replaced != data["document"][chosen]).mean() > 0.99
    assert len(np.unique(replaced)) > 0.5 * len(replaced)  # spread over the vocabulary
    # only kept tokens when both fractions are 0: labels still mark them
    inputs, labels = mask_all(masker(mask_fraction=0.0, random_fraction=0.0), data["document"][:20])
    assert (labels != IGNORE_INDEX).sum() > 0 and np.array_equal(inputs, data["document"][:20])


def test_deterministic_by_key_and_different_across_keys(data):
    sample = data["packed"][3]
    m = masker(seed=7)
    a, b = m.mask(sample, 12345), masker(seed=7).mask(sample, 12345)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    labels = [m.mask(sample, k)[1] != IGNORE_INDEX for k in range(20)]
    assert len({c.tobytes() for c in labels}) == 20  # dynamic masking: a new mask at every position
    assert not np.array_equal(masker(seed=8).mask(sample, 12345)[1], a[1])
    assert np.array_equal(m.with_seed(8).mask(sample, 12345)[1], masker(seed=8).mask(sample, 12345)[1])
    # a sample's mask does not depend on what else is in its batch
    batch = m.mask_batch(data["packed"][2:6], [9, 12345, 3, 4])
    assert np.array_equal(batch["input_ids"][1].numpy(), a[0])
    assert np.array_equal(batch["labels"][1].numpy(), a[1])
    # ids may arrive as uint16 views straight from the shards
    assert np.array_equal(m.mask(sample.astype(np.uint16), 12345)[0], a[0])


def test_mask_batch_format(data):
    samples = data["document"][:6]
    batch = masker().mask_batch(samples, range(6))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for t in batch.values():
        assert t.dtype == torch.int64 and tuple(t.shape) == samples.shape
    np.testing.assert_array_equal(batch["attention_mask"].numpy(), samples != PAD)
    assert (samples == PAD).any()
    with pytest.raises(ValueError, match="one key each"):
        masker().mask_batch(samples, [1, 2])


def test_smoothing_masks_rare_ids_more_often():
    counts = np.ones(V, np.int64)
    frequent, rare = 2000, 3000
    counts[frequent] = 10 ** 6
    ids = np.array([CLS] + [frequent, rare] * 50 + [SEP])
    m = masker(token_counts=counts)
    picked = np.zeros(2)
    for k in range(200):
        _, labels = m.mask(ids, k)
        picked += [(labels == frequent).sum(), (labels == rare).sum()]
    assert picked.sum() == 200 * 15
    assert picked[1] > 20 * picked[0]  # weights 1 vs 1e6**-0.7: the frequent id is almost never chosen first
    # exponent 0 is plain uniform selection
    m0 = masker(token_counts=counts, smoothing_exponent=0.0)
    picked0 = sum(((m0.mask(ids, k)[1] == rare).sum() for k in range(200)))
    assert 0.4 < picked0 / 3000 < 0.6


def test_smoothing_on_real_counts(data):
    """With the corpus counts, masked tokens are rarer on average than without smoothing."""
    counts = data["counts"]
    samples = data["packed"]
    plain = mask_all(masker(), samples)[1]
    smooth = mask_all(masker(token_counts=counts), samples)[1]
    mean_log_count = lambda labels: np.log(np.maximum(counts[labels[labels != IGNORE_INDEX]], 1)).mean()  # noqa: E731
    assert mean_log_count(smooth) < mean_log_count(plain) - 1.0
    assert (smooth != IGNORE_INDEX).sum() == (plain != IGNORE_INDEX).sum()


def words_of(sample, starts):
    """Word index of every position (-1 for specials): a word-start token and the continuations after it."""
    word, w = np.full(len(sample), -1), -1
    prev_special = True
    for j, t in enumerate(sample):
        if t in SPECIAL:
            prev_special = True
            continue
        if starts[t] or prev_special:
            w += 1
        word[j], prev_special = w, False
    return word


@pytest.mark.parametrize("smoothing", [False, True])
def test_whole_word_masking_never_splits_a_word(data, smoothing):
    starts = word_starts(data["vocab"], "huggingface", SPECIAL)
    m = masker(whole_word=True, word_start=starts, token_counts=data["counts"] if smoothing else None)
    samples = np.concatenate([data["packed"][:60], data["document"][:60]])
    multi = 0
    for k, s in enumerate(samples):
        inputs, labels = m.mask(s, k)
        chosen = labels != IGNORE_INDEX
        word = words_of(s, starts)
        target = max(1, int(np.floor(0.15 * (word >= 0).sum() + 0.5)))
        for w in np.unique(word[chosen]):
            assert chosen[word == w].all(), f"sample {k}: word {w} partly masked"
            multi += (word == w).sum() > 1
        # words are added until the target is reached, overshooting by less than one word
        last_excess = chosen.sum() - target
        assert 0 <= last_excess < max(np.bincount(word[word >= 0]))
        assert not chosen[word < 0].any()
        np.testing.assert_array_equal(labels[chosen], s[chosen])
    assert multi > 50  # the check had multi-piece words to get wrong


def test_word_starts(data, sentencepiece_model):
    starts = word_starts(data["vocab"], "huggingface")
    vocab = data["vocab"]
    assert starts.dtype == bool and len(starts) == V
    for tok, expected in (("the", True), ("##ing", False), ("[CLS]", True), ("[MASK]", True), ("##s", False)):
        assert starts[vocab.index(tok)] == expected
    assert 0.1 < (~starts).mean() < 0.3  # WordPiece: about a fifth of the vocabulary continues words

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sentencepiece_model)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    sp_starts = word_starts(pieces, "sentencepiece")
    for piece, expected in (("<pad>", True), ("</s>", True), ("[CLS]", True), ("[MASK]", True), ("\u2581the", True),
                            ("ing", False)):
        assert sp_starts[pieces.index(piece)] == expected, piece
    assert not word_starts(["<0x41>", "\u2581a", "b"], "sentencepiece")[0]  # byte fallback continues a word
    assert word_starts(["x", "\u2581a", "b"], "sentencepiece", special_ids=[0]).tolist() == [True, True, False]
    assert word_starts(["<s>", "\u0120the", "re"], "huggingface").tolist() == [True, True, False]  # byte-level BPE
    with pytest.raises(ValueError, match="word boundaries unknown"):
        word_starts(["a", "b"], "huggingface")
    with pytest.raises(ValueError, match="kind must be"):
        word_starts(["a"], "wordpiece")


def test_nothing_maskable():
    _, labels = masker().mask(np.array([CLS, SEP] + [PAD] * 6), 0)
    assert (labels == IGNORE_INDEX).all()
    _, labels = masker().mask(np.array([CLS, 2000, SEP, PAD]), 0)
    assert labels.tolist() == [IGNORE_INDEX, 2000, IGNORE_INDEX, IGNORE_INDEX]  # at least one when possible


def test_bad_arguments():
    def fails(match, **kw):
        args = {"vocab_size": V, "special_ids": SPECIAL, "mask_id": MASK, "pad_id": PAD, **kw}
        with pytest.raises(ValueError, match=match):
            Masker(**args)

    fails(r"probability must be in \(0, 1\), got 0", probability=0)
    fails(r"probability must be in \(0, 1\), got 1.5", probability=1.5)
    fails(r"mask_fraction must be in \[0, 1\], got -0.1", mask_fraction=-0.1)
    fails(r"random_fraction must be in \[0, 1\], got 2", random_fraction=2)
    fails(r"mask_fraction \+ random_fraction must be <= 1", mask_fraction=0.8, random_fraction=0.3)
    fails(r"mask_id must be an id in \[0, 30522\), got 30522", mask_id=V)
    fails(r"mask_id must be an id in \[0, 30522\), got None", mask_id=None)
    fails("mask_id and pad_id must differ", mask_id=PAD)
    fails("special_ids outside", special_ids=[0, 40000])
    fails("whole_word=True needs word_start", whole_word=True)
    fails("word_start must have one entry per id", whole_word=True, word_start=np.ones(5, bool))
    fails("token_counts must have one entry per id", token_counts=np.ones(5))
    fails("smoothing_exponent must be >= 0", token_counts=np.ones(V), smoothing_exponent=-1)
    fails("seed must be a non-negative integer", seed=-1)
    fails("every id is special", vocab_size=4, special_ids=[0, 1, 2, 3], mask_id=3, pad_id=0)
    # several problems are reported together
    with pytest.raises(ValueError, match="probability.*mask_fraction"):
        Masker(V, SPECIAL, MASK, PAD, probability=2, mask_fraction=3)
    m = masker()
    with pytest.raises(ValueError, match="key must be a non-negative integer"):
        m.mask(np.array([CLS, 5, SEP]), -1)
    with pytest.raises(ValueError, match="1-D"):
        m.mask(np.zeros((2, 3), np.int64), 0)
    with pytest.raises(ValueError, match=r"ids outside \[0, 30522\)"):
        m.mask(np.array([CLS, 40000, SEP]), 0)
