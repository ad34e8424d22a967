"""Our distillation step against the reference recipe's step, timed on the same hardware in one run.

The reference step has the original DistilBERT scripts' semantics, written here independently:
  - one document per sample, batches padded to their longest document (real document lengths, drawn from a prepared
    dataset), an attention mask everywhere;
  - teacher and student run as plain Hugging Face masked LMs and return full-vocabulary logits for every position;
    both [B, L, V] tensors are cast to fp32, the non-pad rows selected, and KL(t/T || s/T) x T^2, the masked-LM
    cross-entropy and the hidden-state cosine computed from them, unfused;
  - torch.optim.AdamW without foreach or fused kernels; the models in fp32 on CPU, under bf16 autocast on GPU (the
    original's apex fp16 is gone from current stacks: autocast is its closest stand-in, and keeps the comparison
    about the step's structure rather than precision).

Ours is the trainer's own step (`pipeline/training/step.py` forward_losses, a DeepSpeed engine, the optimizer
`build_optimizer` picks): packed sequences without padding or attention mask (SDPA's fused kernels), the teacher
under inference mode (bf16 on GPU), the fused chunked KD + MLM loss (`loss.chunk_size`), DeepSpeed bf16 with fp32
master weights and torch's fused AdamW on GPU.

With `--document` (launch/benchmark.py), ours also runs on the reference's own padded document batches
(`data.mode=document`): `ours_document` unpadded (`data.unpad`, the default: pipeline/models/varlen.py) and
`ours_document_padded` with the padding and attention mask kept, which isolates what unpadding buys.

Both steps cover the same work per token: KD on every non-pad token, MLM on the masked 15%, cosine on every token.
tokens/s counts real (non-pad) tokens only: padding is the reference's waste, not work. MFU uses the FLOP model of
`pipeline/training/flops.py` at the step's real token count.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

PRESETS = {
    # a teacher small enough for a 2-core CPU, with the real vocabulary (the output layer is most of the KD cost)
    "cpu-small": dict(teacher_layers=4, hidden=256, heads=4, ffn=1024, student_layers=2, vocab=30522,
                      micro={128: 8, 512: 4}, chunk=1024),
    # the mission's models: BERT-base teacher, 6 x 768 DistilBERT student
    "bert-base": dict(teacher_layers=12, hidden=768, heads=12, ffn=3072, student_layers=6, vocab=30522,
                      micro={128: 128, 512: 32}, chunk=4096),
    # for the tests only
    "tiny": dict(teacher_layers=2, hidden=32, heads=2, ffn=64, student_layers=1, vocab=2000, micro={16: 2, 32: 2},
                 chunk=8),
}


@dataclass
class Job:
    variant: str            # reference | ours | ours_plain_loss | ours_eager_loss | ours_document | ours_document_padded
    preset: str
    seq_len: int
    micro: int
    steps: int
    warmup: int
    device: str             # cpu | cuda
    data: str | None        # prepared dataset for the document lengths
    chunk_size: int = 1024
    seed: int = 0
    compile: bool = False
    profile: str | None = None   # a file: after the timed steps, 3 more under torch.profiler, its tables written there


def doc_lengths(data: str | None, seed: int, n: int) -> np.ndarray:
    """n document lengths (tokens, with [CLS] and [SEP]) drawn from a prepared dataset's training split."""
    from pipeline.data import PreparedDataset

    lengths = PreparedDataset(data, "train", verify="size").doc_lengths() + 2
    return np.random.default_rng(seed).choice(lengths, size=n, replace=True)


def build_models(job: Job):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from pipeline.models import MaskedLM, build_student

    p = PRESETS[job.preset]
    torch.manual_seed(job.seed)
    config = BertConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], num_hidden_layers=p["teacher_layers"],
                        num_attention_heads=p["heads"], intermediate_size=p["ffn"], max_position_embeddings=512)
    teacher = MaskedLM(BertForMaskedLM(config).eval()).requires_grad_(False)
    student = build_student(teacher=teacher, arch="distilbert", n_layers=p["student_layers"], dropout=0.1,
                            attention_dropout=0.1)
    return teacher, student


def _mask_labels(ids, attention_mask, gen, mask_id=103, rate=0.15):
    import torch

    pick = (torch.rand(ids.shape, generator=gen) < rate) & attention_mask.bool()
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    return ids.masked_fill(pick, mask_id), labels


def make_batches(job: Job, n: int):
    """n micro-batches on the CPU: padded documents for the reference, packed full rows for ours."""
    import torch

    vocab = PRESETS[job.preset]["vocab"]
    gen = torch.Generator().manual_seed(job.seed)
    batches = []
    if job.variant == "reference" or job.variant.startswith("ours_document"):  # the same batches for all three
        lengths = np.minimum(doc_lengths(job.data, job.seed, n * job.micro), job.seq_len).reshape(n, job.micro)
        for row in lengths:
            width = int(row.max())
            am = (torch.arange(width)[None, :] < torch.as_tensor(row)[:, None]).long()
            ids = torch.randint(1000, vocab, (job.micro, width), generator=gen) * am
            ids, labels = _mask_labels(ids, am, gen)
            batches.append({"input_ids": ids, "attention_mask": am, "labels": labels})
    else:
        for _ in range(n):
            ids = torch.randint(1000, vocab, (job.micro, job.seq_len), generator=gen)
            am = torch.ones_like(ids)
            ids, labels = _mask_labels(ids, am, gen)
            batches.append({"input_ids": ids, "attention_mask": am, "labels": labels})
    return batches


def reference_step_fn(job: Job, teacher, student, device):
    """The reference recipe's step (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    t_hf, s_hf = teacher.hf.to(device), student.hf.to(device).train()
    opt = torch.optim.AdamW(s_hf.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, foreach=False, fused=False)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    T = 2.0

    def step(batch):
        ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        with amp:
            s_out = s_hf(input_ids=ids, attention_mask=am, output_hidden_states=True)
            with torch.no_grad():
                t_out = t_hf(input_ids=ids, attention_mask=am, output_hidden_states=True)
        s_logits, t_logits = s_out.logits.float(), t_out.logits.float()           # [B, L, V] each, fp32
        keep = am.bool().unsqueeze(-1).expand_as(s_logits)
        s_sel = torch.masked_select(s_logits, keep).view(-1, s_logits.size(-1))  # [n, V] copies
        t_sel = torch.masked_select(t_logits, keep).view(-1, t_logits.size(-1))
        kd = F.kl_div(F.log_softmax(s_sel / T, -1), F.softmax(t_sel / T, -1), reduction="batchmean") * T * T
        mlm = F.cross_entropy(s_logits.view(-1, s_logits.size(-1)), labels.view(-1), ignore_index=-100)
        h_keep = am.bool().unsqueeze(-1).expand_as(s_out.hidden_states[-1])
        s_h = torch.masked_select(s_out.hidden_states[-1].float(), h_keep).view(-1, s_out.hidden_states[-1].size(-1))
        t_h = torch.masked_select(t_out.hidden_states[-1].float(), h_keep).view(-1, s_h.size(-1))
        cos = F.cosine_embedding_loss(s_h, t_h, torch.ones(s_h.size(0), device=device))
        loss = 5.0 * kd + 2.0 * mlm + 1.0 * cos
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s_hf.parameters(), 5.0)
        opt.step()
        return loss

    return step


def our_step_fn(job: Job, teacher, student, device):
    """The trainer's step: forward_losses through a DeepSpeed engine (world of one), the trainer's optimizer."""
    import deepspeed
    import torch

    from pipeline.training.config import LossConfig, OptimizerConfig
    from pipeline.training.distributed import init_distributed
    from pipeline.training.optim import build_optimizer
    from pipeline.training.step import forward_losses

    on_gpu = device.type == "cuda"
    init_distributed()
    ds = {"train_micro_batch_size_per_gpu": job.micro, "gradient_accumulation_steps": 1,
          "train_batch_size": job.micro, "gradient_clipping": 5.0, "steps_per_print": 10 ** 9}
    if on_gpu:
        ds.update({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
                   "zero_optimization": {"stage": 1}})
        teacher.to(device=device, dtype=torch.bfloat16)
    opt = build_optimizer(student, OptimizerConfig(), on_gpu=on_gpu, offload=False)
    engine, *_ = deepspeed.initialize(model=student, optimizer=opt, config=ds)
    if job.variant == "ours_document":  # the reference's padded document batches, run unpadded (data.unpad)
        from pipeline.models import varlen

        half = torch.bfloat16 if on_gpu else torch.float32
        attention = {"student": varlen.enable(engine.module, device, half,
                                              engine.module.hf.config.attention_dropout),
                     "teacher": varlen.enable(teacher, device, half, 0.0)}
    else:
        attention = None
    if job.compile:
        engine.compile()
        teacher.hf.bert.encoder = torch.compile(teacher.hf.bert.encoder)
    loss_cfg = LossConfig(kd=5.0, mlm=2.0, cos=1.0, kd_tokens="all",
                          chunk_size=0 if job.variant == "ours_plain_loss" else job.chunk_size,
                          compile_chunks=job.variant != "ours_eager_loss")

    def step(batch):
        terms, _ = forward_losses(engine, teacher, batch, loss_cfg)
        engine.backward(terms.total)
        engine.step()
        return terms.total

    step.attention = attention  # the document variants: which attention path each model takes
    return step


def run_job(job: Job) -> dict:
    """Time `job.steps` steps after `job.warmup`, in this process. Returns tokens/s, step time, MFU, peak memory."""
    import torch

    from pipeline.training.flops import H100_MEASURED_BF16, model_shape, step_flops

    device = torch.device(job.device)
    torch.manual_seed(job.seed)
    teacher, student = build_models(job)
    make = reference_step_fn if job.variant == "reference" else our_step_fn
    step = make(job, teacher, student, device)
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(job, job.warmup + job.steps)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for b in batches[:job.warmup]:
        step(b)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    for b in batches[job.warmup:]:
        loss = step(b)
    sync()
    elapsed = time.perf_counter() - t0
    if not torch.isfinite(loss.detach()).item():
        raise RuntimeError(f"{job.variant}: non-finite loss")
    if job.profile:
        profile_steps(step, batches[job.warmup:job.warmup + 3], device, job.profile,
                      f"{job.variant}, {job.preset}, seq {job.seq_len}, micro {job.micro}")
    timed = batches[job.warmup:]
    real_tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    shape_t, shape_s = model_shape(teacher.hf.config), model_shape(student.hf.config)
    # the FLOPs of the model's work on the real tokens, at this sequence length (padding is not work)
    flops = step_flops(shape_t, shape_s, job.seq_len, real_tokens, kd_rows_fraction=1.0)["total"]
    out = {**asdict(job), "tokens": real_tokens,
           "padded_tokens": sum(b["attention_mask"].numel() for b in timed),
           "seconds": elapsed, "tokens_per_s": real_tokens / elapsed, "step_s": elapsed / job.steps,
           "model_tflops_per_s": flops / elapsed / 1e12, "attention": getattr(step, "attention", None)}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        out["gpu"] = torch.cuda.get_device_name()
        out["mfu_vs_h100_measured_bf16"] = flops / elapsed / H100_MEASURED_BF16
    else:
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
        out["rss_before_timing_gib"] = rss_before / 2 ** 30
    return out


def profile_steps(step, batches, device, path: str, title: str) -> None:
    """Run `batches` through `step` under torch.profiler and write where the time goes to `path`: wall time per
    step against the device's busy time (a step far longer than its kernels waits on the host: launches, syncs,
    Python), then the operators by self device time and by self host time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    if on_gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for b in batches:
            step(b)
        if on_gpu:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / len(batches)
    events = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    # the kernels' own time (operator rows repeat their kernels' time, so only device-side rows count)
    busy = sum(getattr(e, dev_attr) for e in events if str(e.device_type).endswith("CUDA")) / 1e6 / len(batches) \
        if on_gpu else None
    lines = [f"# {title}: {len(batches)} steps under torch.profiler",
             f"wall per step {wall * 1e3:.1f} ms" + (f"; device busy per step {busy * 1e3:.1f} ms "
                                                     f"({100 * busy / wall:.0f}%)" if on_gpu else "")]
    if on_gpu:
        lines += ["", "## by self device time", events.table(sort_by=dev_attr, row_limit=30, max_name_column_width=70)]
    lines += ["", "## by self host time", events.table(sort_by="self_cpu_time_total", row_limit=30,
                                                        max_name_column_width=70)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def loss_memory(variant: str, rows: int, hidden: int, vocab: int, device: str, chunk_size: int = 4096,
                seed: int = 0) -> dict:
    """Peak memory of the KD + MLM loss alone (forward and backward from the student's transformed rows), plain
    (full [rows, V] logits of both models, the reference's and the plain path's way) or chunked."""
    import torch

    from pipeline.losses.chunked import chunked_kd_loss
    from pipeline.losses.distill import kd_loss, mlm_loss

    dev = torch.device(device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(seed)
    xs = (torch.randn(rows, hidden, generator=g) * 0.5).to(dev, dt).requires_grad_(True)
    xt = (torch.randn(rows, hidden, generator=g) * 0.5).to(dev, dt)
    ws = (torch.randn(vocab, hidden, generator=g) * 0.05).to(dev, dt).requires_grad_(True)
    wt = (torch.randn(vocab, hidden, generator=g) * 0.05).to(dev, dt)
    bs = torch.zeros(vocab, device=dev, dtype=dt, requires_grad=True)
    bt = torch.zeros(vocab, device=dev, dtype=dt)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(dev)
    labels[torch.rand(rows, generator=g).to(dev) > 0.15] = -100

    def run():
        if variant == "plain":
            s_logits = torch.nn.functional.linear(xs, ws, bs)
            with torch.no_grad():
                t_logits = torch.nn.functional.linear(xt, wt, bt)
            return 5.0 * kd_loss(s_logits, t_logits, 2.0) + 2.0 * mlm_loss(s_logits, labels)
        kd, mlm, _ = chunked_kd_loss(xs, xt, ws, bs, wt, bt, 2.0, labels, chunk_size, kd_weight=5.0, mlm_weight=2.0,
                                     compiled=variant == "chunked_compiled")
        return 5.0 * kd + 2.0 * mlm

    if variant == "chunked_compiled":  # compile first, outside the measurement
        run().backward()
        xs.grad = ws.grad = bs.grad = None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    loss = run()
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # the process's high-water mark over the RSS before: meaningful in the fresh process the benchmark runs
        # this in; in a process that peaked earlier it can read a page or two below zero (statm vs rusage)
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0)
    return {"variant": variant, "rows": rows, "vocab": vocab, "chunk_size": chunk_size, "device": device,
            "peak_extra_gib": peak / 2 ** 30, "seconds": time.perf_counter() - t0}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def in_subprocess(kind: str, payload: dict, timeout: float = 3600) -> dict:
    """Run one measurement in a fresh interpreter (its own peak memory, no allocator state from another)."""
    cmd = [sys.executable, "-m", "benchmarks.step_speed", kind, json.dumps(payload)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} {payload.get('variant')} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def median_by(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


if __name__ == "__main__":  # the worker side of in_subprocess
    import faulthandler
    faulthandler.enable()  # a crash in native code shows where in the stderr that in_subprocess reports
    kind, payload = sys.argv[1], json.loads(sys.argv[2])
    result = run_job(Job(**payload)) if kind == "step" else loss_memory(**payload)
    print("RESULT " + json.dumps(result), flush=True)
