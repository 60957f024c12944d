"""fastdpo benchmarks: `python benchmarks/run.py` (after `pip install -e .`), a few minutes on 2 CPU cores.

  1. DPO loss-head step (policy LM head forward + backward, reference head forward): fastdpo (the default
     head_mode "auto" and each explicit mode), the plain full-logits baseline and the installed peers (TRL,
     Liger-Kernel, torch F.linear_cross_entropy, Cut Cross-Entropy), at V = 32000 and V = 128256.
  2. End-to-end DPO training step on a tiny Llama (benchmarks/e2e.py), on the first data set (--full: all).
  3. Roofline projection (H100 step, H200 anchor) of every algorithm and head mode: projections, not measured.

Method, robust to other load on the machine: the head cells are measured in interleaved rounds; in each round
every implementation x config runs once, each in its own fresh process (forked from a server that has imported
the libraries, so clean peak memory without paying the imports again), in an order rotated every round, so
that drifting machine load hits all implementations alike. A cell reports the median over the rounds and the
spread (min-max of the per-round medians); where the spread exceeds the gap between fastdpo and the fastest
peer, the ratio is marked "within noise". The load average is printed before and after.

Results go to a fresh directory, benchmarks/results/runs/<timestamp>/ (ignored by git; --out to choose
another): results.md (also printed), results.json, charts, worker.log. The committed reference results in
benchmarks/results/ change only with --update-reference. Progress (with an estimate of the time left) goes
to stderr.

  --quick     CI smoke run: tiny shapes, two rounds (seconds)
  --full      configs A-D of shared/peers-cpu.md, every implementation (also Liger compiled=True, fastdpo
              on materialised logits, torch's default-chunking linear_cross_entropy) and every e2e data
              set: about an hour
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
import shutil
import statistics
import subprocess
import sys
import time

import torch

import report
import roofline
from e2e import DATASETS, PRESETS
from heads import DEFAULT_CONFIGS, FULL_CONFIGS, GPU_CONFIGS, get_config
from measure import loadavg
from peers import all_impls
from worker import READY_TAG, RESULT_TAG

# Started as `python benchmarks/run.py`, Python puts benchmarks/ (not the repository root) first on sys.path:
# the sibling modules import by their plain names, and the root's kernels/ (shipped as fastdpo.kernels) stays
# unimportable as a top-level `kernels`, which transformers would mistake for the Hugging Face package.
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")  # committed reference results (--update-reference)
RUNS_DIR = os.path.join(RESULTS_DIR, "runs")  # one directory per run, ignored by git
WORKER = os.path.join(HERE, "worker.py")
# the default run: each installed peer once (its default or CPU-fastest form); the rest behind --full
DEFAULT_IMPLS = ("fastdpo", "fastdpo_stored", "fastdpo_recompute", "fastdpo_fused", "full_logits", "trl_chunked",
                 "liger", "torch_lce_256", "cce")
QUICK_IMPLS = ("fastdpo", "fastdpo_stored", "fastdpo_recompute", "fastdpo_fused", "full_logits", "trl_chunked",
               "liger", "torch_lce_256")
QUICK_CONFIGS = ("q2",)
REFERENCE_FILES = ("results.md", "results.json", "memory_vs_tokens.png", "throughput_by_layout.png")


def parse_args(argv=None):
    first, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=first, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=rest)
    p.add_argument("--quick", action="store_true", help="tiny shapes (CI smoke run)")
    p.add_argument("--full", action="store_true", help="configs A-D and every implementation")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--configs", default=None, help="comma-separated head configs (h32k,h128k,A,B,C,D,q1,q2)")
    p.add_argument("--impls", default=None, help="comma-separated implementations (default: "
                   + ",".join(DEFAULT_IMPLS) + "); all: " + ", ".join(all_impls()))
    p.add_argument("--datasets", default=None, help="comma-separated e2e data sets " + str(DATASETS))
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 3 for the heads, "
                   "the end-to-end preset's 2 (+1 warm-up); --quick 2)")
    p.add_argument("--skip-heads", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--no-charts", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per worker process")
    p.add_argument("--out", default=None, help="results directory (default: a new benchmarks/results/runs/<time>)")
    p.add_argument("--update-reference", action="store_true",
                   help="also copy results.md/json and the charts over the committed ones in benchmarks/results/")
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment(args) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": _git_commit(),
           "machine": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "threads": args.threads, "device": args.device, "load_before": loadavg()}
    if args.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    for dist in ("transformers", "triton", "fastdpo", "trl", "liger-kernel", "cut-cross-entropy", "matplotlib"):
        env[dist] = _version(dist) or "not installed"
    busy = env["load_before"] is not None and env["load_before"] > 0.5 + 0.25 * (os.cpu_count() or 1)
    if busy and args.device == "cpu":
        env["warning"] = (f"load average {env['load_before']:.1f} before the run: other processes share the CPU; "
                          "the interleaved rounds spread that load over every implementation, absolute times are "
                          "slower than on an idle machine")
    return env


# ------------------------------------------------------------------------------------------------------
# progress
def _load(x):
    return "n/a" if x is None else f"{x:.2f}"


def _clock(s):
    return f"{int(s) // 60}:{int(s) % 60:02d}"


class Progress:
    """A progress bar on stderr: jobs done, elapsed time and an estimate of the time left: the measured wall
    time of the same job in an earlier round, else its size estimate scaled by how far the measured jobs
    were from their own estimates (which absorbs the machine's speed and load)."""

    def __init__(self, jobs):
        self.jobs = jobs  # [(key, estimated seconds)]
        self.walls = {}  # key -> last measured seconds
        self.first = [0.0, 0.0]  # estimated and measured seconds of jobs measured for the first time
        self.done = 0
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def left_s(self):
        scale = self.first[1] / self.first[0] if self.first[0] else 1.0
        return sum(self.walls.get(key, est * scale) for key, est in self.jobs[self.done:])

    def step(self, key, wall_s, msg):
        if key not in self.walls:
            self.first[0] += self.jobs[self.done][1]
            self.first[1] += wall_s
        self.walls[key] = wall_s
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        n = len(self.jobs)
        bar = "#" * (24 * self.done // max(n, 1))
        line = (f"[{bar:<24}] {self.done}/{n}  {_clock(elapsed)} elapsed, ~{_clock(self.left_s())} left  | {msg}")
        if self.tty:
            print("\r\033[K" + line, end="" if self.done < n else "\n", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    @staticmethod
    def note(msg):
        print(("\r\033[K" if sys.stderr.isatty() else "") + msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------
# worker server
class WorkerServer:
    """`worker.py --serve` in a subprocess: one fresh (forked) process per job, results as JSON."""

    def __init__(self, args, log_path):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, WORKER, "--serve"], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.timeout = args.timeout
        self.ready = json.loads(self._line(READY_TAG))

    def _line(self, tag):
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag):]
        raise RuntimeError(f"benchmark worker server exited (code {self.proc.wait()}); see {self.log.name}")

    def run(self, job: dict) -> dict:
        t0 = time.perf_counter()
        self.proc.stdin.write(json.dumps({**job, "timeout_s": self.timeout}) + "\n")
        self.proc.stdin.flush()
        result = json.loads(self._line(RESULT_TAG))
        result["wall_s"] = time.perf_counter() - t0
        return result

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


# ------------------------------------------------------------------------------------------------------
# plans
def timing_opts(args, e2e=False) -> dict:
    """Per process: one warm-up step, then timed steps until budget_s (at least min_repeats, at most
    max_repeats). The rounds supply the repeats that the spread is computed from."""
    if args.quick:
        return dict(warmup=1, min_repeats=1, max_repeats=2, budget_s=0.05)
    if args.device == "cuda":
        return dict(warmup=3, budget_s=2.0)
    if e2e:
        return dict(warmup=1, min_repeats=2, max_repeats=4, budget_s=1.5)
    return dict(warmup=1, min_repeats=1, max_repeats=3, budget_s=0.6)


def plan_heads(args):
    impls = all_impls()
    if args.configs:
        configs = args.configs.split(",")
    elif args.quick:
        configs = list(QUICK_CONFIGS)
    else:
        configs = list(FULL_CONFIGS if args.full else DEFAULT_CONFIGS)
        if args.device == "cuda":
            configs += list(GPU_CONFIGS)
    for c in configs:
        try:
            get_config(c)
        except KeyError:
            raise SystemExit(f"unknown config {c!r}") from None
    if args.impls:
        names = args.impls.split(",")
    else:
        names = list(impls) if args.full else list(QUICK_IMPLS if args.quick else DEFAULT_IMPLS)
    unknown = [n for n in names if n not in impls]
    if unknown:
        raise SystemExit(f"unknown implementation(s) {unknown}; known: {list(impls)}")
    return configs, {n: impls[n] for n in names}


def rotated(names, k):
    k %= max(len(names), 1)
    return names[k:] + names[:k]


def estimate_s(cfg, impl_name=None) -> float:
    """A rough seconds estimate of one worker job (progress bar only, replaced by measurements)."""
    gflop = 8 * cfg.tokens * cfg.vocab * cfg.hidden / 1e9
    return 1 + (2 * gflop / 40 if impl_name else gflop / 10)


def round_plan(configs, names, rounds):
    """[(round, config, impl)]: every config, then every implementation in an order rotated each round."""
    return [(r, c, n) for r in range(rounds) for c in configs for n in rotated(names, r)]


def aggregate(rounds: list[dict]) -> dict:
    """One cell from its per-round worker results: median and min-max over rounds of time and memory;
    the first failure when a round failed."""
    failed = [r for r in rounds if r.get("status") != "ok"]
    if failed:
        return failed[0]
    ms = [r["ms"] for r in rounds]
    mb = [r["peak_mb"] for r in rounds]
    return {"status": "ok", "ms": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms), "round_ms": ms,
            "peak_mb": statistics.median(mb), "peak_mb_min": min(mb), "peak_mb_max": max(mb), "round_peak_mb": mb,
            "loss": rounds[0]["loss"], "memory_method": rounds[0]["memory_method"], "rounds": len(rounds),
            "wall_s": sum(r.get("wall_s", 0) for r in rounds)}


# ------------------------------------------------------------------------------------------------------
# runs
def run_heads(args, dtype, rounds, server, progress, results):
    configs, impls = plan_heads(args)
    heads = {"dtype": dtype, "configs": {c: {**get_config(c).to_dict(), "description": get_config(c).describe()}
                                         for c in configs},
             "impls": {n: {"label": i.label, "group": i.group, "scores": i.scores, "roofline": i.roofline}
                       for n, i in impls.items()},
             "cells": {n: {} for n in impls}, "reference": {}}
    results["heads"] = heads
    base = {"dtype": dtype, "device": args.device, "threads": args.threads}
    for c in configs:
        if get_config(c).tokens * get_config(c).vocab * get_config(c).hidden > 1e11:
            continue  # the float64 reference runs on the CPU: minutes at Llama-3-8B head sizes
        r = server.run({"kind": "reference", "config": c, **base})
        if r.get("status") == "ok":
            heads["reference"][c] = r
        progress.step(("reference", c), r["wall_s"], f"{c} float64 reference loss ({r['wall_s']:.0f} s)")
    runnable = []
    for name, impl in impls.items():
        reason = impl.unavailable(args.device)
        if reason:
            heads["cells"][name] = {c: {"status": "skipped", "note": reason} for c in configs}
        else:
            runnable.append(name)
    per_round = {(c, n): [] for c in configs for n in runnable}
    for r, c, name in round_plan(configs, runnable, rounds):
        done = per_round[(c, name)]
        if done and done[-1].get("status") != "ok":  # a failed cell is not retried in later rounds
            progress.step((c, name), 0, f"round {r + 1}: {c} {name}: not retried ({done[-1]['status']})")
            continue
        res = server.run({"kind": "head", "impl": name, "config": c, **base, **timing_opts(args)})
        done.append(res)
        msg = (f"{res['ms']:.0f} ms, {res['peak_mb']:.0f} MB" if res.get("status") == "ok"
               else f"{res['status']}: {res.get('note', '')[:80]}")
        progress.step((c, name), res["wall_s"], f"round {r + 1}: {c} {name}: {msg}")
    for (c, name), measured in per_round.items():
        heads["cells"][name][c] = aggregate(measured)
        if heads["cells"][name][c].get("memory_method"):
            heads["memory_method"] = heads["cells"][name][c]["memory_method"]
    heads["rounds"] = rounds


def e2e_datasets(args):
    """--datasets, else every data set with --full, else the first (the default run's end-to-end step)."""
    if args.datasets:
        return args.datasets.split(",")
    return list(DATASETS) if args.full else list(DATASETS[:1])


def run_e2e(args, server, progress, results):
    preset = "quick" if args.quick else ("cuda" if args.device == "cuda" else "cpu")
    e2e = {"preset": PRESETS[preset], "datasets": {}}
    results["e2e"] = e2e
    for ds in e2e_datasets(args):
        rounds = {} if args.rounds is None else {"rounds": args.rounds}  # else the preset's
        r = server.run({"kind": "e2e", "dataset": ds, "preset": preset, "device": args.device,
                        "threads": args.threads, **rounds, **timing_opts(args, e2e=True)})
        e2e["datasets"][ds] = r
        if r.get("status") == "ok":
            msg = ", ".join(f"{lay} {v['pairs_per_s']:.3g} pairs/s" if v.get("status") == "ok" else f"{lay} {v['status']}"
                            for lay, v in r["layouts"].items())
        else:
            msg = f"{r['status']}: {r.get('note', '')[:120]}"
        progress.step(("e2e", ds), r["wall_s"], f"e2e {ds}: {msg}")


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


def job_list(args, rounds) -> list:
    """[(progress key, estimated seconds)] of every worker job, in run order."""
    jobs = []
    if not args.skip_heads:
        configs, impls = plan_heads(args)
        runnable = [n for n, i in impls.items() if not i.unavailable(args.device)]
        jobs += [(("reference", c), estimate_s(get_config(c))) for c in configs
                 if get_config(c).tokens * get_config(c).vocab * get_config(c).hidden <= 1e11]
        jobs += [((c, n), estimate_s(get_config(c), n)) for _, c, n in round_plan(configs, runnable, rounds)]
    if not args.skip_e2e:
        jobs += [(("e2e", ds), 5 if args.quick else 30) for ds in e2e_datasets(args)]
    return jobs


def output_dir(args) -> str:
    if args.out:
        return args.out
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, k = os.path.join(RUNS_DIR, stamp), 1
    while os.path.exists(path):  # two runs in the same second
        path, k = os.path.join(RUNS_DIR, f"{stamp}-{k}"), k + 1
    return path


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    rounds = args.rounds or (2 if args.quick else 3)
    out = output_dir(args)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    results = {"env": environment(args), "argv": sys.argv[1:] if argv is None else argv}
    env = results["env"]
    Progress.note(f"fastdpo benchmarks on {env['cpu']} ({env['cores']} cores), torch {env['torch']}, "
                  f"{args.threads} threads, device {args.device}, {dtype}, {rounds} rounds"
                  + (" [quick]" if args.quick else "") + f"; load average {_load(env['load_before'])}; results -> {out}")
    if env.get("warning"):
        Progress.note("WARNING: " + env["warning"])
    progress = Progress(job_list(args, rounds))
    server = WorkerServer(args, os.path.join(out, "worker.log"))
    Progress.note(f"worker server ready (libraries imported in {server.ready['import_s']:.0f} s)")
    try:
        if not args.skip_heads:
            run_heads(args, dtype, rounds, server, progress, results)
        if not args.skip_e2e:
            run_e2e(args, server, progress, results)
    finally:
        server.close()
    results["roofline"] = roofline.projection()
    results["roofline_anchor"] = roofline.anchor_projection()
    if args.device == "cuda":
        results["roofline_measured"] = measured_roofline(results, env)
    env["load_after"] = loadavg()
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    if not args.no_charts:
        results["charts"], results["chart_note"] = report.charts(results, out)
    md = report.markdown(results)
    print(md)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + "\n")
    report.write_json(results, os.path.join(out, "results.json"))
    if args.update_reference:
        for name in REFERENCE_FILES:
            if os.path.exists(os.path.join(out, name)):
                shutil.copy(os.path.join(out, name), os.path.join(RESULTS_DIR, name))
    Progress.note(f"done in {_clock(env['wall_s'])} ({env['wall_s']:.0f} s wall); load average "
                  f"{_load(env['load_before'])} before, {_load(env['load_after'])} after; results in {out}"
                  + (f" (copied to {RESULTS_DIR})" if args.update_reference else ""))
    results["out"] = out
    return results


if __name__ == "__main__":
    main()
