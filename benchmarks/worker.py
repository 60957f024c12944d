"""One benchmark job in a fresh process: `python benchmarks/worker.py '<job json>'`.

The parent (benchmarks/run.py) starts one worker per implementation x configuration so that each peak
memory figure comes from a clean process. The worker prints its result as the last stdout line,
prefixed with RESULT_TAG. Job kinds:
  {"kind": "head", "impl": ..., "config": ..., "dtype": ..., "device": ..., "threads": ..., timing opts}
  {"kind": "reference", "config": ..., "dtype": ..., ...}      float64 loss on the same inputs
  {"kind": "e2e", ...}                                        see benchmarks/e2e.py
"""
from __future__ import annotations

import json
import sys
import traceback
from dataclasses import replace

import torch

from e2e import run_e2e_job
from heads import DTYPES, get_config, make_inputs, reference_loss
from measure import job_timing, measure_step
from peers import all_impls

RESULT_TAG = "@@FASTDPO_BENCH_RESULT "


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
    return {"status": "ok", "loss": reference_loss(inputs)}


def run_e2e(job) -> dict:
    _setup(job)
    return run_e2e_job(job)


KINDS = {"head": run_head, "reference": run_reference, "e2e": run_e2e}


def run_job(job: dict) -> dict:
    try:
        return KINDS[job["kind"]](job)
    except Exception as e:  # reported, not raised: one failing cell must not stop the run
        return {"status": "error", "note": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    result = run_job(json.loads(argv[0]))
    sys.stdout.flush()
    print(RESULT_TAG + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
