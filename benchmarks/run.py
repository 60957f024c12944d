"""fastdpo benchmarks: `python benchmarks/run.py` (after `pip install -e .`).

  1. DPO loss-head micro-benchmark: fastdpo (fused LM head, logits form), the plain full-logits
     baseline and the installed peers (TRL, Liger-Kernel, torch F.linear_cross_entropy, Cut
     Cross-Entropy), each implementation x config in a fresh worker process (clean peak memory).
  2. End-to-end DPO training step on a tiny Llama: padded vs packed vs shared-prompt layouts.
  3. Roofline projection for an H100 with Llama-3-8B head shapes (and, on CUDA, each measured cell
     against its roofline).
Markdown tables go to stdout and benchmarks/results/results.md, raw numbers to results.json, charts
to PNG (when matplotlib is installed). Progress goes to stderr.

  --quick     CI smoke run: one tiny config, a few seconds per worker (~40 s in all)
  --full      adds config D (1 pair x 2048 tokens) to the memory-vs-tokens chart and runs torch's
              default-chunking linear_cross_entropy on every config (>10 s per step on CPU)
  --device    cpu (default) or cuda (Triton kernels, bf16, timed with triton.testing.do_bench,
              adds config G = the Llama-3-8B head, and reports achieved GB/s and TFLOP/s)
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

import torch

import e2e as e2e_mod
import report
import roofline
from heads import DEFAULT_CONFIGS, FULL_CONFIGS, GPU_CONFIGS, get_config
from measure import loadavg
from peers import all_impls
from worker import RESULT_TAG

# Started as `python benchmarks/run.py`, Python puts benchmarks/ (not the repository root) first on sys.path:
# the sibling modules import by their plain names, and the root's kernels/ (shipped as fastdpo.kernels) stays
# unimportable as a top-level `kernels`, which transformers would mistake for the Hugging Face package.
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
WORKER = os.path.join(HERE, "worker.py")
# configs skipped on CPU unless --full: >10 s per step at V = 128256 (shared/peers-cpu.md: 13 s and 20 s)
SLOW_ON_CPU = {"torch_lce": ("B", "C", "D")}
QUICK_SKIP = ("liger_compiled", "torch_lce")  # compilation / tiny default chunks: not smoke-test material
QUICK_DEFAULT = ("q2",)  # one tiny config: each worker process costs seconds of imports


def parse_args(argv=None):
    first, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=first, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=rest)
    p.add_argument("--quick", action="store_true", help="tiny shapes (CI smoke run)")
    p.add_argument("--full", action="store_true", help="add config D and run slow peers on every config")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--configs", default=None, help="comma-separated head configs (A,B,C,D,q1,q2)")
    p.add_argument("--impls", default=None, help="comma-separated implementations (default: all): "
                   + ", ".join(all_impls()))
    p.add_argument("--datasets", default=None, help="comma-separated e2e data sets " + str(e2e_mod.DATASETS))
    p.add_argument("--skip-heads", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--no-charts", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per worker process")
    p.add_argument("--out", default=RESULTS_DIR, help="directory for results.md, results.json and charts")
    p.add_argument("--json", default=None, help="results.json path (default: <out>/results.json)")
    return p.parse_args(argv)


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(args) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
           "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
           "threads": args.threads, "device": args.device, "load_before": loadavg()}
    if args.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    for dist in ("transformers", "triton", "fastdpo", "trl", "liger-kernel", "cut-cross-entropy", "matplotlib"):
        env[dist] = _version(dist) or "not installed"
    busy = env["load_before"] is not None and env["load_before"] > 0.5 + 0.25 * (os.cpu_count() or 1)
    if busy and args.device == "cpu":
        env["warning"] = (f"load average {env['load_before']:.1f} before the run: other processes share the CPU, "
                          "timings are not reliable")
    return env


_T0 = time.perf_counter()


def progress(msg):
    print(f"[{time.perf_counter() - _T0:5.0f} s] {msg}", file=sys.stderr, flush=True)


def run_worker(job: dict, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, WORKER, json.dumps(job)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"no result within {args.timeout:.0f} s", "wall_s": args.timeout}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if lines:
        result = json.loads(lines[-1][len(RESULT_TAG):])
    else:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        killed = proc.returncode in (-9, 137)
        result = {"status": "oom" if killed else "error",
                  "note": ("killed (out of memory?)" if killed else f"exit code {proc.returncode}") + ": "
                  + " | ".join(tail)[-300:]}
    result["wall_s"] = time.perf_counter() - t0
    return result


def timing_opts(args, e2e=False) -> dict:
    """Warm-up steps, then timed repeats until budget_s seconds (at least min_repeats, at most max_repeats).
    The default CPU budget keeps `python benchmarks/run.py` at about 5 minutes on 2 quiet cores."""
    if args.quick:
        return dict(warmup=1, min_repeats=2, max_repeats=3, budget_s=0.2)
    if args.device == "cuda":
        return dict(warmup=3, budget_s=2.0)
    if e2e:
        return dict(warmup=1, min_repeats=2, max_repeats=4, budget_s=1.5)
    return dict(warmup=1, min_repeats=2, max_repeats=5, budget_s=2.0)


def plan_heads(args):
    impls = all_impls()
    if args.configs:
        configs = args.configs.split(",")
    elif args.quick:
        configs = list(QUICK_DEFAULT)
    else:
        configs = list(FULL_CONFIGS if args.full else DEFAULT_CONFIGS)
        if args.device == "cuda":
            configs += list(GPU_CONFIGS)
    names = args.impls.split(",") if args.impls else [n for n in impls if not (args.quick and n in QUICK_SKIP)]
    unknown = [n for n in names if n not in impls]
    if unknown:
        raise SystemExit(f"unknown implementation(s) {unknown}; known: {list(impls)}")
    return configs, {n: impls[n] for n in names}


def run_heads(args, dtype, results):
    configs, impls = plan_heads(args)
    heads = {"dtype": dtype, "configs": {c: {**get_config(c).to_dict(), "description": get_config(c).describe()}
                                         for c in configs},
             "impls": {n: {"label": i.label, "group": i.group, "scores": i.scores, "roofline": i.roofline}
                       for n, i in impls.items()},
             "cells": {n: {} for n in impls}, "reference": {}}
    results["heads"] = heads
    jobs = []
    for c in configs:
        jobs.append(("reference", None, c))
        for n, impl in impls.items():
            jobs.append(("head", n, c))
    opts = timing_opts(args)
    for k, (kind, name, c) in enumerate(jobs, 1):
        base = {"config": c, "dtype": dtype, "device": args.device, "threads": args.threads}
        if kind == "reference":
            cfg = get_config(c)
            if cfg.tokens * cfg.vocab * cfg.hidden > 1e11:
                continue  # the float64 reference runs on the CPU: minutes at Llama-3-8B head sizes
            r = run_worker({"kind": "reference", **base}, args)
            if r.get("status") == "ok":
                heads["reference"][c] = r
            progress(f"[{k}/{len(jobs)}] {c} float64 reference loss ({r.get('wall_s', 0):.0f} s)")
            continue
        impl = impls[name]
        reason = impl.unavailable(args.device)
        if reason is None and args.device == "cpu" and not args.full and c in SLOW_ON_CPU.get(name, ()):
            reason = "skipped on CPU by default (>10 s per step at this size); --full runs it"
        if reason:
            r = {"status": "skipped", "note": reason}
        else:
            r = run_worker({"kind": "head", "impl": name, **base, **opts}, args)
        heads["cells"][name][c] = r
        if r.get("status") == "ok":
            heads["memory_method"] = r.get("memory_method")
            msg = f"{r['ms']:.1f} ms, {r['peak_mb']:.0f} MB"
        else:
            msg = f"{r['status']}: {r.get('note', '')[:90]}"
        progress(f"[{k}/{len(jobs)}] {c} {name}: {msg}" + (f" ({r['wall_s']:.0f} s)" if "wall_s" in r else ""))


def run_e2e(args, results):
    preset = "quick" if args.quick else ("cuda" if args.device == "cuda" else "cpu")
    e2e = {"preset": e2e_mod.PRESETS[preset], "datasets": {}}
    results["e2e"] = e2e
    datasets = args.datasets.split(",") if args.datasets else (["hh-rlhf"] if args.quick else list(e2e_mod.DATASETS))
    opts = timing_opts(args, e2e=True)
    for k, ds in enumerate(datasets, 1):
        r = run_worker({"kind": "e2e", "dataset": ds, "preset": preset, "device": args.device,
                        "threads": args.threads, **opts}, args)
        e2e["datasets"][ds] = r
        if r.get("status") == "ok":
            msg = ", ".join(f"{lay} {v['pairs_per_s']:.3g} pairs/s" if v.get("status") == "ok" else f"{lay} {v['status']}"
                            for lay, v in r["layouts"].items())
        else:
            msg = f"{r['status']}: {r.get('note', '')[:120]}"
        progress(f"[e2e {k}/{len(datasets)}] {ds}: {msg} ({r.get('wall_s', 0):.0f} s)")


def measured_roofline(results, env):
    """CUDA: achieved GB/s and TFLOP/s of every measured head cell against its algorithm's roofline."""
    heads = results.get("heads") or {}
    elem = 2 if heads.get("dtype") in ("bf16", "fp16") else 4
    out = {}
    for name, per_cfg in heads.get("cells", {}).items():
        algo = heads["impls"][name]["roofline"]
        for c, cell in per_cfg.items():
            if cell.get("status") == "ok":
                s = roofline.shape_for(get_config(c), elem)
                out.setdefault(name, {})[c] = roofline.measured_against_roofline(algo, s, cell["ms"], env.get("gpu", ""))
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    results = {"env": environment(args), "argv": sys.argv[1:] if argv is None else argv}
    env = results["env"]
    progress(f"fastdpo benchmarks on {env['cpu']} ({env['cores']} cores), torch {env['torch']}, "
             f"{args.threads} threads, device {args.device}, {dtype}" + (" [quick]" if args.quick else ""))
    if env.get("warning"):
        progress("WARNING: " + env["warning"])
    if not args.skip_heads:
        run_heads(args, dtype, results)
    if not args.skip_e2e:
        run_e2e(args, results)
    results["roofline"] = roofline.projection()
    if args.device == "cuda":
        results["roofline_measured"] = measured_roofline(results, env)
    env["load_after"] = loadavg()
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    if not args.no_charts:
        results["charts"], results["chart_note"] = report.charts(results, args.out)
    md = report.markdown(results)
    print(md)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    json_path = args.json or os.path.join(args.out, "results.json")
    report.write_json(results, json_path)
    progress(f"done in {env['wall_s']:.0f} s: {os.path.join(args.out, 'results.md')}, {json_path}"
             + "".join(f", {p}" for p in results.get("charts", [])))
    return results


if __name__ == "__main__":
    main()
