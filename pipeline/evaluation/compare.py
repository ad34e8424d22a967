"""Student vs teacher: parameters, disk size, and inference latency/throughput measured in one process, on the same
inputs, interleaved (the "40% smaller, 60% faster" claim, checked on the machine at hand)."""
from __future__ import annotations

import glob
import os
import statistics
import time

import torch


def disk_bytes(path: str) -> int | None:
    """Size of the weight files of a local checkpoint (None for a hub name)."""
    if not os.path.isdir(path):
        return None
    files = [f for pat in ("*.safetensors", "*.bin") for f in glob.glob(os.path.join(path, pat))]
    return sum(os.path.getsize(f) for f in files)


def _encoder(path: str, device, dtype):
    from transformers import AutoModel
    return AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()


@torch.inference_mode()
def _time_forward(model, ids, mask, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(models: dict[str, str], *, batch_sizes=(1, 8, 32), seq_lens=(128, 512), repeats: int = 5,
            warmup: int = 1, device: str | None = None, dtype: torch.dtype | None = None, vocab_size=None,
            seed: int = 0) -> dict:
    """`models`: {label: checkpoint}. Encoder forward (no MLM head: what downstream inference runs) on random ids.

    Each shape warms every model up (`warmup` forwards), then runs them in turn `repeats` times (alternating) and
    reports each one's median latency and its spread (min, max); ratios are against the first model (the
    teacher, by convention)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loaded = {k: _encoder(v, device, dtype) for k, v in models.items()}
    first = next(iter(loaded))
    out = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
           "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "models": {}, "timings": []}
    for label, m in loaded.items():
        out["models"][label] = {"path": models[label], "parameters": sum(p.numel() for p in m.parameters()),
                                "disk_bytes": disk_bytes(models[label]), "layers": m.config.num_hidden_layers
                                if hasattr(m.config, "num_hidden_layers") else m.config.n_layers}
    vocab = vocab_size or min(m.config.vocab_size for m in loaded.values())
    g = torch.Generator().manual_seed(seed)
    for L in seq_lens:
        L = min(L, min(m.config.max_position_embeddings for m in loaded.values()))
        for B in batch_sizes:
            ids = torch.randint(min(1000, vocab // 2), vocab, (B, L), generator=g).to(device)  # skip special ids
            mask = torch.ones_like(ids)
            for m in loaded.values():
                _time_forward(m, ids, mask, warmup, sync)
            row = {"batch": B, "seq_len": L}
            # Repeats alternate between the models (t, s, t, s, ...): a burst of load from elsewhere on a shared
            # machine then hits both alike instead of all of one model's repeats.
            times = {label: [] for label in loaded}
            for _ in range(repeats):
                for label, m in loaded.items():
                    times[label].append(_time_forward(m, ids, mask, 1, sync))
            for label in loaded:
                t = statistics.median(times[label])
                row[label] = {"latency_ms": t * 1e3, "sequences_per_s": B / t,
                              "spread_ms": [min(times[label]) * 1e3, max(times[label]) * 1e3]}
            for label in loaded:
                row[label]["speedup_vs_" + first] = row[first]["latency_ms"] / row[label]["latency_ms"]
            out["timings"].append(row)
    return out
