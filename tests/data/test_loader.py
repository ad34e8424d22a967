"""The rank-aware training stream: one global counter sliced across ranks, the same stream at any world size,
background workers, epoch roll-over, and fixed evaluation batches."""
from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch

from pipeline.data.loader import EvalBatches, TrainStream, rank_positions
from pipeline.data.masking import IGNORE_INDEX, Masker
from pipeline.data.prepared import PreparedDataset
from pipeline.data.sequences import SequenceDataset
from tests.data.test_sequences import CLS, PAD, SEP, ListData, build_prepared

MASK, V = 103, 30522
KEYS = ("input_ids", "attention_mask", "labels", "positions", "sample_ids")


@pytest.fixture(scope="module")
def train(tmp_path_factory, sample_texts, wordpiece_dir):
    ds = PreparedDataset(build_prepared(tmp_path_factory, sample_texts, wordpiece_dir), "train")
    return SequenceDataset(ds, 64, cls_id=CLS, sep_id=SEP, pad_id=PAD)


@pytest.fixture(scope="module")
def valid(tmp_path_factory, sample_texts, wordpiece_dir):
    ds = PreparedDataset(build_prepared(tmp_path_factory, sample_texts, wordpiece_dir), "valid")
    return SequenceDataset(ds, 64, "document", cls_id=CLS, sep_id=SEP, pad_id=PAD)


def masker(seed=0):
    return Masker(V, [PAD, 100, CLS, SEP, MASK], MASK, PAD, seed=seed)


def stream(seqs, *, world_size=1, rank=0, start=0, global_batch=8, micro_batch=2, seed=3, **kw):
    return TrainStream(seqs, masker(), seed=seed, global_batch=global_batch, micro_batch=micro_batch, rank=rank,
                       world_size=world_size, start=start, **kw)


def steps(s: TrainStream, n_steps: int) -> list[list[dict]]:
    """The first n_steps optimiser steps of a stream, as lists of micro-batches."""
    micro = list(islice(iter(s), n_steps * s.accumulation))
    return [micro[k * s.accumulation:(k + 1) * s.accumulation] for k in range(n_steps)]


def rows(batches) -> list[tuple]:
    """(position, sample, masked ids, labels) of every sample: what must not depend on the world size."""
    out = []
    for b in batches:
        for j in range(len(b["positions"])):
            out.append((int(b["positions"][j]), int(b["sample_ids"][j]), tuple(b["input_ids"][j].tolist()),
                        tuple(b["labels"][j].tolist())))
    return sorted(out)


def test_rank_positions_partition_the_step():
    for world_size, micro in ((1, 8), (2, 4), (4, 2), (8, 1), (2, 1)):
        per_rank = [rank_positions(64, 16, micro, world_size, r) for r in range(world_size)]
        assert all(len(p) == 16 // (micro * world_size) for p in per_rank)
        flat = np.concatenate([a for p in per_rank for a in p])
        assert flat.dtype == np.int64 and sorted(flat.tolist()) == list(range(64, 80))  # disjoint, union = step
    assert [a.tolist() for a in rank_positions(100, 8, 2, 2, 1)] == [[102, 103], [106, 107]]
    assert [a.tolist() for a in rank_positions(0, 8, 2, 2, 0)] == [[0, 1], [4, 5]]
    with pytest.raises(ValueError, match=r"global_batch 10 is not a multiple of micro_batch x world_size = 2 x 3 = 6"):
        rank_positions(0, 10, 2, 3, 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        rank_positions(0, 8, 2, 2, 2)
    with pytest.raises(ValueError, match="micro_batch must be a positive integer, got 0"):
        rank_positions(0, 8, 0, 2, 0)
    with pytest.raises(ValueError, match="start must be a non-negative integer"):
        rank_positions(-8, 8, 2, 2, 0)


def test_stream_format_and_order(train):
    s = stream(train, global_batch=8, micro_batch=2, world_size=2, rank=1, start=16)
    assert s.accumulation == 2
    first = steps(s, 3)
    for k, step in enumerate(first):
        for m, b in enumerate(step):
            assert set(b) == set(KEYS)
            for key in KEYS:
                assert b[key].dtype == torch.int64
            assert tuple(b["input_ids"].shape) == tuple(b["labels"].shape) == (2, 64)
            start = 16 + 8 * k
            assert b["positions"].tolist() == rank_positions(start, 8, 2, 2, 1)[m].tolist()
            for j in range(2):  # each row is the sample at that position, masked with key = position
                g, i = int(b["positions"][j]), int(b["sample_ids"][j])
                perm = np.random.default_rng([3, g // len(train)]).permutation(len(train))
                assert i == perm[g % len(train)]
                ids, labels = masker().mask(train[i], g)
                assert b["input_ids"][j].tolist() == ids.tolist() and b["labels"][j].tolist() == labels.tolist()
                assert b["attention_mask"][j].tolist() == [1] * 64
                assert (b["labels"][j] != IGNORE_INDEX).sum() == 9  # round(0.15 * 62 maskable)


def test_same_stream_on_any_world_size(train):
    """Resuming at counter g on 2 or 4 ranks continues exactly the stream 1 rank would have read."""
    g, n_steps = 24, 4
    single = steps(stream(train, start=g, micro_batch=4), n_steps)
    for world_size, micro in ((2, 2), (4, 1), (2, 4)):
        per_rank = [steps(stream(train, start=g, world_size=world_size, rank=r, micro_batch=micro), n_steps)
                    for r in range(world_size)]
        for k in range(n_steps):
            step_rows = rows([b for r in range(world_size) for b in per_rank[r][k]])
            assert step_rows == rows(single[k])
            assert [p for p, *_ in step_rows] == list(range(g + 8 * k, g + 8 * (k + 1)))
    # and a stream started at g is the continuation of the one started at 0
    from_zero = steps(stream(train), 3 + n_steps)
    assert all(rows(from_zero[3 + k]) == rows(single[k]) for k in range(n_steps))


def test_workers_give_the_same_batches(train):
    kw = {"world_size": 2, "rank": 1, "start": 8, "micro_batch": 2}
    in_process = steps(stream(train, **kw), 6)
    background = steps(stream(train, num_workers=2, prefetch_factor=2, pin_memory=True, **kw), 6)
    for a, b in zip(in_process, background):
        for x, y in zip(a, b):
            for key in KEYS:
                assert torch.equal(x[key], y[key])


def test_epoch_roll_over_uses_a_new_permutation():
    docs = [np.full(13, 200 + i) for i in range(16)]  # 16 documents -> 14 packed samples of 16 tokens
    seqs = SequenceDataset(ListData(docs), 16, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    n = len(seqs)
    assert n == 14
    s = stream(seqs, global_batch=2, micro_batch=1, world_size=2, rank=0)
    # 3 epochs on rank 0 = positions 0, 2, 4, ...; rank 1 gives the odd ones
    batches = list(islice(iter(s), 3 * n // 2))
    other = list(islice(iter(stream(seqs, global_batch=2, micro_batch=1, world_size=2, rank=1)), 3 * n // 2))
    by_position = {int(b["positions"][0]): b for b in batches + other}
    assert sorted(by_position) == list(range(3 * n))
    epochs = [[int(by_position[g]["sample_ids"][0]) for g in range(e * n, (e + 1) * n)] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)  # each epoch reads every sample once
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(n))
    # the same sample gets a new mask in the next epoch
    i = epochs[0][0]
    g0, g1 = 0, n + epochs[1].index(i)
    assert not torch.equal(by_position[g0]["labels"], by_position[g1]["labels"])
    # another seed, another order
    assert [int(b["sample_ids"][0]) for b in islice(iter(stream(seqs, global_batch=2, micro_batch=1, seed=4)), n)] \
        != [int(by_position[g]["sample_ids"][0]) for g in range(n)]


def test_stream_bad_arguments(train):
    with pytest.raises(ValueError, match=r"start must be a non-negative multiple of global_batch \(8\)"):
        stream(train, start=4)
    with pytest.raises(ValueError, match="global_batch 8 is not a multiple of micro_batch x world_size = 3 x 1"):
        stream(train, micro_batch=3)
    with pytest.raises(ValueError, match="rank must be in"):
        stream(train, world_size=2, rank=-1)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        stream(train, num_workers=-1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        stream(train, seed=-2)


def test_eval_batches(valid):
    n = len(valid)
    assert n > 20
    per_rank = [EvalBatches(valid, masker(seed=11), n_samples=21, micro_batch=2, rank=r, world_size=2)
                for r in range(2)]
    assert per_rank[0].n_samples == 20 and len(per_rank[0]) == len(per_rank[1]) == 5
    first = [list(e) for e in per_rank]
    assert all(rows(list(e)) == rows(f) for e, f in zip(per_rank, first))  # identical every time
    all_rows = rows(first[0] + first[1])
    assert [p for p, *_ in all_rows] == list(range(20)) and [i for _, i, *_ in all_rows] == list(range(20))
    for g, i, ids, labels in all_rows:
        assert g == i and sum(t != IGNORE_INDEX for t in labels) > 0
    b = first[0][0]
    assert set(b) == set(KEYS) and b["attention_mask"].tolist() == (b["input_ids"] != PAD).long().tolist()
    assert (b["attention_mask"] == 0).any()  # document mode pads...
    # ...only up to the micro-batch's longest document: no column is padding in every row
    for batch in first[0] + first[1]:
        assert batch["attention_mask"][:, -1].any() and batch["input_ids"].shape[1] <= 64
    # masks are fixed by the eval seed, not the training seed, and equal on one rank
    one = EvalBatches(valid, masker(seed=99), n_samples=20, micro_batch=4, rank=0, world_size=1)
    assert rows(list(one)) == all_rows
    # capped at the dataset
    assert EvalBatches(valid, masker(), n_samples=10 ** 6, micro_batch=1, rank=0, world_size=1).n_samples == n
    with pytest.raises(ValueError, match=r"n_samples=5 .* below one round of micro_batch x world_size = 4 x 2 = 8"):
        EvalBatches(valid, masker(), n_samples=5, micro_batch=4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank must be in"):
        EvalBatches(valid, masker(), n_samples=8, micro_batch=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="micro_batch must be a positive integer"):
        EvalBatches(valid, masker(), n_samples=8, micro_batch=0, rank=0, world_size=2)
