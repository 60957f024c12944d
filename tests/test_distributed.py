"""fastdpo.loss under DDP and FSDP2 (torch.distributed.fsdp.fully_shard), 2 CPU processes, gloo.

Each test launches tests/dist_worker.py with torch.distributed.run (see its docstring): every rank
computes fastdpo.loss on its half of a global batch (fused hidden/weight form with cached reference
log-probs, and logits form with ref_logits), backward, and the synchronised gradients must equal a
single-process run on the global batch within fp32 tolerance (rtol 1e-5, atol 1e-6). This holds
because fastdpo.loss is a mean over pairs, DDP/FSDP average gradients over ranks and both ranks hold
the same number of pairs. The worker also checks a negative control (one rank's un-synchronised
gradient is far outside the tolerance). About 10-15 s per launch on 2 cores.
"""
import json
import os
import socket
import subprocess
import sys

import pytest


HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode, tmp_path, timeout=150):
    import torch.distributed as dist

    assert dist.is_available() and dist.is_gloo_available(), "torch.distributed with gloo is required"
    out = tmp_path / f"{mode}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", WORKER, "--mode", mode, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{mode} worker timed out after {timeout}s:\n{(e.stderr or '')[-3000:]}")
    assert proc.returncode == 0 and out.is_file(), (
        f"{mode} worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_loss_gradients_match_single_process(mode, tmp_path):
    res = launch(mode, tmp_path)
    assert res["mode"] == mode and res["world_size"] == 2 and res["params_sharded_as_expected"]
    assert set(res["forms"]) == {"fused", "logits"}
    for form, r in res["forms"].items():
        assert r["ok"], (form, r)
        assert r["num_params"] == 21 and not r["missing_grads"], (form, r)
        assert r["grad_norm"] > 0.1, (form, r)
        assert r["max_tolerance_ratio"] <= 1.0, (form, r)  # |g_dist - g_single| <= 1e-6 + 1e-5 |g_single|
        assert r["local_only_tolerance_ratio"] > 100, (form, r)  # the comparison can tell sync from no sync
        assert abs(r["loss_dist_mean"] - r["loss_single"]) <= 1e-6, (form, r)
