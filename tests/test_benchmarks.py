"""Smoke tests of the benchmark harness (benchmarks/): roofline arithmetic, the worker jobs, the report,
and a `run.py --quick` run restricted to two implementations. Tiny shapes only."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

# the benchmark modules import each other by plain name, as when run.py runs as a script (never the repo root:
# its kernels/ must not become a top-level `kernels`)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import report  # noqa: E402
import roofline  # noqa: E402
import run  # noqa: E402
from heads import QUICK_CONFIGS  # noqa: E402
from peers import all_impls  # noqa: E402
from worker import run_job  # noqa: E402

# ------------------------------------------------------------------------------------------------------
# roofline arithmetic
N, NC, V, D = 1000, 400, 5000, 64
S = roofline.Shape(N, NC, V, D, elem=2, pairs=2)


def flops(name):
    return roofline.algorithm_cost(name, S).flops


def test_roofline_flops_count_the_gemms():
    nvd = N * V * D
    # full logits: policy fwd + grad_hidden + grad_weight, reference fwd: 4 GEMMs of 2NVD on every position
    assert flops("full_logits") == pytest.approx(8 * nvd)
    assert flops("fastdpo_logits") == pytest.approx(8 * nvd)
    assert flops("liger") == pytest.approx(8 * nvd)
    # torch (reduction="none"): the backward recomputes the logits
    assert flops("torch_lce") == pytest.approx(10 * nvd)
    # completion positions only; TRL and CCE recompute once; fastdpo's backward recomputes in both passes
    assert flops("trl_chunked") == pytest.approx(10 * NC * V * D)
    assert flops("cce") == pytest.approx(10 * NC * V * D + 4 * NC * D)
    assert flops("fastdpo_fused") == pytest.approx(12 * NC * V * D)
    # GEMM-core head modes: policy 6VD (stored) / 8VD (recompute), reference 2VD
    assert flops("fastdpo_stored") == pytest.approx(8 * NC * V * D)
    assert flops("fastdpo_recompute") == pytest.approx(10 * NC * V * D)


def test_roofline_logits_kernel_bytes():
    """Logits-form kernels: forward reads the scored rows once, backward reads + writes them once."""
    proj_rows = {r["kernel"]: r for r in roofline.kernel_table(S)}
    fwd = proj_rows["sequence_logps forward (logits form)"]
    bwd = proj_rows["sequence_logps backward (logits form)"]
    assert fwd["kb_per_token"] == pytest.approx(V * 2 / 1e3)
    assert bwd["kb_per_token"] == pytest.approx(2 * V * 2 / 1e3)
    assert fwd["bound"] == "memory"
    passes = roofline.fastdpo_logits(S)
    kernel_bwd = next(p for p in passes if p.what == "row_logps_backward")
    assert kernel_bwd.bytes == NC * V * 2 * 2 + (N - NC) * V * 2  # zeros written for rows without a target


def test_roofline_fused_tile_bytes_follow_the_tiling():
    s = roofline.Shape(1024, 1024, 4096, 256, elem=2, pairs=1)
    blocks = {"fwd": (64, 128), "bwd_hidden": (64, 128), "bwd_weight": (64, 128)}
    fwd = roofline.fastdpo_fused_passes(s, blocks=blocks)[0]
    # compulsory: hidden and weight once (+ the [4, splits, M] partials); tiles: weight once per token tile
    # (1024 / 64 = 16 reads) and hidden once per vocab tile (4096 / 128 = 32 reads)
    partials = fwd.bytes - (1024 + 4096) * 256 * 2
    assert 0 < partials < 1024 * 4 * 4 * 2 * 64
    assert fwd.tile_bytes - partials == pytest.approx(16 * 4096 * 256 * 2 + 32 * 1024 * 256 * 2)


def test_roofline_floor_and_projection():
    bw, peak = roofline.H100["bw"], roofline.H100["flops"]
    c = roofline.Cost(flops=2e12, bytes=1e9, requested=1e9)
    assert c.floor_s(bw, peak) == pytest.approx(2e12 / peak) and c.bound(bw, peak) == "compute"
    c = roofline.Cost(flops=1e9, bytes=1e12, requested=1e12)
    assert c.floor_s(bw, peak) == pytest.approx(1e12 / bw) and c.bound(bw, peak) == "memory"
    proj = roofline.projection()
    assert proj["shape"]["vocab"] == 128256 and proj["shape"]["hidden"] == 4096
    rows = {r["algorithm"]: r for r in proj["algorithms"]}
    assert set(rows) == set(roofline.ALGORITHMS)
    for r in rows.values():
        assert r["floor_ms"] == pytest.approx(max(r["compute_ms"], r["memory_ms"]))
    # the full-logits path moves more bytes than the logits-form kernels, which move more than the fused head
    assert rows["full_logits"]["gb"] > rows["fastdpo_logits"]["gb"] > rows["fastdpo_fused"]["gb"]
    assert "Llama-3-8B" in report.roofline_tables(proj)


def test_anchor_projection_per_head_mode():
    anchor = roofline.anchor_projection()
    modes = {(r["algorithm"], r["variant"][:5]): r for r in anchor["modes"]}
    assert {k: round(r["vd_per_token"], 6) for k, r in modes.items()} == {
        ("fastdpo_stored", "today"): 6, ("fastdpo_stored", "fixed"): 6, ("fastdpo_recompute", "today"): 8,
        ("fastdpo_recompute", "fixed"): 8, ("fastdpo_fused", "Trito"): 10}
    # cuBLAS's rate is the source's three GEMMs (6VD) in 18.9 ms; QuACK's 6VD in 16.78 ms is faster
    assert anchor["cublas_tflops"] == pytest.approx(683.1, abs=0.1) and anchor["quack_tflops"] > anchor["cublas_tflops"]
    stored, stored_fixed = modes[("fastdpo_stored", "today")], modes[("fastdpo_stored", "fixed")]
    assert stored["cublas_gemm_ms"] == pytest.approx(18.9)
    # today: + the row pass (2 bytes read, 2 written per logit) + the bf16 -> fp32 -> bf16 round trip of grad_weight
    V, D, M = 128256, 4096, 4096
    assert stored["other_gb"] * 1e9 == pytest.approx(4 * M * V + 12 * V * D)
    assert stored["projected_ms"][0] == pytest.approx(18.9 + (4 * M * V + 12 * V * D) / 4.8e9)
    # fixed: fp32 logits (2 more bytes written by the GEMM, 4 read by the row kernel, U written in bf16), no round trip
    assert stored_fixed["other_gb"] * 1e9 == pytest.approx(2 * M * V + 6 * M * V)
    assert 16.78 < stored_fixed["projected_ms"][0] < stored["projected_ms"][0] < stored["projected_ms"][1]
    assert modes[("fastdpo_recompute", "fixed")]["projected_ms"][0] > stored_fixed["projected_ms"][0]
    assert "projection" in report.markdown({"env": {}, "roofline_anchor": anchor}).lower()


def test_gpu_peaks_lookup():
    assert roofline.gpu_peaks("NVIDIA H100 80GB HBM3") == (3.35e12, 989e12)
    assert roofline.gpu_peaks("NVIDIA H100 PCIe")[0] == 2.0e12
    assert roofline.gpu_peaks("NVIDIA A100-SXM4-40GB")[1] == 312e12
    assert roofline.gpu_peaks("NVIDIA L40S")[0] == 0.864e12
    assert roofline.gpu_peaks("unknown") == (3.35e12, 989e12)


# ------------------------------------------------------------------------------------------------------
# worker jobs (in-process) and the report
@pytest.fixture(autouse=True)
def _keep_torch_state():
    """In-process worker jobs set the thread count and the seed: give the session its own back."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)


def _job(impl, config="q1"):
    return {"kind": "head", "impl": impl, "config": config, "dtype": "fp32", "device": "cpu", "threads": 1,
            "warmup": 1, "min_repeats": 1, "max_repeats": 2, "budget_s": 0.05}


def test_head_jobs_agree_with_the_float64_reference():
    ref = run_job({"kind": "reference", "config": "q1", "dtype": "fp32", "device": "cpu", "threads": 1})
    assert ref["status"] == "ok" and math.isfinite(ref["loss"])
    # the fp32 per-sequence sums of the float64 log-probs stay close to, but are not, the float64 loss
    for key in ("loss_segment_sum_fp32", "loss_torch_sum_fp32"):
        assert ref[key] == pytest.approx(ref["loss"], rel=1e-4) and ref[key] != ref["loss"]
    for impl in ("full_logits", "fastdpo", "fastdpo_logits", "torch_lce_256"):
        r = run_job(_job(impl))
        if r["status"] == "skipped":  # e.g. an older torch without linear_cross_entropy options
            assert impl == "torch_lce_256", r
            continue
        assert r["status"] == "ok", r
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-4), impl
        assert r["ms"] > 0 and r["peak_mb"] >= 0 and len(r["times_ms"]) >= 1


def test_unavailable_peer_is_skipped_not_failed():
    impls = all_impls()
    assert impls["cce"].unavailable("cpu")  # Triton GPU kernels only
    assert run_job({**_job("cce")})["status"] == "skipped"
    assert run_job({**_job("no_such_impl")})["status"] == "error"


def _fake_heads():
    cfg = {c: {**QUICK_CONFIGS[c].to_dict(), "description": QUICK_CONFIGS[c].describe()} for c in ("q1", "q2")}
    impls = {n: {"label": n, "group": g, "scores": "all", "roofline": "full_logits"} for n, g in
             (("fastdpo", "fastdpo"), ("full_logits", "baseline"), ("liger", "peer"), ("trl_chunked", "peer"))}
    cell = lambda ms, mb: {"status": "ok", "ms": ms, "peak_mb": mb, "loss": 0.5}  # noqa: E731
    cells = {"fastdpo": {"q1": cell(10, 5), "q2": cell(20, 10)},
             "full_logits": {"q1": cell(20, 50), "q2": cell(40, 100)},
             "liger": {"q1": cell(15, 20), "q2": {"status": "skipped", "note": "not installed"}},
             "trl_chunked": {"q1": cell(40, 10), "q2": cell(30, 40)}}
    return {"dtype": "fp32", "configs": cfg, "impls": impls, "cells": cells, "reference": {"q1": {"loss": 0.5}}}


def test_ratios_use_the_baseline_and_the_best_peer_of_the_run():
    rows = {(r["impl"], r["config"]): r for r in report.ratio_rows(_fake_heads())}
    q1, q2 = rows[("fastdpo", "q1")], rows[("fastdpo", "q2")]
    assert q1["time_vs_baseline"] == pytest.approx(0.5) and q1["mem_vs_baseline"] == pytest.approx(0.1)
    assert q1["fastest_peer"] == "liger" and q1["time_vs_fastest_peer"] == pytest.approx(10 / 15)
    assert q1["leanest_peer"] == "trl_chunked" and q1["mem_vs_leanest_peer"] == pytest.approx(0.5)
    assert q2["fastest_peer"] == "trl_chunked"  # liger skipped on q2
    md = report.markdown({"env": {"device": "cpu"}, "heads": _fake_heads()})
    assert "10 / 5" in md and "not installed" in md


def test_aggregate_and_noise_flag():
    rounds = [{"status": "ok", "ms": ms, "peak_mb": 5.0, "loss": 0.5, "memory_method": "m"} for ms in (12, 10, 30)]
    cell = run.aggregate(rounds)
    assert (cell["ms"], cell["ms_min"], cell["ms_max"], cell["rounds"]) == (12, 10, 30, 3)
    assert run.aggregate(rounds + [{"status": "oom", "note": "killed"}])["status"] == "oom"
    peer = {"ms": 20, "ms_min": 19, "ms_max": 21}
    assert report.within_noise(cell, peer)  # spread 20 > gap 8
    assert not report.within_noise({"ms": 12, "ms_min": 11, "ms_max": 13}, peer)  # spread 2 < gap 8


def test_rounds_rotate_the_order():
    plan = run.round_plan(["c1", "c2"], ["a", "b", "c"], 3)
    order = lambda r, c: [n for rr, cc, n in plan if rr == r and cc == c]  # noqa: E731
    assert order(0, "c1") == ["a", "b", "c"] and order(1, "c1") == ["b", "c", "a"] and order(2, "c2") == ["c", "a", "b"]
    assert len(plan) == 3 * 2 * 3


# ------------------------------------------------------------------------------------------------------
# run.py --quick (two implementations, no e2e; each measurement a fresh forked process)
def _git_status():
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=run.REPO,
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("git") is None or not os.path.exists(os.path.join(run.REPO, ".git")),
                    reason="needs git and a git checkout")
def test_run_quick_leaves_the_checkout_clean():
    before = _git_status()
    results = run.main(["--quick", "--impls", "full_logits,fastdpo", "--skip-e2e", "--no-charts", "--threads", "1"])
    out = results["out"]
    try:
        assert os.path.dirname(out) == run.RUNS_DIR
        assert _git_status() == before  # results went to the ignored runs/ directory only
        data = json.loads(open(os.path.join(out, "results.json")).read())
        cells = data["heads"]["cells"]
        assert set(cells) == {"full_logits", "fastdpo"}
        for impl, per_cfg in cells.items():
            for c, cell in per_cfg.items():
                assert cell["status"] == "ok", (impl, c, cell)
                assert cell["rounds"] == 2 and cell["ms_min"] <= cell["ms"] <= cell["ms_max"]
                assert "VmHWM" in cell["memory_method"] or "ru_maxrss" in cell["memory_method"]
                assert cell["loss"] == pytest.approx(data["heads"]["reference"][c]["loss"], rel=1e-4)
        md = open(os.path.join(out, "results.md")).read()
        assert "## DPO loss head" in md and "## Roofline projection" in md and "min–max" in md
        assert data["env"]["load_before"] is not None and data["env"]["load_after"] is not None
        assert results["roofline"]["algorithms"]
    finally:
        shutil.rmtree(out)


def test_e2e_quick_layouts():
    r = run_job({"kind": "e2e", "dataset": "tldr", "preset": "quick", "device": "cpu", "threads": 1,
                 "layouts": ["padded", "shared"], "warmup": 1, "min_repeats": 1, "max_repeats": 1, "budget_s": 0.01})
    assert r["status"] == "ok", r
    for layout in ("padded", "shared"):
        lay = r["layouts"][layout]
        assert lay["status"] == "ok", lay
        assert lay["pairs_per_s"] > 0 and math.isfinite(lay["loss"])
    # the shared layout feeds fewer tokens than 2B padded rows (the prompt once per pair)
    assert r["layouts"]["shared"]["computed_tokens"] < r["layouts"]["padded"]["computed_tokens"]
    # attention work counted per layout; packed rows pay their segments, not a dense [T, T] mask
    shared = r["layouts"]["shared"]
    assert 0 < shared["attention_gflop"] <= shared["attention_gflop_dense_mask"]
    assert r["layouts"]["padded"]["attention_gflop"] > 0
    # the optimizer runs with lr 0: same weights, so every layout computes the same loss
    assert r["layouts"]["shared"]["loss"] == pytest.approx(r["layouts"]["padded"]["loss"], rel=1e-4)


def test_charts_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    paths, note = report.charts({"env": {"device": "cpu"}, "heads": _fake_heads()}, str(tmp_path))
    assert note is None and paths and all(os.path.getsize(p) > 1000 for p in paths)
