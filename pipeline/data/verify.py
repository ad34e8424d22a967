"""Open and verify the splits a training job reads, on every rank, before any compute; all ranks stop together.

Each rank opens every split it will read (sizes and index bounds; `full` adds every sha256: rank 0 of a job, so a
shared file system is read once) and checks the tokenizer. The ranks then exchange their findings (`gather`, an
all-gather), so a damaged or missing file is reported by name whichever rank found it (a node-local copy may be
broken on rank 5 only), and every rank raises the same DatasetError instead of one rank stopping while the others
wait in a collective.
"""
from __future__ import annotations

from typing import Callable

from .prepared import DatasetError, PreparedDataset


def _solo(obj) -> list:
    return [obj]


def open_splits(path: str, splits: list[str], *, optional: tuple[str, ...] = (), tokenizer=None,
                verify: str = "size", gather: Callable[[object], list] = _solo,
                opened: dict[str, PreparedDataset] | None = None) -> dict[str, PreparedDataset]:
    """The verified datasets by split name (a split in `optional` the dataset does not have is left out); `opened`
    holds splits the caller has already opened unverified (to read the manifest), which are verified, not reopened.
    Raises DatasetError (with `shared` set: every rank raises the same message) when any rank found a problem in
    any split. The tokenizer is checked against the first split's manifest (one manifest per dataset)."""
    opened = dict(opened or {})
    problem = None
    try:
        for split in splits:
            if split in opened:
                continue
            if opened and split in optional and split not in next(iter(opened.values())).manifest["shards"]:
                continue
            opened[split] = PreparedDataset(path, split, verify="none")
        if tokenizer is not None:
            opened[splits[0]].check_tokenizer(tokenizer)
        for dataset in opened.values():
            dataset.check(verify)
    except DatasetError as e:
        problem = str(e)
    error = combined_error(gather(problem))
    if error is not None:
        raise error
    return opened


def combined_error(problems: list[str | None]) -> DatasetError | None:
    """One DatasetError for every rank's problem (None: that rank found nothing), or None if no rank found one.
    A problem every rank found reads once; others are prefixed with the ranks that found them."""
    by_message: dict[str, list[int]] = {}
    for rank, p in enumerate(problems):
        if p:
            by_message.setdefault(p, []).append(rank)
    if not by_message:
        return None
    parts = []
    for message, ranks in by_message.items():
        if len(ranks) == len(problems):
            parts.append(message)
        else:
            parts.append(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {message}")
    error = DatasetError("; ".join(parts))
    error.shared = True
    return error
