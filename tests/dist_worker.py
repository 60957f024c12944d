"""Worker for tests/test_distributed.py: fastdpo.loss under DDP / FSDP2 on CPU with gloo.

Run as ``python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py --mode ddp|fsdp2
--out results.json``. Every rank builds the same tiny LlamaForCausalLM policy (fixed seed) and a
reference model, takes its half of a global batch of preference pairs and computes fastdpo.loss in
two forms:

* ``fused``: hidden/weight form (base model's last hidden state + lm_head.weight), reference
  log-probs from a fastdpo.ref_cache.ReferenceCache built with the reference model;
* ``logits``: logits form with ``ref_logits`` from the reference model's forward.

then backward. The gradients (averaged by DDP's all-reduce / FSDP2's reduce-scatter, FSDP2 grads
gathered with ``full_tensor()``) are compared with a single-process run of the same model on the
whole global batch. fastdpo.loss is a mean over pairs; DDP and FSDP average gradients over ranks,
so the mean of the per-rank means equals the global mean only because every rank holds the same
number of pairs (global batch 2 x 4 pairs here). With unequal counts, weight each rank's loss by
(its pairs x world size / global pairs).

The loss is computed inside the wrapped module's forward, so the LM head weight is used while FSDP2
has it unsharded and DDP sees a regular forward. Rank 0 writes a JSON summary to ``--out``; the
worker exits non-zero if a comparison fails.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import fastdpo
from fastdpo.ref_cache import ReferenceCache

VOCAB, GLOBAL_PAIRS, BETA = 96, 8, 0.1
RTOL, ATOL = 1e-5, 1e-6  # fp32; gradient norm is ~1.7, entries up to ~0.3


def tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attention_dropout=0.0, initializer_range=0.3)
    return LlamaForCausalLM(cfg).float()


def make_pairs(n, seed=1234):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        lp, lc, lr = (int(x) for x in torch.randint(2, 9, (3,), generator=g))
        pairs.append({k: torch.randint(0, VOCAB, (n_,), generator=g).tolist()
                      for k, n_ in (("prompt_input_ids", lp), ("chosen_input_ids", lc), ("rejected_input_ids", lr))})
    return pairs


class DPOPolicy(torch.nn.Module):
    """Policy whose forward returns the DPO loss (so DDP / FSDP2 hooks see the whole computation)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, labels, form, ref_logps=None, ref_logits=None):
        if form == "fused":
            hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            out = fastdpo.loss(hidden=hidden, weight=self.lm.lm_head.weight, labels=labels,
                               ref_logps=ref_logps, beta=BETA)
        else:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
            out = fastdpo.loss(logits, labels, ref_logits=ref_logits, beta=BETA)
        return out.loss


def collate_pairs(pairs):
    """TRL-order padded batch: b chosen rows then b rejected rows, right padded, labels -100 on prompt/padding."""
    rows = [(p["prompt_input_ids"], p[k]) for k in ("chosen_input_ids", "rejected_input_ids") for p in pairs]
    T = max(len(pr) + len(c) for pr, c in rows)
    batch = {"input_ids": torch.zeros(len(rows), T, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), T, dtype=torch.long),
             "labels": torch.full((len(rows), T), -100, dtype=torch.long)}
    for r, (pr, c) in enumerate(rows):
        n = len(pr) + len(c)
        batch["input_ids"][r, :n] = torch.tensor(pr + c)
        batch["attention_mask"][r, :n] = 1
        batch["labels"][r, len(pr):n] = torch.tensor(c)
    return batch


def reference_inputs(ref_model, cache, pairs):
    batch = collate_pairs(pairs)
    with torch.no_grad():
        batch["ref_logits"] = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    batch["ref_logps"] = cache.ref_logps(pairs)
    return batch


def run(model, batch, form):
    loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"], form,
                 ref_logps=batch["ref_logps"], ref_logits=batch["ref_logits"])
    loss.backward()
    return loss.detach()


def compare(g_ref, g_other):
    """(max |a - b|, max of |a - b| / (ATOL + RTOL |a|), worst parameter); <= 1 means within tolerance."""
    max_abs = max_ratio = 0.0
    worst = None
    for n, a in g_ref.items():
        b = g_other[n]
        if a is None or b is None:
            continue
        d = (a - b).abs()
        ratio = (d / (ATOL + RTOL * a.abs())).max().item()
        if ratio > max_ratio:
            max_ratio, worst = ratio, n
        max_abs = max(max_abs, d.max().item())
    return max_abs, max_ratio, worst


def full_grads(model, prefix):
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            grads[name.removeprefix(prefix)] = None
            continue
        if hasattr(g, "full_tensor"):  # FSDP2 DTensor shard -> full gradient
            g = g.full_tensor()
        grads[name.removeprefix(prefix)] = g.detach().clone()
    return grads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("ddp", "fsdp2"), required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.time()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert GLOBAL_PAIRS % world == 0, "equal pair counts per rank are required for mean-of-means == mean"
    torch.use_deterministic_algorithms(True)

    pairs = make_pairs(GLOBAL_PAIRS)
    per_rank = GLOBAL_PAIRS // world
    local = pairs[rank * per_rank:(rank + 1) * per_rank]
    ref_model = tiny_llama(seed=1).eval()
    cache = ReferenceCache.build(pairs, ref_model, batch_size=3, progress=False)
    global_batch = reference_inputs(ref_model, cache, pairs)
    local_batch = reference_inputs(ref_model, cache, local)

    single = DPOPolicy(tiny_llama(seed=0))
    dist_model = DPOPolicy(tiny_llama(seed=0))
    if args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist_model = DDP(dist_model)
        prefix = "module."
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in dist_model.lm.model.layers:
            fully_shard(layer)
        fully_shard(dist_model)
        prefix = ""
    from torch.distributed.tensor import DTensor

    sharded = all(isinstance(p, DTensor) for p in dist_model.parameters()) == (args.mode == "fsdp2")
    results = {"mode": args.mode, "world_size": world, "params_sharded_as_expected": sharded,
               "pairs_per_rank": per_rank, "forms": {}}
    ok = True
    for form in ("fused", "logits"):
        single.zero_grad(set_to_none=True)
        dist_model.zero_grad(set_to_none=True)
        ref_loss = run(single, global_batch, form)
        loss = run(dist_model, local_batch, form)
        loss_sum = loss.clone()
        dist.all_reduce(loss_sum)
        g_ref, g_dist = full_grads(single, ""), full_grads(dist_model, prefix)
        assert g_ref.keys() == g_dist.keys(), (sorted(g_ref)[:3], sorted(g_dist)[:3])
        missing = [n for n in g_ref if g_ref[n] is None or g_dist[n] is None]
        max_abs, max_rel, worst = compare(g_ref, g_dist)
        # negative control: the un-synchronised gradient of this rank's half alone must NOT pass
        single.zero_grad(set_to_none=True)
        run(single, local_batch, form)
        _, control_ratio, _ = compare(g_ref, full_grads(single, ""))
        grad_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g_ref.values() if g is not None)).item()
        form_ok = not missing and max_rel <= 1.0 and control_ratio > 100 and grad_norm > 0 and sharded and \
            abs(loss_sum.item() / world - ref_loss.item()) <= 1e-6 * max(1.0, abs(ref_loss.item()))
        ok &= form_ok
        results["forms"][form] = {
            "ok": form_ok, "max_abs_grad_diff": max_abs, "max_tolerance_ratio": max_rel, "worst_param": worst,
            "local_only_tolerance_ratio": control_ratio, "grad_norm": grad_norm, "num_params": len(g_ref),
            "missing_grads": missing,
            "loss_single": ref_loss.item(), "loss_dist_mean": loss_sum.item() / world,
        }
    results["seconds"] = time.time() - t0
    if rank == 0:
        with open(args.out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        print(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
