"""Worker for tests/test_distributed.py: fastdpo under DDP, FSDP2 and a vocabulary-parallel head, CPU + gloo.

Launch with torchrun or accelerate (2 processes):

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py --mode ddp,tp --out r.json
    python -m accelerate.commands.launch --multi_gpu --num_processes=2 tests/dist_worker.py --mode ddp \
        --accelerate --out r.json

Every rank builds the same tiny LlamaForCausalLM policy (fixed seed) and a reference model. Checks, each
against a single-process run of the same model on the whole global batch of 8 preference pairs:

* ``loss_forms`` (ddp, fsdp2 under torchrun): fastdpo.loss on this rank's half of a padded batch, in the
  fused hidden/weight form (reference log-probs from a ReferenceCache) and the logits form (ref_logits).
* ``model_loss`` (every mode): fastdpo.model.model_loss on packed shared-prompt batches
  (pack_pairs(..., shared_prompt=True)) with a reference model, two micro-batches of gradient accumulation
  per rank (DDP no_sync / FSDP2 set_requires_gradient_sync(False) / accelerate's accumulate() on the first).
  ddp/fsdp2: each rank takes 4 of the 8 pairs; tp: both ranks take all 8 pairs, the policy's and the
  reference's lm_head are sharded along the vocabulary (fastdpo.distributed.shard_lm_head -> DTensor Shard(0))
  and go through the vocabulary-parallel op (its calls are counted); there the loss and every gradient must
  also be bitwise equal on both ranks and between two repeated runs, and model.forward's gathered logits
  equal the single-process logits.
* ``vocab_parallel`` (tp): the op against a float64 single-process head (uneven shards V = 97 -> 49 + 48,
  logit transforms, bias, packed sequences, both head modes), large logits, no scored token, the reference
  path, the process_group= form, and refusals raised on both ranks together (no hang).

FSDP2 modes: ``fsdp2`` (the head in the root group), ``fsdp2_head`` (the head in its own group, resharded after
its forward), ``fsdp2_head_keep`` (reshard_after_forward=False), ``fsdp2_head_tied`` (tied embeddings, one
group for embedding and head), ``fsdp2_lm_keep`` / ``fsdp2_lm`` (the head in a non-root group with the rest of
the causal LM, reshard_after_forward False / True: the latter is refused). ``ddp`` also checks PreferenceShardSampler across ranks (``sampler``).

``--mode ddp,tp`` runs several engines in one launch (each launch costs ~10 s of start-up).

Gradients (DDP all-reduce, FSDP2 reduce-scatter -> full_tensor(), TP DTensor shards -> full_tensor()) are
compared with |a - b| <= ATOL + RTOL |a|. fastdpo.loss is a mean over pairs and DDP/FSDP average over
ranks, so the per-rank mean equals the global mean because every rank holds the same number of pairs;
with gradient accumulation each micro-batch loss is divided by the number of micro-batches. The loss is
computed inside the wrapped module's forward, so FSDP2 has the parameters unsharded and DDP sees a regular
forward. Rank 0 writes a JSON summary to ``--out``; the worker exits non-zero if a check fails.
"""
import argparse
import gc
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

import fastdpo
from fastdpo.model import model_loss
from fastdpo.packing import pack_pairs
from fastdpo.distributed import shard_lm_head
from fastdpo.parallel import vocab_parallel_sequence_logps
from fastdpo.ref_cache import ReferenceCache

VOCAB, GLOBAL_PAIRS, MICRO_BATCHES, BETA = 96, 8, 2, 0.1
RTOL, ATOL = 1e-5, 1e-6  # fp32; gradient norm is ~1.7, entries up to ~0.3


def tiny_llama(seed, tied=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, attention_dropout=0.0, initializer_range=0.3,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).float()


def make_pairs(n, seed=1234):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        lp, lc, lr = (int(x) for x in torch.randint(2, 9, (3,), generator=g))
        pairs.append({k: torch.randint(0, VOCAB, (n_,), generator=g).tolist()
                      for k, n_ in (("prompt_input_ids", lp), ("chosen_input_ids", lc), ("rejected_input_ids", lr))})
    return pairs


def pack(pairs):
    return pack_pairs([p["prompt_input_ids"] for p in pairs], [p["chosen_input_ids"] for p in pairs],
                      [p["rejected_input_ids"] for p in pairs], max_tokens=64, shared_prompt=True)


class DPOPolicy(torch.nn.Module):
    """Policy whose forward returns the DPO loss (so DDP / FSDP2 hooks see the whole computation)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, batch, form, ref_model=None):
        if form == "model_loss":
            return model_loss(self.lm, batch, ref_model=ref_model, beta=BETA).loss
        if form == "fused":
            hidden = self.lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            out = fastdpo.loss(hidden=hidden, weight=self.lm.lm_head.weight, labels=batch["labels"],
                               ref_logps=batch["ref_logps"], beta=BETA)
        else:
            logits = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out = fastdpo.loss(logits, batch["labels"], ref_logits=batch["ref_logits"], beta=BETA)
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
    """{parameter name: full gradient} (DTensor shards -> full_tensor(), a collective on every rank)."""
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        grads[name.removeprefix(prefix)] = None if g is None else g.detach().clone()
    return grads


def grad_norm(grads):
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values() if g is not None)).item()


def same_on_all_ranks(tensors):
    """True when every tensor has the same bits on every rank."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def wrap(mode, model, accelerator, mesh):
    """(wrapped model, parameter-name prefix) for the engine of `mode`."""
    if accelerator is not None:
        return accelerator.prepare(model), "module."
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model), "module."
    if mode.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        for layer in model.lm.model.layers:
            fully_shard(layer)
        head_group = {"fsdp2_head": [model.lm.lm_head], "fsdp2_head_keep": [model.lm.lm_head],
                      "fsdp2_head_tied": [model.lm.model.embed_tokens, model.lm.lm_head]}.get(mode)
        if head_group:  # the LM head in its own group (torchtitan-style), resharded after its forward or not
            fully_shard(head_group, reshard_after_forward=mode != "fsdp2_head_keep")
        if mode in ("fsdp2_lm", "fsdp2_lm_keep"):  # the head in a non-root group with the final norm
            fully_shard(model.lm, reshard_after_forward=mode == "fsdp2_lm")
        return fully_shard(model), ""
    shard_lm_head(model.lm, mesh)  # lm_head.weight: DTensor Shard(0)
    return model, ""


def accumulation_context(mode, model, accelerator, sync):
    """Skip the gradient synchronisation of the first micro-batch, as the engine recommends."""
    import contextlib

    if accelerator is not None:
        return accelerator.accumulate(model)
    if mode == "ddp" and not sync:
        return model.no_sync()
    if mode.startswith("fsdp2"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def check_loss_forms(mode, pairs, ref_model):
    """fastdpo.loss on a padded half-batch per rank (fused + logits forms) vs the single-process gradient."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = GLOBAL_PAIRS // world
    local = pairs[rank * per_rank:(rank + 1) * per_rank]
    cache = ReferenceCache.build(pairs, ref_model, batch_size=3, progress=False)
    global_batch, local_batch = reference_inputs(ref_model, cache, pairs), reference_inputs(ref_model, cache, local)
    single = DPOPolicy(tiny_llama(seed=0))
    dist_model, prefix = wrap(mode, DPOPolicy(tiny_llama(seed=0)), None, None)
    results = {}
    for form in ("fused", "logits"):
        single.zero_grad(set_to_none=True)
        dist_model.zero_grad(set_to_none=True)
        ref_loss = single(global_batch, form)
        ref_loss.backward()
        loss = dist_model(local_batch, form)
        loss.backward()
        loss_sum = loss.detach().clone()
        dist.all_reduce(loss_sum)
        g_ref, g_dist = full_grads(single, ""), full_grads(dist_model, prefix)
        missing = [n for n in g_ref if g_ref[n] is None or g_dist.get(n) is None]
        max_abs, max_ratio, worst = compare(g_ref, g_dist)
        single.zero_grad(set_to_none=True)  # negative control: this rank's half alone must NOT pass
        single(local_batch, form).backward()
        _, control_ratio, _ = compare(g_ref, full_grads(single, ""))
        loss_diff = abs(loss_sum.item() / world - ref_loss.item())
        results[form] = {
            "ok": not missing and max_ratio <= 1.0 and control_ratio > 100 and loss_diff <= 1e-6,
            "max_abs_grad_diff": max_abs, "max_tolerance_ratio": max_ratio, "worst_param": worst,
            "local_only_tolerance_ratio": control_ratio, "grad_norm": grad_norm(g_ref), "num_params": len(g_ref),
            "missing_grads": missing, "loss_single": ref_loss.item(), "loss_dist_mean": loss_sum.item() / world,
            "loss_abs_diff": loss_diff,
        }
    return results


FSDP2_MODES = ("fsdp2", "fsdp2_head", "fsdp2_head_keep", "fsdp2_head_tied", "fsdp2_lm", "fsdp2_lm_keep")
TIED_MODES = ("fsdp2_head_tied",)
VOCAB_PARALLEL_CALLS = [0]  # calls fastdpo.logps routed to the vocabulary-parallel op (see count_vocab_parallel_calls)


def count_vocab_parallel_calls():
    """Wrap the op that fastdpo.logps routes DTensor head weights to, counting its calls."""
    import fastdpo.logps

    op = fastdpo.logps.vocab_parallel_sequence_logps

    def counted(*args, **kwargs):
        VOCAB_PARALLEL_CALLS[0] += 1
        return op(*args, **kwargs)

    fastdpo.logps.vocab_parallel_sequence_logps = counted


def check_model_loss(mode, pairs, accelerator, mesh):
    """model_loss on packed shared-prompt micro-batches with gradient accumulation vs one single-process step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tied = mode in TIED_MODES
    ref_model = tiny_llama(seed=1, tied=tied).eval().requires_grad_(False)
    single = DPOPolicy(tiny_llama(seed=0, tied=tied))
    single_loss = single(pack(pairs), "model_loss", ref_model)
    single_loss.backward()
    g_ref = full_grads(single, "")

    if mode == "tp":  # tensor parallel: every rank scores the whole batch with its vocabulary shard
        local = pairs
        dist_ref = tiny_llama(seed=1).eval().requires_grad_(False)
        wrap(mode, DPOPolicy(dist_ref), None, mesh)
    else:  # data parallel: this rank's share of the pairs
        per_rank = GLOBAL_PAIRS // world
        local, dist_ref = pairs[rank * per_rank:(rank + 1) * per_rank], ref_model
    per_micro = len(local) // MICRO_BATCHES
    micro_batches = [pack(local[k * per_micro:(k + 1) * per_micro]) for k in range(MICRO_BATCHES)]
    dist_model, prefix = wrap(mode, DPOPolicy(tiny_llama(seed=0, tied=tied)), accelerator, mesh)

    def step():
        dist_model.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for k, batch in enumerate(micro_batches):
            with accumulation_context(mode, dist_model, accelerator, sync=k == MICRO_BATCHES - 1):
                loss = dist_model(batch, "model_loss", dist_ref)
                if accelerator is not None:
                    accelerator.backward(loss)  # divides by gradient_accumulation_steps itself
                else:
                    (loss / MICRO_BATCHES).backward()
            total += loss.detach() / MICRO_BATCHES
        return total, full_grads(dist_model, prefix)

    if mode == "fsdp2_lm":  # refused before the forward, on every rank (it would free the norm for backward)
        try:
            step()
            refusal = None
        except ValueError as error:
            refusal = str(error)
        return {"mode": mode, "refusal": refusal, "ok": refusal is not None and "non-root FSDP2 group" in refusal}
    calls_before = VOCAB_PARALLEL_CALLS[0]
    loss, g_dist = step()
    from torch.distributed.tensor import DTensor

    result = {"mode": mode, "micro_batches": MICRO_BATCHES, "pairs_per_rank": len(local),
              "rows_per_micro_batch": [b.shape[0] for b in micro_batches], "wrapper": type(dist_model).__name__,
              "vocab_parallel_calls_per_step": VOCAB_PARALLEL_CALLS[0] - calls_before,
              "dtensor_params": sorted(n.removeprefix(prefix) for n, p in dist_model.named_parameters()
                                       if isinstance(p, DTensor))}
    if mode == "tp":
        loss_again, g_again = step()
        with torch.no_grad():  # the sharded model's own forward still gives full logits
            ids = micro_batches[0].input_ids
            result["forward_logits_max_diff"] = (dist_model.lm(input_ids=ids).logits
                                                 - single.lm(input_ids=ids).logits).abs().max().item()
        result["bitwise_across_ranks"] = same_on_all_ranks([loss] + [g for g in g_dist.values() if g is not None])
        result["bitwise_repeat"] = bool(torch.equal(loss, loss_again)) and all(
            torch.equal(g_dist[n], g_again[n]) for n in g_dist if g_dist[n] is not None)
        loss_mean = loss.item()
    else:
        loss_sum = loss.clone()
        dist.all_reduce(loss_sum)
        loss_mean = loss_sum.item() / world
    missing = [n for n in g_ref if g_ref[n] is None or g_dist.get(n) is None]
    max_abs, max_ratio, worst = compare(g_ref, g_dist)
    result.update({"num_params": len(g_ref), "missing_grads": missing, "grad_norm": grad_norm(g_ref),
                   "max_abs_grad_diff": max_abs, "max_tolerance_ratio": max_ratio, "worst_param": worst,
                   "loss_single": single_loss.item(), "loss_dist": loss_mean,
                   "loss_abs_diff": abs(loss_mean - single_loss.item())})
    result["ok"] = (not missing and max_ratio <= 1.0 and result["loss_abs_diff"] <= 1e-6
                    and result.get("forward_logits_max_diff", 0.0) <= 1e-5
                    and result.get("bitwise_across_ranks", True) and result.get("bitwise_repeat", True))
    return result


def reference_head(hidden, weight, bias, targets, seq_index, num_sequences, logit_scale=1.0, softcap=None,
                   temperature=1.0):
    """Float64 single-process head: per-sequence sums of log_softmax(z)[target]."""
    x = (hidden.double() @ weight.double().t() + (0 if bias is None else bias.double())) * logit_scale
    z = (x if softcap is None else softcap * torch.tanh(x / softcap)) / temperature
    scored = seq_index >= 0
    row = torch.log_softmax(z, dim=1)[scored].gather(1, targets[scored, None]).squeeze(1)
    return torch.zeros(num_sequences, dtype=torch.float64).index_add_(0, seq_index[scored], row)


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def check_vocab_parallel(mesh):
    """The vocabulary-parallel op vs float64, bitwise agreement, large logits, reference path, refusals."""
    from torch.distributed.tensor import Shard, distribute_tensor

    rank, group = dist.get_rank(), mesh.get_group()
    V, D, N, S = 97, 16, 64, 6
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=g)
    seq_index = torch.randint(0, S, (N,), generator=g)
    seq_index[::5] = -1  # packed rows: unscored tokens in between
    targets[seq_index < 0] = -1
    upstream = torch.randn(S, generator=g, dtype=torch.float64)
    shard = lambda t: distribute_tensor(t.float(), mesh, [Shard(0)]).requires_grad_()  # noqa: E731

    def run(with_bias, head_mode, transforms):
        h, w = hidden.float().requires_grad_(), shard(weight)
        b = shard(bias) if with_bias else None
        logps, logit_sums = vocab_parallel_sequence_logps(h, w, b, targets, seq_index, S, head_mode=head_mode,
                                                          **transforms)
        (logps * upstream.float()).sum().backward()
        grads = [h.grad, w.grad.full_tensor()] + ([b.grad.full_tensor()] if with_bias else [])
        return logps.detach(), logit_sums, grads

    def reference(with_bias, transforms):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        leaves += [bias.clone().requires_grad_()] if with_bias else []
        logps = reference_head(leaves[0], leaves[1], leaves[2] if with_bias else None, targets, seq_index, S,
                               **transforms)
        (logps * upstream).sum().backward()
        return logps.detach(), [leaf.grad for leaf in leaves]

    out = {"cases": [], "shard_sizes": [V // 2 + V % 2, V // 2]}
    for transforms in ({}, {"logit_scale": 0.7, "softcap": 3.0, "temperature": 0.8}):
        for with_bias in (False, True):
            want, want_grads = reference(with_bias, transforms)
            for head_mode in ("stored", "recompute"):
                logps, _, grads = run(with_bias, head_mode, transforms)
                out["cases"].append({
                    "transforms": bool(transforms), "bias": with_bias, "head_mode": head_mode,
                    "logps_rel_err": rel_err(logps, want),
                    "grad_rel_err": max(rel_err(a, b) for a, b in zip(grads, want_grads)),
                    "bitwise_across_ranks": same_on_all_ranks([logps] + grads)})
    transforms = {"logit_scale": 0.7, "softcap": 3.0, "temperature": 0.8}
    first, second = run(True, "recompute", transforms), run(True, "recompute", transforms)
    out["bitwise_repeat"] = all(torch.equal(a, b) for a, b in zip([first[0]] + first[2], [second[0]] + second[2]))
    stored = run(True, "stored", transforms)
    out["stored_equals_recompute_logps"] = bool(torch.equal(stored[0], first[0]))

    with torch.no_grad():  # reference path: forward only
        w_ref, b_ref = shard(weight), shard(bias)
        ref_logps, _ = vocab_parallel_sequence_logps(hidden.float(), w_ref, b_ref, targets, seq_index, S,
                                                     **transforms)
    out["reference_path_no_graph"] = ref_logps.grad_fn is None and not ref_logps.requires_grad
    out["reference_path_equals_grad_path"] = bool(torch.equal(ref_logps, first[0]))

    local_w = weight.float().tensor_split(2)[rank]  # process_group= form: the local shard
    local_b = bias.float().tensor_split(2)[rank]
    pg_logps, _ = vocab_parallel_sequence_logps(hidden.float(), local_w, local_b, targets, seq_index, S,
                                                process_group=group, **transforms)
    out["process_group_equals_dtensor"] = bool(torch.equal(pg_logps, first[0]))

    # large logits: 1e4 + multiples of 1/4 (exact in fp32, so only the row math can lose accuracy) ...
    h_q, w_q = torch.randint(-2, 3, (N, D), generator=g).double(), torch.randint(-2, 3, (V, D), generator=g) / 4.0
    b_q = 1e4 + torch.randint(-8, 9, (V,), generator=g) / 4.0
    big, _ = vocab_parallel_sequence_logps(h_q.float(), shard(w_q), shard(b_q), targets, seq_index, S)
    out["large_logits_rel_err"] = rel_err(big.detach(), reference_head(h_q, w_q, b_q, targets, seq_index, S))
    # ... and all logits equal to 1e30: every token gets -log V
    equal, _ = vocab_parallel_sequence_logps(hidden.float(), shard(torch.zeros(V, D)), shard(torch.full((V,), 1e30)),
                                             targets, seq_index, S)
    counts = torch.bincount(seq_index[seq_index >= 0], minlength=S).double()
    out["equal_logits_rel_err"] = rel_err(equal.detach(), -counts * math.log(V))

    # no scored token at all: zeros, and a backward that still runs the collectives on every rank
    h = hidden.float().requires_grad_()
    none, _ = vocab_parallel_sequence_logps(h, shard(weight), None, torch.full_like(targets, -1),
                                            torch.full_like(seq_index, -1), S)
    none.sum().backward()
    out["no_scored_tokens_zero"] = bool((none == 0).all() and (h.grad == 0).all())

    refusals = {}
    for name, call in {
        "not_replicated": lambda: vocab_parallel_sequence_logps(hidden.float() + rank, shard(weight), None, targets,
                                                                seq_index, S),
        "fused": lambda: vocab_parallel_sequence_logps(hidden.float(), shard(weight), None, targets, seq_index, S,
                                                       head_mode="fused"),
        "target_out_of_range_on_one_rank": lambda: vocab_parallel_sequence_logps(
            hidden.float(), shard(weight), None, torch.where(torch.arange(N) == rank, V + 3, targets), seq_index, S),
        "overlapping_offsets": lambda: vocab_parallel_sequence_logps(hidden.float(), local_w, None, targets, seq_index,
                                                                     S, process_group=group, vocab_offset=0),
    }.items():
        try:
            call()
            refusals[name] = None
        except ValueError as error:
            refusals[name] = str(error)
    out["refusals"] = refusals
    out["ok"] = (all(c["logps_rel_err"] <= 1e-5 and c["grad_rel_err"] <= 1e-5 and c["bitwise_across_ranks"]
                     for c in out["cases"])
                 and out["bitwise_repeat"] and out["stored_equals_recompute_logps"]
                 and out["reference_path_no_graph"] and out["reference_path_equals_grad_path"]
                 and out["process_group_equals_dtensor"] and out["large_logits_rel_err"] <= 1e-6
                 and out["equal_logits_rel_err"] <= 1e-6 and out["no_scored_tokens_zero"] and all(refusals.values()))
    return out


def check_sampler_seeds(pairs):
    """PreferenceShardSampler: the same seed on every rank gives disjoint shards covering the global batch; a
    seed that differs by rank is refused on every rank at construction (before any step)."""
    from fastdpo.sharding import PreferenceShardSampler, pair_token_lengths

    lengths = pair_token_lengths(pairs)
    mine = next(iter(PreferenceShardSampler(lengths, pairs_per_rank=GLOBAL_PAIRS // dist.get_world_size(), seed=3)))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    try:
        PreferenceShardSampler(lengths, pairs_per_rank=2, seed=dist.get_rank())
        refusal = None
    except ValueError as error:
        refusal = str(error)
    covered = sorted(i for shard in everyone for i in shard)
    return {"ok": covered == list(range(GLOBAL_PAIRS)) and refusal is not None and "seed differ" in refusal,
            "refusal": refusal, "shards": everyone}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True, help="comma-separated engines, run in turn: ddp, tp, fsdp2*")
    ap.add_argument("--accelerate", action="store_true", help="prepare the ddp model with accelerate")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    modes = args.mode.split(",")
    assert set(modes) <= {"ddp", "tp", *FSDP2_MODES}, f"unknown mode in {args.mode!r}"
    assert not args.accelerate or modes == ["ddp"], "the accelerate launch is checked with DDP"
    t0 = time.time()
    accelerator = None
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=MICRO_BATCHES)
    else:
        dist.init_process_group("gloo")
    world = dist.get_world_size()
    assert GLOBAL_PAIRS % (world * MICRO_BATCHES) == 0, "equal pair counts per rank and micro-batch are required"
    torch.use_deterministic_algorithms(True)

    count_vocab_parallel_calls()
    pairs = make_pairs(GLOBAL_PAIRS)
    results = {"launcher": "accelerate" if args.accelerate else "torchrun", "world_size": world,
               "backend": dist.get_backend(), "modes": {}}
    checks = []
    for mode in modes:
        mesh = None
        if mode == "tp":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (world,))
        out = results["modes"][mode] = {}
        if mode in ("ddp", "fsdp2") and not args.accelerate:
            out["loss_forms"] = check_loss_forms(mode, pairs, tiny_llama(seed=1).eval())
            checks += out["loss_forms"].values()
        out["model_loss"] = check_model_loss(mode, pairs, accelerator, mesh)
        checks.append(out["model_loss"])
        if mode == "tp":
            out["vocab_parallel"] = check_vocab_parallel(mesh)
            checks.append(out["vocab_parallel"])
        if mode == "ddp" and not args.accelerate:
            out["sampler"] = check_sampler_seeds(pairs)
            checks.append(out["sampler"])
    ok = all(check["ok"] for check in checks)
    results["ok"], results["seconds"] = ok, time.time() - t0
    if dist.get_rank() == 0:
        with open(args.out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        print(json.dumps(results))
    # the checks' DDP / FSDP2 modules hold the process group and may sit in reference cycles: free them on
    # every rank before the group goes, or a rank can hang or abort at exit
    if accelerator is not None:
        accelerator.free_memory()  # drops its references to the prepared model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
