"""Worker for tests/test_distributed.py: fastdpo.model.model_loss under accelerate + DeepSpeed ZeRO-2 / ZeRO-3,
2 CPU processes, gloo (DeepSpeed's CPU accelerator):

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node=2 tests/ds_worker.py --stage 3 --out r.json

Every rank builds the same tiny Llama policy and reference (dist_worker.tiny_llama; --tied-lora: tied input /
output embeddings and a LoRA policy on q_proj / v_proj). The policy is prepared by accelerate with a DeepSpeed
plugin (gradient_clipping 0.0, so that DeepSpeed does not clip; stage3_param_persistence_threshold 0, so that
ZeRO-3 partitions even this tiny model's LM head: asserted), the reference as TRL prepares it (its own
DeepSpeed engine at ZeRO-3, a plain model below). STEPS SGD steps: each rank takes 4 of the 8 pairs of a
global batch in MICRO_BATCHES micro-batches of gradient accumulation; the loss is computed inside the
engine's forward (dist_worker.DPOPolicy). The per-step loss and the final weights are compared with a
single-process run on the whole global batch. Rank 0 writes a JSON summary to --out.
"""
import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from dist_worker import GLOBAL_PAIRS, MICRO_BATCHES, DPOPolicy, make_pairs, pack, tiny_llama

STEPS, LR = 2, 0.1


def policy_model(tied_lora):
    lm = tiny_llama(seed=0, tied=tied_lora)
    if tied_lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(2)
        lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights="gaussian"))
    return DPOPolicy(lm)


def named_weights(model, gather):
    """{name: full parameter} of the trained parameters (ZeRO-3: gathered)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gather([p for _, p in params]):
        return {n: p.detach().clone() for n, p in params}


def single_process(pairs, tied_lora):
    """Per-step losses and final trained weights of one process on the whole global batch."""
    policy = policy_model(tied_lora)
    ref = tiny_llama(seed=1, tied=tied_lora).eval().requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=LR)
    losses = []
    for step in range(STEPS):
        loss = policy(pack(pairs[step * GLOBAL_PAIRS:(step + 1) * GLOBAL_PAIRS]), "model_loss", ref)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


def deepspeed_reference(model, accelerator, stage):
    """The reference model as TRL prepares it: its own ZeRO-3 engine (eval) at stage 3, else a plain model."""
    if stage != 3:
        return model
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeedEngine.eval() returns None
    return engine


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, choices=(2, 3), required=True)
    ap.add_argument("--tied-lora", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.time()
    import deepspeed.ops

    # DeepSpeed's shared-memory CPU all-reduce is a C++ extension compiled on first use (about 2 min on 2 cores);
    # these ranks communicate through gloo without it
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    per_rank_micro = GLOBAL_PAIRS // 2 // MICRO_BATCHES
    config = {"train_micro_batch_size_per_gpu": per_rank_micro, "gradient_accumulation_steps": MICRO_BATCHES,
              "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": 0}}
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config),
                              gradient_accumulation_steps=MICRO_BATCHES)
    rank, world = dist.get_rank(), dist.get_world_size()  # accelerator.process_index may read 0 on every rank
    assert world == 2 and GLOBAL_PAIRS % (world * MICRO_BATCHES) == 0
    torch.use_deterministic_algorithms(True)
    import deepspeed

    pairs = make_pairs(GLOBAL_PAIRS * STEPS)
    want_losses, want_weights = single_process(pairs, args.tied_lora)

    policy = policy_model(args.tied_lora)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=LR)
    engine, optimizer = accelerator.prepare(policy, optimizer)
    ref = deepspeed_reference(tiny_llama(seed=1, tied=args.tied_lora).eval().requires_grad_(False), accelerator,
                              args.stage)
    lm = engine.module.lm.get_base_model() if args.tied_lora else engine.module.lm
    head = lm.lm_head.weight
    result = {"stage": args.stage, "tied_lora": args.tied_lora, "world_size": world, "backend": dist.get_backend(),
              "distributed_type": str(accelerator.distributed_type),
              "engine": type(engine).__name__, "head_rows_at_rest": head.numel() and head.shape[0],
              "head_partitioned": getattr(head, "ds_status", None) is not None and head.numel() == 0,
              "tied": head is lm.model.embed_tokens.weight, "losses": [], "single_losses": want_losses}
    assert accelerator.distributed_type == DistributedType.DEEPSPEED, accelerator.distributed_type

    per_rank = GLOBAL_PAIRS // world
    for step in range(STEPS):
        step_pairs = pairs[step * GLOBAL_PAIRS:(step + 1) * GLOBAL_PAIRS][rank * per_rank:(rank + 1) * per_rank]
        total = torch.zeros(())
        for k in range(MICRO_BATCHES):
            with accelerator.accumulate(engine):
                batch = pack(step_pairs[k * per_rank_micro:(k + 1) * per_rank_micro])
                loss = engine(batch, "model_loss", ref_model=ref)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            total += loss.detach() / MICRO_BATCHES
        dist.all_reduce(total)
        result["losses"].append(total.item() / world)
        if args.stage == 3:  # outside the forward the head is partitioned again
            result["head_partitioned"] &= head.numel() == 0

    if args.stage == 3:  # what a reference forward holds of the head: one full copy, ZeRO-3's own released
        from fastdpo.model import forward_hidden

        with torch.no_grad():
            held = forward_hidden(engine.module.lm, pack(pairs[:2])).weight
        result.update({"head_partition_numel": head.ds_tensor.numel(), "head_numel": head.ds_numel,
                       "held_head_bytes": held.untyped_storage().nbytes(), "head_numel_after": head.numel()})
        result["head_partitioned"] &= (result["head_partition_numel"] == -(-head.ds_numel // world)
                                       and result["held_head_bytes"] == 4 * head.ds_numel and head.numel() == 0)
    gather = deepspeed.zero.GatheredParameters if args.stage == 3 else (lambda params: torch.no_grad())
    got_weights = named_weights(engine.module, gather)
    names = sorted(want_weights)
    missing = sorted(set(want_weights) ^ set(got_weights))
    want, got = (torch.cat([w[n].double().reshape(-1) for n in names]) for w in (want_weights, got_weights))
    initial = torch.cat([p.detach().double().reshape(-1) for n, p in sorted(policy_model(args.tied_lora)
                                                                           .named_parameters()) if n in names])
    per_tensor = {n: ((got_weights[n] - w).abs().max() / w.abs().max()).item() for n, w in want_weights.items()}
    result.update({
        "num_trained": len(names), "missing": missing,
        "weight_rel_diff": ((got - want).norm() / want.norm()).item(),  # all trained weights as one vector
        "max_tensor_rel_diff": max(per_tensor.values()), "worst_tensor": max(per_tensor, key=per_tensor.get),
        "weights_moved_rel": ((want - initial).norm() / want.norm()).item(),  # the steps changed the weights
        "max_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(result["losses"], want_losses)),
        "seconds": time.time() - t0})
    result["ok"] = (not missing and result["weight_rel_diff"] <= 1e-6 and result["max_tensor_rel_diff"] <= 1e-5
                    and result["max_loss_rel_diff"] <= 1e-6 and result["weights_moved_rel"] > 1e-4
                    and (args.stage == 2 or result["head_partitioned"]))
    if rank == 0:
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        print(json.dumps(result))
    del engine, optimizer, ref, policy, lm, head
    accelerator.free_memory()
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
