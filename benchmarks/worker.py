"""Benchmark jobs, each in a fresh process: `python benchmarks/worker.py --serve` (started by run.py).

The server imports the heavy libraries once (torch, transformers, fastdpo, the installed peers: ~10 s), runs
no computation itself, and then forks one child process per job read from stdin (one JSON object a line).
Each measurement thus gets its own process (its own heap and memory high-water mark, nothing left over
from an earlier measurement) without paying the imports again. The child's result comes back on stdout as
one line prefixed with RESULT_TAG. Job kinds:
  {"kind": "head", "impl": ..., "config": ..., "dtype": ..., "device": ..., "threads": ..., timing opts}
  {"kind": "reference", "config": ..., "dtype": ..., ...}      float64 losses on the same inputs
  {"kind": "e2e", ...}                                        see benchmarks/e2e.py
Every job may carry "timeout_s": the child is killed when it has not answered by then.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import select
import signal
import sys
import time
import traceback
from dataclasses import replace

import torch

from heads import DTYPES, get_config, make_inputs, reference_losses
from measure import job_timing, measure_step
from peers import all_impls

RESULT_TAG = "@@FASTDPO_BENCH_RESULT "
READY_TAG = "@@FASTDPO_BENCH_READY "
# imported by the server before it forks, when installed (a missing or broken one fails its own jobs only)
PRELOAD = ("e2e", "transformers.models.llama.modeling_llama", "trl.kernels", "liger_kernel.chunked_loss",
           "cut_cross_entropy")


def _setup(job):
    torch.set_num_threads(int(job.get("threads", 2)))
    torch.manual_seed(0)


def prime(impl, cfg, dtype, device):
    """One step on tiny shapes before the memory baseline: lazy imports (torch's linear_cross_entropy pulls in
    ~900 modules, ~150 MB, on its first call), thread pools and allocator state are then not counted as the
    implementation's memory. Compiled graphs are dropped again so the real shapes compile as in a fresh run."""
    tiny = replace(cfg, name="prime", pairs=1, seq_len=16, prompt_len=8, vocab=min(cfg.vocab, 512))
    impl.build(make_inputs(tiny, dtype, device, seed=1))()
    dynamo = sys.modules.get("torch._dynamo")  # loaded only when the step compiled something
    if dynamo is not None:
        dynamo.reset()


def run_head(job) -> dict:
    _setup(job)
    impl = all_impls()[job["impl"]]
    reason = impl.unavailable(job["device"])
    if reason:
        return {"status": "skipped", "note": reason}
    cfg = get_config(job["config"])
    dtype = DTYPES[job["dtype"]]
    prime(impl, cfg, dtype, job["device"])
    inputs = make_inputs(cfg, dtype, job["device"], seed=job.get("seed", 0))
    result = measure_step(impl.build(inputs), job["device"], **job_timing(job))
    return {"status": "ok", **result}


def run_reference(job) -> dict:
    _setup(job)
    inputs = make_inputs(get_config(job["config"]), DTYPES[job["dtype"]], "cpu", seed=job.get("seed", 0))
    return {"status": "ok", **reference_losses(inputs)}


def run_e2e(job) -> dict:
    _setup(job)
    from e2e import run_e2e_job  # imports transformers: only e2e jobs pay for it outside the server

    return run_e2e_job(job)


KINDS = {"head": run_head, "reference": run_reference, "e2e": run_e2e}


def run_job(job: dict) -> dict:
    try:
        return KINDS[job["kind"]](job)
    except Exception as e:  # reported, not raised: one failing cell must not stop the run
        return {"status": "error", "note": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()}


def _read_until(fd, deadline) -> bytes | None:
    """Everything written to pipe `fd` until its writer closes it, or None at `deadline` (perf_counter)."""
    data = b""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return data
        data += chunk


def run_forked(job: dict) -> dict:
    """run_job(job) in a child process forked from this one; killed after job["timeout_s"] seconds."""
    timeout = float(job.get("timeout_s", 600))
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: stray prints go to stderr (the log), the result to the pipe
        os.close(read_fd)
        os.dup2(2, 1)
        try:
            os.write(write_fd, json.dumps(run_job(job)).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    data = _read_until(read_fd, time.perf_counter() + timeout)
    os.close(read_fd)
    if data is None:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if data is None:
        return {"status": "timeout", "note": f"no result within {timeout:.0f} s"}
    if data:
        return json.loads(data)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return {"status": "oom" if killed else "error",
            "note": "killed (out of memory?)" if killed else f"child exit status {status}, no result"}


def preload() -> dict:
    """Import the PRELOAD modules that are installed; {module: error} for those whose import failed."""
    failed = {}
    for name in PRELOAD:
        try:
            if importlib.util.find_spec(name.split(".")[0]) is not None:
                importlib.import_module(name)
        except Exception as e:  # the jobs that need it report it
            failed[name] = f"{type(e).__name__}: {e}"[:200]
    return failed


def serve(stdin=sys.stdin, stdout=sys.stdout):
    """Preload, announce READY, then fork one child per job line until stdin closes."""
    t0 = time.perf_counter()
    failed = preload()
    print(READY_TAG + json.dumps({"import_s": time.perf_counter() - t0, "failed": failed}), file=stdout, flush=True)
    for line in stdin:
        if line.strip():
            print(RESULT_TAG + json.dumps(run_forked(json.loads(line))), file=stdout, flush=True)


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve"]:
        raise SystemExit("usage: python benchmarks/worker.py --serve  (started by benchmarks/run.py)")
    serve()
