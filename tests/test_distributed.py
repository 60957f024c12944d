"""Multi-process fastdpo: DDP, FSDP2 and a vocabulary-parallel head, 2 CPU processes, gloo.

Each test launches tests/dist_worker.py (see its docstring) with torchrun (torch.distributed.run) or
accelerate launch and checks its JSON summary: losses and gradients equal a single-process run on the
same global batch (|g_dist - g_single| <= 1e-6 + 1e-5 |g_single|, losses within 1e-6), for fastdpo.loss on
padded batches and for fastdpo.model.model_loss on packed shared-prompt batches with two micro-batches of
gradient accumulation; the vocabulary-parallel head is also bitwise equal across ranks and repeated runs.
FSDP2 is also checked with the LM head in its own group (resharded, kept, tied), DeepSpeed ZeRO-2 / ZeRO-3
through accelerate (tests/ds_worker.py: per-step loss and final weights), and the sampler's cross-rank seed
check. Also runs examples/multi_gpu.py (FSDP2) under accelerate launch. About 10-20 s per launch on 2 cores.
"""
import json
import math
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")
DS_WORKER = os.path.join(HERE, "ds_worker.py")
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "multi_gpu.py")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(launcher, script_and_args, cwd, timeout=150, **env_vars):
    """Run a script in 2 processes with torchrun or accelerate launch -> its stdout (fails the test on error)."""
    import torch.distributed as dist

    assert dist.is_available() and dist.is_gloo_available(), "torch.distributed with gloo is required"
    port = free_port()
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={port}"]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **env_vars)
    try:
        proc = subprocess.run(cmd + script_and_args, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=cwd)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{script_and_args} timed out after {timeout}s:\n{(e.stderr or '')[-3000:]}")
    assert proc.returncode == 0, (
        f"{script_and_args} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


def launch(mode, tmp_path, launcher="torchrun"):
    """Run tests/dist_worker.py for the comma-separated engines `mode` -> {engine: results}."""
    out = tmp_path / f"{mode.replace(',', '-')}-{launcher}.json"
    args = [WORKER] + (["--accelerate"] if launcher == "accelerate" else []) + ["--mode", mode, "--out", str(out)]
    run_two_processes(launcher, args, tmp_path)
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and res["backend"] == "gloo" and res["launcher"] == launcher, res
    assert res["ok"] and list(res["modes"]) == mode.split(","), res
    return res["modes"]


def check_equal_to_single_process(r, num_params=21):
    assert r["ok"], r
    assert r["num_params"] == num_params and not r["missing_grads"], r
    assert r["grad_norm"] > 0.1, r
    assert r["max_tolerance_ratio"] <= 1.0, r  # |g_dist - g_single| <= 1e-6 + 1e-5 |g_single|
    assert r["loss_abs_diff"] <= 1e-6, r


def check_data_parallel(res, mode):
    assert set(res["loss_forms"]) == {"fused", "logits"}
    for r in res["loss_forms"].values():
        check_equal_to_single_process(r)
        assert r["local_only_tolerance_ratio"] > 100, r  # the comparison can tell sync from no sync
    r = res["model_loss"]
    check_equal_to_single_process(r)
    assert r["micro_batches"] == 2 and r["pairs_per_rank"] == 4 and r["vocab_parallel_calls_per_step"] == 0, r
    if mode == "fsdp2":  # every parameter, the LM head included, is a DTensor shard at rest
        assert r["wrapper"].startswith("FSDP") and len(r["dtensor_params"]) == 21, r
        assert "lm.lm_head.weight" in r["dtensor_params"], r
    else:
        assert r["wrapper"] == "DistributedDataParallel" and r["dtensor_params"] == [], r


def check_vocab_parallel_head(res):
    r = res["model_loss"]  # model_loss with the policy's and reference's lm_head sharded along V
    check_equal_to_single_process(r)
    assert r["dtensor_params"] == ["lm.lm_head.weight"] and r["pairs_per_rank"] == 8, r
    assert r["vocab_parallel_calls_per_step"] == 4, r  # policy + reference, 2 micro-batches: the op really ran
    assert r["bitwise_across_ranks"] and r["bitwise_repeat"], r
    assert r["forward_logits_max_diff"] <= 1e-5, r  # model.forward still returns the full logits

    vp = res["vocab_parallel"]
    assert vp["ok"], vp
    assert vp["shard_sizes"] == [49, 48]
    assert len(vp["cases"]) == 8  # {plain, scale+softcap+temperature} x {no bias, bias} x {stored, recompute}
    for case in vp["cases"]:  # fp32 against a float64 single-process head
        assert case["logps_rel_err"] <= 1e-5 and case["grad_rel_err"] <= 1e-5, case
        assert case["bitwise_across_ranks"], case
    assert vp["bitwise_repeat"] and vp["stored_equals_recompute_logps"]
    assert vp["reference_path_no_graph"] and vp["reference_path_equals_grad_path"]
    assert vp["process_group_equals_dtensor"]
    assert vp["large_logits_rel_err"] <= 1e-6 and vp["equal_logits_rel_err"] <= 1e-6
    assert vp["no_scored_tokens_zero"]
    refusals = vp["refusals"]
    assert "identical on every rank" in refusals["not_replicated"]
    assert "head_mode='fused'" in refusals["fused"]
    assert "tile the vocabulary" in refusals["overlapping_offsets"]
    assert "must lie in [0, 97)" in refusals["target_out_of_range_on_one_rank"]  # both ranks raise: no hang


def test_torchrun_ddp_and_vocab_parallel_head(tmp_path):
    res = launch("ddp,tp", tmp_path)  # one launch, two engines in turn (each launch costs ~10 s of start-up)
    check_data_parallel(res["ddp"], "ddp")
    sampler = res["ddp"]["sampler"]  # seed per rank: refused on every rank at construction, not silently overlapping
    assert sampler["ok"] and "seed differ" in sampler["refusal"] and "[{'seed': 0}, {'seed': 1}]" in sampler["refusal"]
    check_vocab_parallel_head(res["tp"])


def test_torchrun_fsdp2(tmp_path):
    check_data_parallel(launch("fsdp2", tmp_path)["fsdp2"], "fsdp2")


def test_torchrun_fsdp2_head_in_its_own_group(tmp_path):
    """The LM head in its own fully_shard group: resharded after its forward (the model path all-gathers it
    and reduces its gradient as FSDP2 does), kept unsharded, and tied to the input embedding (one group for
    both); in a non-root group with the final norm, kept unsharded (works) or resharded (refused before the
    forward: it crashed in backward). Before the fix, the resharded head kept each rank's unaveraged gradient
    (off by ~3e-2)."""
    res = launch("fsdp2_head,fsdp2_head_keep,fsdp2_head_tied,fsdp2_lm_keep,fsdp2_lm", tmp_path)
    refused = res.pop("fsdp2_lm")["model_loss"]  # a resharded non-root group of head and final norm
    assert refused["ok"] and "Give the LM head its own fully_shard group" in refused["refusal"], refused
    for mode, r in res.items():
        r = r["model_loss"]
        check_equal_to_single_process(r, num_params=20 if mode.endswith("tied") else 21)
        assert r["max_abs_grad_diff"] <= 1e-6 and r["wrapper"].startswith("FSDP"), r
        assert "lm.lm_head.weight" in r["dtensor_params"] or mode.endswith("tied"), r


def test_accelerate_launch_ddp_with_accumulation(tmp_path):
    res = launch("ddp", tmp_path, launcher="accelerate")["ddp"]
    assert "loss_forms" not in res
    check_equal_to_single_process(res["model_loss"])
    assert res["model_loss"]["wrapper"] == "DistributedDataParallel" and res["model_loss"]["micro_batches"] == 2


def test_multi_gpu_example_fsdp2_under_accelerate(tmp_path):
    out = run_two_processes("accelerate", [EXAMPLE, "--engine", "fsdp2", "--steps", "3", "--pairs-per-rank", "4"],
                            tmp_path)
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step")]
    assert len(losses) == 3, out
    assert abs(losses[0] - math.log(2)) < 1e-4, out  # policy == reference before the first step
    assert losses[-1] < losses[0] - 0.01, out  # it learns


@pytest.mark.parametrize("stage,tied_lora", [(2, False), (3, False), (3, True)],
                         ids=["zero2", "zero3", "zero3-tied-lora"])
def test_accelerate_deepspeed_zero_matches_single_process(tmp_path, stage, tied_lora):
    """model_loss inside a DeepSpeed engine prepared by accelerate (DS_ACCELERATOR=cpu, gloo, 2 ranks under
    torchrun), 2 steps x 2 micro-batches, ZeRO-3 reference: per-step loss and final weights equal one process
    on the global batch. ZeRO-3 partitions the LM head (persistence threshold 0): it is empty at rest."""
    out = tmp_path / "ds.json"
    run_two_processes("torchrun", [DS_WORKER, "--stage", str(stage), "--out", str(out)]
                      + (["--tied-lora"] if tied_lora else []), tmp_path, DS_ACCELERATOR="cpu")
    r = json.loads(out.read_text())
    assert r["ok"], r
    assert r["world_size"] == 2 and r["backend"] == "gloo" and r["distributed_type"] == "DistributedType.DEEPSPEED", r
    assert r["engine"] == "DeepSpeedEngine" and r["tied"] == tied_lora and not r["missing"], r
    assert r["num_trained"] == (8 if tied_lora else 21), r  # LoRA: A and B of q_proj, v_proj in 2 layers
    assert r["head_partitioned"] == (stage == 3) and r["head_rows_at_rest"] == (0 if stage == 3 else 96), r
    assert r["max_loss_rel_diff"] <= 1e-6 and r["weight_rel_diff"] <= 1e-6, r
    assert r["weights_moved_rel"] > 1e-4, r  # the steps really trained
    if stage == 3:  # head 96 x 32: half per rank at rest; a forward holds one full fp32 copy, ZeRO-3's released
        assert r["head_partition_numel"] == 1536 and r["held_head_bytes"] == 4 * 3072, r
        assert r["head_numel_after"] == 0, r
