"""`validate` (is every byte as recorded?) and `inspect` (what is in it?) for a prepared dataset."""
from __future__ import annotations

import os

import numpy as np

from pipeline import shards as fmt

from .prepared import DatasetError, PreparedDataset


def validate(path: str, full: bool = True) -> list[str]:
    """Every problem found: checksums and sizes of all files, index consistency, token ids within the
    vocabulary, document/token totals, and token counts equal to a recount of the training tokens."""
    try:
        splits = {s: PreparedDataset(path, s, verify="none") for s in fmt.SPLITS}
    except DatasetError as e:
        return [str(e)]
    problems = []
    for s, ds in splits.items():
        problems += [f"{s}: {p}" for p in ds.verify(full=full)]
    if problems:
        return problems
    recount = np.zeros(splits["train"].vocab_size, np.int64)
    for s, ds in splits.items():
        totals = ds.manifest["totals"][s]
        if (ds.n_docs, ds.n_tokens) != (totals["documents"], totals["tokens"]):
            problems.append(f"{s}: shards hold {ds.n_docs} documents / {ds.n_tokens} tokens, manifest totals say "
                            f"{totals['documents']} / {totals['tokens']}")
        for k, shard in enumerate(ds.shards):
            _, toks = ds._shard(k)
            if len(toks) and int(toks.max()) >= ds.vocab_size:
                problems.append(f"{shard['bin']}: token id {int(toks.max())} >= vocabulary size {ds.vocab_size}")
            elif s == "train" and full:
                recount += np.bincount(toks, minlength=ds.vocab_size)[: ds.vocab_size]
    if full and not problems:
        try:
            counts = splits["train"].token_counts()
            if not np.array_equal(counts, recount):
                problems.append("token_counts.npy does not match a recount of the training tokens")
        except DatasetError as e:
            problems.append(str(e))
    stale = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if fmt.TMP_MARK in f]
    if stale:
        problems.append(f"{len(stale)} temporary file(s) from an interrupted run (e.g. {stale[0]}); harmless, "
                        f"removed when the preparation is re-run")
    return problems


def length_histogram(lengths: np.ndarray, width: int = 40) -> list[str]:
    """Text histogram of document lengths in power-of-two buckets."""
    if not len(lengths):
        return ["(no documents)"]
    edges = [0, 1] + [1 << k for k in range(1, max(2, int(lengths.max()).bit_length() + 1))]
    hist, _ = np.histogram(lengths, bins=edges + [edges[-1] * 2])
    peak = max(hist.max(), 1)
    lines = []
    for lo, hi, n in zip(edges, edges[1:] + [edges[-1] * 2], hist):
        if n:
            lines.append(f"{lo:>8}-{hi - 1:<8} {n:>10,} {'#' * max(1, round(width * n / peak))}")
    return lines


def inspect(path: str, samples: int = 3, seed: int = 0, tokenizer: str | None = None,
            max_chars: int = 400) -> str:
    """A readable report: totals, stats, length histograms and a few random documents decoded to text."""
    from pipeline.tokenization import load_tokenizer

    train = PreparedDataset(path, "train", verify="size")
    valid = PreparedDataset(path, "valid", verify="size")
    m = train.manifest
    out = [f"dataset {train.path}",
           f"  tokenizer {m['tokenizer']['name_or_path']} ({m['tokenizer']['kind']}, vocab {train.vocab_size}, "
           f"fingerprint {m['tokenizer']['fingerprint'][:12]}), ids stored as {m['dtype']}"]
    for ds in (train, valid):
        lengths = ds.doc_lengths()
        mean = lengths.mean() if len(lengths) else 0
        out.append(f"  {ds.split}: {ds.n_docs:,} documents, {ds.n_tokens:,} tokens in {len(ds.shards)} shards; "
                   f"tokens per document mean {mean:.1f}, median {np.median(lengths) if len(lengths) else 0:.0f}, "
                   f"max {lengths.max() if len(lengths) else 0}")
    st = m["stats"]
    out.append(f"  read {st['documents_read']:,} documents; dropped {st['dropped'] or 'none'}; "
               f"repaired {st['repaired'] or 'none'}; bad records {st['bad_records'] or 'none'} "
               f"(see {m['bad_records']['file']})")
    out.append("  train document lengths (tokens):")
    out += ["    " + line for line in length_histogram(train.doc_lengths())]
    if samples and len(train):
        tok = load_tokenizer(tokenizer or m["tokenizer"]["name_or_path"])
        train.check_tokenizer(tok)
        rng = np.random.default_rng(seed)
        for i in rng.choice(len(train), size=min(samples, len(train)), replace=False):
            text = tok.decode(train[int(i)])
            more = f" ... [{len(text) - max_chars} more characters]" if len(text) > max_chars else ""
            out.append(f"  --- train document {int(i)} ({train.doc_length(int(i))} tokens) ---")
            out.append("  " + text[:max_chars].replace("\n", "\n  ") + more)
    return "\n".join(out)
