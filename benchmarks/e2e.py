"""End-to-end DPO training step on a tiny Llama built from a config (random init, nothing downloaded).

One step = policy forward + backward, reference forward under no_grad, sigmoid DPO loss (beta 0.1),
AdamW step (learning rate 0: full optimizer work, unchanged weights, so every layout must give the
same loss, which the report checks). Prompt/response lengths are log-normal around the prompt:response shapes of three common
DPO data sets (fastdpo.packing.DATASET_SHAPES, scaled down to fit a CPU: HH-RLHF ~2.15, TL;DR ~11,
UltraFeedback ~0.42). Layouts of the same pairs:

  padded_full_logits  TRL-classic baseline: 2B rows [prompt][response] right-padded to the longest,
                      model logits for every position, fp32 log_softmax + gather
  padded              same rows, fastdpo.loss on the backbone's hidden states (fused LM head)
  packed              fastdpo.packing.pack_pairs(shared_prompt=False) + fastdpo.model.model_loss
  shared              fastdpo.packing.pack_pairs(shared_prompt=True) + fastdpo.model.model_loss

All layouts of one data set run in one worker process (one model build), in the order above; packing
is data preparation and is not timed. tokens/s counts the data's tokens (prompt twice + chosen +
rejected per pair) so that layouts compare directly; `computed` is what the layout feeds the model.
"""
from __future__ import annotations

import copy

import torch
import transformers  # the Llama classes resolve on first use (transformers imports its models lazily)

import fastdpo
from fastdpo.model import model_loss
from fastdpo.packing import DATASET_SHAPES, pack_pairs, synthetic_lengths

from heads import BETA, DTYPES, IGNORE_INDEX, dpo_loss_fn, logits_logps
from measure import job_timing, measure_step

LAYOUTS = ("padded_full_logits", "padded", "packed", "shared")
LAYOUT_LABELS = {
    "padded_full_logits": "padded 2B rows, full logits (TRL-classic baseline)",
    "padded": "padded 2B rows, fastdpo fused loss",
    "packed": "packed (pack_pairs shared_prompt=False)",
    "shared": "packed, shared prompts (shared_prompt=True)",
}
DATASETS = ("hh-rlhf", "tldr", "ultrafeedback")  # keys of fastdpo.packing.DATASET_SHAPES

PRESETS = {
    # tiny model sized for 2 shared CPU cores; 8 pairs at 0.15 x the data sets' lengths keep the
    # sampled prompt:response ratios at 2.18 / 11.1 / 0.42 (seed 0)
    "cpu": dict(vocab=32000, hidden=256, layers=2, heads=4, intermediate=688, pairs=8, scale=0.15, sigma=0.5,
                max_tokens=1024, dtype="fp32"),
    "cuda": dict(vocab=32000, hidden=1024, layers=4, heads=8, intermediate=2816, pairs=16, scale=1.0, sigma=0.5,
                 max_tokens=4096, dtype="bf16"),
    "quick": dict(vocab=1024, hidden=64, layers=1, heads=2, intermediate=128, pairs=2, scale=0.0625, sigma=0.5,
                  max_tokens=256, dtype="fp32"),
}


def make_pairs(dataset: str, preset: dict, seed: int = 0):
    """Random token ids with the data set's (scaled) length distribution: lists of prompts, chosen, rejected."""
    p_mean, r_mean = DATASET_SHAPES[dataset]
    s = preset["scale"]
    P, C, R = synthetic_lengths(max(2.0, p_mean * s), max(1.0, r_mean * s), preset["pairs"], sigma=preset["sigma"],
                                seed=seed)
    cap = preset["max_tokens"] // 2 - 1  # every layout must hold each pair without truncation
    g = torch.Generator().manual_seed(seed + 1)
    tok = lambda n: torch.randint(1, preset["vocab"], (min(n, cap),), generator=g).tolist()  # noqa: E731
    prompts = [tok(max(p, 2)) for p in P]
    # keep prompt + response within a padded row of max_tokens // 2
    chosen = [tok(max(1, min(c, cap - len(p)))) for p, c in zip(prompts, C)]
    rejected = [tok(max(1, min(r, cap - len(p)))) for p, r in zip(prompts, R)]
    return prompts, chosen, rejected


def build_models(preset: dict, device: str):
    cfg = transformers.LlamaConfig(vocab_size=preset["vocab"], hidden_size=preset["hidden"], num_hidden_layers=preset["layers"],
                      num_attention_heads=preset["heads"], num_key_value_heads=preset["heads"],
                      intermediate_size=preset["intermediate"], max_position_embeddings=preset["max_tokens"],
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    policy = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=DTYPES[preset["dtype"]])
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy, as after some training
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ref.requires_grad_(False).eval()
    policy.train()
    return policy, ref


def padded_rows(prompts, chosen, rejected, device):
    """TRL layout: 2B rows (B chosen then B rejected), right-padded; labels -100 on prompt and padding."""
    seqs = [(p, c) for p, c in zip(prompts, chosen)] + [(p, r) for p, r in zip(prompts, rejected)]
    L = max(len(p) + len(r) for p, r in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    labels = torch.full((len(seqs), L), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p):n] = torch.tensor(r)
        mask[i, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def layout_step(layout: str, policy, ref, opt, pairs, preset, device):
    """Returns (step() -> loss, tokens the layout feeds the model per step)."""
    prompts, chosen, rejected = pairs
    if layout.startswith("padded"):
        ids, labels, mask = padded_rows(prompts, chosen, rejected, device)
        computed = ids.numel()
        if layout == "padded_full_logits":
            # same math as the head baseline, from the model's logits: log_softmax(logits.float()).gather
            def logps(model):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                return logits_logps(logits[:, :-1], labels[:, 1:])

            loss_fn = dpo_loss_fn(lambda: logps(policy), lambda: logps(ref))
        else:
            def loss_fn():
                h = policy.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                with torch.no_grad():
                    rh = ref.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                return fastdpo.loss(hidden=h, weight=policy.lm_head.weight, ref_hidden=rh,
                                    ref_weight=ref.lm_head.weight, labels=labels, beta=BETA).loss
    else:
        batch = pack_pairs(prompts, chosen, rejected, max_tokens=preset["max_tokens"],
                           shared_prompt=(layout == "shared"), vocab_size=preset["vocab"], device=device)
        computed = batch.input_ids.numel()

        def loss_fn():
            return model_loss(policy, batch, ref_model=ref, beta=BETA).loss

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step, computed


def run_e2e_job(job: dict) -> dict:
    """Worker entry: every layout for one data set. Returns {"status", "layouts": {layout: result}}."""
    preset = {**PRESETS[job.get("preset", "cpu")], **job.get("overrides", {})}
    device = job["device"]
    pairs = make_pairs(job["dataset"], preset, seed=job.get("seed", 0))
    P, C, R = (list(map(len, x)) for x in pairs)
    data_tokens = 2 * sum(P) + sum(C) + sum(R)
    policy, ref = build_models(preset, device)
    results = {}
    for layout in job.get("layouts", LAYOUTS):
        try:
            # lr 0: the optimizer does all its work, but every layout sees the same weights (losses must agree)
            opt = torch.optim.AdamW(policy.parameters(), lr=0.0)
            step, computed = layout_step(layout, policy, ref, opt, pairs, preset, device)
            r = measure_step(step, device, **{"max_repeats": 5, "budget_s": 2.0, **job_timing(job)})
            s = r["ms"] / 1e3
            # layouts share this process, so the memory figure is only indicative (freed heap stays resident)
            results[layout] = {"status": "ok", "ms": r["ms"], "peak_mb_approx": r["peak_mb"], "loss": r["loss"],
                               "pairs_per_s": len(P) / s, "tokens_per_s": data_tokens / s,
                               "computed_tokens": computed, "fill": data_tokens / computed}
            del opt, step
        except Exception as e:  # reported: one failing layout must not stop the others
            results[layout] = {"status": "error", "note": f"{type(e).__name__}: {e}"[:300]}
    return {"status": "ok", "layouts": results, "pairs": len(P), "data_tokens": data_tokens,
            "mean_prompt": sum(P) / len(P), "mean_response": (sum(C) + sum(R)) / (2 * len(P)),
            "preset": preset}

