"""The trainer's data stream: one global sample counter, shuffled per epoch, sliced across ranks.

Training's whole data position is the counter g: samples consumed since the start, summed over ranks. Epoch
e = g // N reads the N samples in the order `default_rng([seed, e]).permutation(N)`, and g is masked with key
g. Every rank derives its share of a step from (g, global batch, micro batch, world size, rank) alone, so a
checkpoint needs g and nothing else, and resuming at g on another world size (same global batch) continues
the very same stream: no sample skipped or repeated, every mask the same.

    stream = TrainStream(seqs, masker, seed=0, global_batch=256, micro_batch=16, rank=r, world_size=w, start=g)
    for micro in stream: ...    # stream.accumulation micro-batches per optimiser step, forever
"""
from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  (its exit handler must be registered before ours, so ours runs first)
import os
import signal
from collections import OrderedDict
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .masking import Masker
from .sequences import SequenceDataset

EVAL_SEED = 1234567  # fixed: evaluation masks must not move when the training seed changes


def _check_layout(global_batch: int | None, micro_batch: int, world_size: int, rank: int) -> int:
    """Accumulation steps, after checking global = micro x accumulation x world (the DeepSpeed identity).
    global_batch None (evaluation) means one micro_batch x world_size round."""
    problems = []
    for name, value in (("global_batch", global_batch), ("micro_batch", micro_batch), ("world_size", world_size)):
        if value is None and name == "global_batch":
            continue
        if not isinstance(value, (int, np.integer)) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    if not problems:
        if global_batch is None:
            global_batch = micro_batch * world_size
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            problems.append(f"rank must be in [0, {world_size}), got {rank!r}")
        if global_batch % (micro_batch * world_size):
            problems.append(f"global_batch {global_batch} is not a multiple of micro_batch x world_size = "
                            f"{micro_batch} x {world_size} = {micro_batch * world_size}; change global_batch or "
                            f"micro_batch so that global_batch = micro_batch x accumulation x world_size")
    if problems:
        raise ValueError("; ".join(problems))
    return int(global_batch // (micro_batch * world_size))


def rank_positions(start: int, global_batch: int, micro_batch: int, world_size: int, rank: int) -> list[np.ndarray]:
    """The counter values this rank processes in the optimiser step that begins at `start`, one int64 array
    per micro-step. Micro-step k interleaves the ranks (rank r takes the r-th micro-batch of the k-th
    micro_batch x world_size block), so the ranks' slices are disjoint and together are exactly
    start .. start + global_batch - 1."""
    accumulation = _check_layout(global_batch, micro_batch, world_size, rank)
    if not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start must be a non-negative integer, got {start!r}")
    base = int(start) + int(rank) * micro_batch
    span = micro_batch * world_size
    return [base + k * span + np.arange(micro_batch, dtype=np.int64) for k in range(accumulation)]


class _ShuffledPositions(Dataset):
    """Map-style dataset indexed by global counter value: position g -> (g, sample id, sample ids).

    Lives in each DataLoader worker; it keeps the last two epochs' permutations, because the batches in
    flight around an epoch boundary ask for both."""

    def __init__(self, sequences: SequenceDataset, seed: int):
        self.sequences = sequences
        self.seed = int(seed)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:  # the stream is endless; DataLoader only needs this for samplers we do not use
        return len(self.sequences)

    def sample_id(self, g: int) -> int:
        n = len(self.sequences)
        epoch, offset = divmod(int(g), n)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perms[epoch] = perm
            if len(self._perms) > 2:
                self._perms.popitem(last=False)
        return int(perm[offset])

    def __getitem__(self, g: int):
        i = self.sample_id(g)
        return int(g), i, self.sequences[i]


class _Collate:
    """Masks a micro-batch inside the worker that read it (a class, not a lambda, so workers can pickle it)."""

    def __init__(self, masker: Masker):
        self.masker = masker

    def __call__(self, items):
        positions = np.array([g for g, _, _ in items], np.int64)
        batch = self.masker.mask_batch(np.stack([s for _, _, s in items]), positions)
        # One document per sample: cut the columns that are padding in every row (masks and labels of the real tokens
        # are unchanged: they are keyed by position). Packed batches have none.
        width = int(batch["attention_mask"].sum(1).max())
        if width < batch["attention_mask"].shape[1]:
            for k in ("input_ids", "attention_mask", "labels"):
                batch[k] = batch[k][:, :width].contiguous()
        batch["positions"] = torch.from_numpy(positions)
        batch["sample_ids"] = torch.tensor([i for _, i, _ in items], dtype=torch.int64)
        return batch


_parent_exiting = None  # a flag in shared memory, set in the training process at exit


def _mark_parent_exiting() -> None:
    _parent_exiting.value = 1


def _worker_signals(worker_id: int) -> None:
    """worker_init_fn: the worker survives SLURM's USR1 and TERM, which slurmstepd sends to every process of the job
    (scancel, time limit, preemption, node shutdown). The training process handles them at its next step boundary
    and needs its workers' batches to get there; a worker killed by TERM instead makes the DataLoader raise in the
    training process ("DataLoader worker ... is killed by signal: Terminated") and the rank fails without a
    checkpoint. The worker still ends when the loader shuts down or its process exits (torch's worker loop watches
    both), and on a TERM once the training process is exiting (multiprocessing terminates its daemonic children at
    exit, then waits for them)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_on_term)


def _worker_on_term(signum, frame) -> None:
    if _parent_exiting is not None and _parent_exiting.value:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _shared_exit_flag():
    """Created once per process, before the first workers fork (they inherit it), with an exit handler that runs
    before multiprocessing's."""
    global _parent_exiting
    if _parent_exiting is None:
        import multiprocessing

        _parent_exiting = multiprocessing.RawValue("b", 0)
        atexit.register(_mark_parent_exiting)
    return _parent_exiting


class _StepSampler:
    """This rank's micro-batches of positions, step after step from `start`, forever."""

    def __init__(self, start: int, global_batch: int, micro_batch: int, world_size: int, rank: int):
        self.args = (global_batch, micro_batch, world_size, rank)
        self.start = start

    def __iter__(self) -> Iterator[list[int]]:
        g = self.start
        while True:
            for p in rank_positions(g, *self.args):
                yield p.tolist()
            g += self.args[0]


class TrainStream:
    """This rank's endless stream of masked micro-batches, from counter `start` (a step boundary).

    Each yielded dict holds input_ids, attention_mask, labels ([micro_batch, seq_len] int64), positions (the
    counter values) and sample_ids (indices into `sequences`), in the order step 0 micro 0..A-1, step 1, ...
    With num_workers > 0 reading and masking run in background processes; the output is identical, since
    every value is a function of the position.
    """

    def __init__(self, sequences: SequenceDataset, masker: Masker, *, seed: int, global_batch: int, micro_batch: int,
                 rank: int, world_size: int, start: int = 0, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 2):
        self._accumulation = _check_layout(global_batch, micro_batch, world_size, rank)
        problems = []
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            problems.append(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(start, (int, np.integer)) or start < 0 or start % global_batch:
            problems.append(f"start must be a non-negative multiple of global_batch ({global_batch}): training "
                            f"resumes at optimiser-step boundaries; got {start!r}")
        if not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {num_workers!r}")
        if num_workers and (not isinstance(prefetch_factor, (int, np.integer)) or prefetch_factor < 1):
            problems.append(f"prefetch_factor must be >= 1, got {prefetch_factor!r}")
        if problems:
            raise ValueError("TrainStream: " + "; ".join(problems))
        self.sequences, self.masker = sequences, masker
        self.seed, self.start = int(seed), int(start)
        self.global_batch, self.micro_batch = int(global_batch), int(micro_batch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers, self.prefetch_factor = int(num_workers), int(prefetch_factor)
        # Pinning needs CUDA; on CPU torch would only warn and skip it.
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimiser step on each rank: global_batch / (micro_batch x world_size)."""
        return self._accumulation

    def positions(self, start: int) -> list[np.ndarray]:
        """This rank's positions for the step beginning at counter `start` (see rank_positions)."""
        return rank_positions(start, self.global_batch, self.micro_batch, self.world_size, self.rank)

    def loader(self) -> DataLoader:
        workers = self.num_workers
        if workers:
            _shared_exit_flag()
        return DataLoader(
            _ShuffledPositions(self.sequences, self.seed),
            batch_sampler=_StepSampler(self.start, self.global_batch, self.micro_batch, self.world_size, self.rank),
            collate_fn=_Collate(self.masker), num_workers=workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers else None, persistent_workers=False,
            worker_init_fn=_worker_signals if workers else None)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.loader())


class EvalBatches:
    """Held-out evaluation with fixed masks: the first n_samples of a (validation) SequenceDataset in order, masked
    with key = sample index and a fixed eval seed; split evenly across ranks (n_samples rounded down to a multiple
    of micro_batch*world_size; error if that is 0). Iterating yields the same dict format; identical every time it
    is iterated.

    n_samples larger than the dataset is capped at its length, so one setting works for any validation split;
    `n_samples` holds the number actually used. Ranks take micro-batches the way rank_positions lays out a step,
    so the union over ranks is samples 0 .. n_samples-1, each once.
    """

    def __init__(self, sequences: SequenceDataset, masker: Masker, *, n_samples: int, micro_batch: int, rank: int,
                 world_size: int, seed: int = EVAL_SEED):
        _check_layout(None, micro_batch, world_size, rank)
        block = micro_batch * world_size
        if not isinstance(n_samples, (int, np.integer)) or n_samples < 0:
            raise ValueError(f"EvalBatches: n_samples must be a non-negative integer, got {n_samples!r}")
        usable = min(int(n_samples), len(sequences)) // block * block
        if usable == 0:
            raise ValueError(f"EvalBatches: n_samples={n_samples} (dataset has {len(sequences)} samples) is below one "
                             f"round of micro_batch x world_size = {micro_batch} x {world_size} = {block}; use more "
                             f"evaluation samples or a smaller micro_batch")
        self.sequences = sequences
        self.masker = masker.with_seed(seed)
        self.n_samples = usable
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self._positions = rank_positions(0, usable, micro_batch, world_size, rank)

    def __len__(self) -> int:
        """Micro-batches this rank yields."""
        return len(self._positions)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for p in self._positions:
            batch = self.masker.mask_batch(np.stack([self.sequences[int(i)] for i in p]), p)
            batch["positions"] = torch.from_numpy(p.copy())
            batch["sample_ids"] = torch.from_numpy(p.copy())
            yield batch
