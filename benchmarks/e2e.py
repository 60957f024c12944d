"""End-to-end DPO training step: TRL 1.16's own DPOTrainer.training_step against fastdpo.trl.DPOTrainer's.

A tiny Llama built from a config (random init) and a word-level tokenizer built in memory (nothing downloaded);
the data is text with the prompt/response token lengths of three common DPO data sets, log-normal around
fastdpo.packing.DATASET_SHAPES (hundreds of tokens per prompt; prompt:response ~2.15 HH-RLHF, ~11 TL;DR,
~0.42 UltraFeedback), tokenized by each trainer as in real use. One step = `trainer.training_step(model, batch)`:
policy forward + backward and reference forward under no_grad, sigmoid loss (beta 0.1), no optimizer update
(the weights never change, so every layout must give the same loss). Layouts of the same pairs:

  trl                 TRL's DPOTrainer: 2B padded rows, its chunked fused LM head (the headline baseline)
  shared              fastdpo.trl.DPOTrainer: packed rows, one prompt copy per pair (the default)
  packed              fastdpo.trl.DPOTrainer(shared_prompt=False): packed rows, prompt once per sequence
  padded              fastdpo.loss (fused head) on TRL's padded batch, backbone called directly
  padded_full_logits  TRL's padded batch, full logits, fp32 log_softmax + gather
(`padded_full_logits` is not in a job's default layouts, to keep the CPU run short.)

All layouts of one data set live in one worker process and are timed in interleaved rounds (the order rotates
every round), so that machine load hits them alike; the step time is the median over rounds. Memory: peak
resident (CUDA: allocated) memory of each step above the memory right before it (heap trimmed), so it covers
activations, logits and gradients of that step. tokens/s counts the data's tokens (2 x prompt + chosen +
rejected per pair, as TRL's attention mask does); `computed` is what the layout feeds the model.

Attention work per step (`attention_gflop`: policy forward + backward (2x) + reference forward, 4 x hidden FLOPs
per query-key entry per layer) counts what the layout's attention computes: padded rows pay rows x L^2 (SDPA
with a padding mask), packed rows the sum over their segments (fastdpo.attention.attention_work:
"segment_sdpa" on CPU, "segments" for a CUDA varlen kernel), next to `attention_gflop_dense_mask`, what a
[T, T] mask per packed row cost before the segment plan.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time

import torch
import transformers  # the Llama classes resolve on first use (transformers imports its models lazily)
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers

import fastdpo
import fastdpo.trl
import trl
from fastdpo.attention import attention_work, segment_plan
from fastdpo.packing import DATASET_SHAPES, synthetic_lengths

from heads import BETA, DTYPES, IGNORE_INDEX, dpo_loss_fn, logits_logps
from measure import MemoryMeter, _sync

LAYOUTS = ("trl", "shared", "packed", "padded", "padded_full_logits")
DEFAULT_LAYOUTS = ("trl", "shared", "packed", "padded")
LAYOUT_LABELS = {
    "trl": "TRL 1.16 DPOTrainer.training_step (padded 2B rows, TRL's chunked fused head)",
    "shared": "fastdpo.trl.DPOTrainer.training_step (packed, shared prompts)",
    "packed": "fastdpo.trl.DPOTrainer.training_step, shared_prompt=False (packed)",
    "padded": "fastdpo.loss fused head on TRL's padded batch",
    "padded_full_logits": "TRL's padded batch, full logits + fp32 log_softmax (classic baseline)",
}
DATASETS = ("hh-rlhf", "tldr", "ultrafeedback")  # keys of fastdpo.packing.DATASET_SHAPES

PRESETS = {
    # sized for 2 quiet CPU cores (~30 s per data set): real prompt lengths, 2 pairs, a 2-layer D = 256 Llama
    # whose head has Llama-3-8B's V / D ratio (32)
    "cpu": dict(vocab=8192, hidden=256, layers=2, heads=4, intermediate=688, pairs=2, scale=1.0, sigma=0.3,
                rounds=2, dtype="fp32"),
    "cuda": dict(vocab=32000, hidden=1024, layers=4, heads=8, intermediate=2816, pairs=16, scale=1.0, sigma=0.5,
                 rounds=10, dtype="bf16"),
    "quick": dict(vocab=1024, hidden=64, layers=1, heads=2, intermediate=128, pairs=2, scale=0.0625, sigma=0.5,
                  rounds=1, dtype="fp32"),
}
SPECIAL = ("<pad>", "<eos>", "<unk>")


def word(token_id: int) -> str:
    return f"w{token_id}"


def make_tokenizer(vocab: int):
    """Word-level tokenizer: "w{i}" <-> id i + 3, after <pad> = 0, <eos> = 1, <unk> = 2."""
    table = {**{s: i for i, s in enumerate(SPECIAL)}, **{word(i): i + len(SPECIAL) for i in range(vocab - len(SPECIAL))}}
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def make_dataset(dataset: str, preset: dict, seed: int = 0) -> Dataset:
    """Text pairs with the data set's (scaled) token-length distribution (each word is one token)."""
    p_mean, r_mean = DATASET_SHAPES[dataset]
    s = preset["scale"]
    P, C, R = synthetic_lengths(max(2.0, p_mean * s), max(1.0, r_mean * s), preset["pairs"], sigma=preset["sigma"],
                                seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    text = lambda n: " ".join(map(word, torch.randint(0, preset["vocab"] - len(SPECIAL), (n,), generator=g).tolist()))  # noqa: E731,E501
    return Dataset.from_dict({"prompt": [text(p) for p in P], "chosen": [" " + text(c) for c in C],
                              "rejected": [" " + text(r) for r in R]})


def build_models(preset: dict, device: str):
    cfg = transformers.LlamaConfig(vocab_size=preset["vocab"], hidden_size=preset["hidden"],
                                   num_hidden_layers=preset["layers"], num_attention_heads=preset["heads"],
                                   num_key_value_heads=preset["heads"], intermediate_size=preset["intermediate"],
                                   max_position_embeddings=8192, tie_word_embeddings=False, pad_token_id=0,
                                   eos_token_id=1, bos_token_id=1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    policy = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=DTYPES[preset["dtype"]])
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy, as after some training
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return policy, ref


def make_trainer(trainer_cls, config_cls, policy, ref, dataset, tokenizer, preset, device, out_dir, **options):
    args = config_cls(output_dir=out_dir, per_device_train_batch_size=preset["pairs"], max_length=None, beta=BETA,
                      loss_type=["sigmoid"], report_to="none", save_strategy="no", use_cpu=(device == "cpu"),
                      bf16=(preset["dtype"] == "bf16"), disable_tqdm=True, dataloader_num_workers=0, seed=0,
                      **options)
    return trainer_cls(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args, train_dataset=dataset,
                       processing_class=tokenizer)


def attention_gflop(batch, preset: dict, device: str) -> dict:
    """Attention FLOPs of one training step (see the module docstring) for a fastdpo batch ({"packed": ...}) or
    a padded one ({"input_ids": [rows, L]})."""
    per_entry = 4 * 4 * preset["hidden"] * preset["layers"] / 1e9  # 3 passes (backward 2x), QK^T + PV, 2 FLOPs
    if "packed" not in batch:
        rows, length = batch["input_ids"].shape
        return {"attention_gflop": per_entry * rows * length ** 2}
    work = attention_work(segment_plan(batch["packed"], "cpu"))
    return {"attention_gflop": per_entry * work["segments" if device == "cuda" else "segment_sdpa"],
            "attention_gflop_dense_mask": per_entry * work["dense_mask"]}


def trainer_step(trainer):
    """(step() -> loss, tokens fed to the model) for trainer.training_step on the trainer's first batch."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, read by training_step
    computed = batch["packed"].input_ids.numel() if "packed" in batch else batch["input_ids"].numel()

    def step():
        trainer.model.zero_grad(set_to_none=True)
        return float(trainer.training_step(trainer.model, batch))

    return step, computed, batch


def padded_step(trl_trainer, batch, full_logits: bool):
    """fastdpo.loss (fused head) or full logits on TRL's padded batch, with TRL's trainer's models."""
    policy, ref = trl_trainer.model, trl_trainer.ref_model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    if full_logits:
        def logps(model):  # the backbone + head, as the unpatched forward computes them
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            return logits_logps(model.lm_head(hidden)[:, :-1], labels[:, 1:])

        loss_fn = dpo_loss_fn(lambda: logps(policy), lambda: logps(ref))
    else:
        def loss_fn():
            h = policy.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            with torch.no_grad():
                rh = ref.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            return fastdpo.loss(hidden=h, weight=policy.lm_head.weight, ref_hidden=rh, ref_weight=ref.lm_head.weight,
                                labels=labels, beta=BETA).loss

    def step():
        policy.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return float(loss.detach())

    return step, ids.numel()


def run_e2e_job(job: dict) -> dict:
    """Worker entry: every layout for one data set, interleaved rounds. Returns {"status", "layouts": {...}}."""
    preset = {**PRESETS[job.get("preset", "cpu")], **job.get("overrides", {})}
    device = job["device"]
    layouts = list(job.get("layouts", DEFAULT_LAYOUTS))
    dataset = make_dataset(job["dataset"], preset, seed=job.get("seed", 0))
    tokenizer = make_tokenizer(preset["vocab"])
    policy, ref = build_models(preset, device)
    out_dir = tempfile.mkdtemp(prefix="fastdpo_e2e_")
    needs_trl = any(layout.startswith("padded") or layout == "trl" for layout in layouts)
    trl_trainer = (make_trainer(trl.DPOTrainer, trl.DPOConfig, policy, ref, dataset, tokenizer, preset, device,
                                out_dir) if needs_trl else None)
    trl_batch = trainer_step(trl_trainer)[2] if needs_trl else None
    steps, results, flops = {}, {}, {}
    for layout in layouts:
        try:
            if layout == "trl":
                steps[layout] = trainer_step(trl_trainer)[:2]
                flops[layout] = attention_gflop(trl_batch, preset, device)
            elif layout in ("shared", "packed"):
                trainer = make_trainer(fastdpo.trl.DPOTrainer, fastdpo.trl.DPOConfig, policy, ref, dataset, tokenizer,
                                       preset, device, out_dir, shared_prompt=(layout == "shared"))
                step, computed, batch = trainer_step(trainer)
                steps[layout], flops[layout] = (step, computed), attention_gflop(batch, preset, device)
            else:
                steps[layout] = padded_step(trl_trainer, trl_batch, layout == "padded_full_logits")
                flops[layout] = attention_gflop(trl_batch, preset, device)
        except Exception as e:  # reported: one failing layout must not stop the others
            results[layout] = {"status": "error", "note": f"{type(e).__name__}: {e}"[:300]}
    del policy, ref
    # token lengths as TRL tokenizes them (+ EOS on each completion)
    lengths = [(len(tokenizer(p)["input_ids"]), len(tokenizer(c)["input_ids"]) + 1, len(tokenizer(x)["input_ids"]) + 1)
               for p, c, x in zip(dataset["prompt"], dataset["chosen"], dataset["rejected"])]
    data_tokens = sum(2 * p + c + r for p, c, r in lengths)

    times = {layout: [] for layout in steps}
    peaks = {layout: 0.0 for layout in steps}
    losses = {}
    meter = MemoryMeter(device)
    names = list(steps)
    warmup = max(1, job.get("warmup", 1))
    rounds = job.get("rounds", preset["rounds"])
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for layout in order:
            if layout in results:
                continue
            try:
                meter.start()
                t0 = time.perf_counter()
                losses[layout] = steps[layout][0]()
                _sync(device)
                elapsed = (time.perf_counter() - t0) * 1000
                peaks[layout] = max(peaks[layout], meter.peak_mb())
                if r >= warmup:
                    times[layout].append(elapsed)
            except Exception as e:
                results[layout] = {"status": "error", "note": f"{type(e).__name__}: {e}"[:300]}
    for layout in names:
        if layout in results:
            continue
        ms = statistics.median(times[layout])
        results[layout] = {"status": "ok", "ms": ms, "times_ms": times[layout], "peak_mb": peaks[layout],
                           "memory_method": meter.method, "loss": losses[layout],
                           "pairs_per_s": preset["pairs"] / (ms / 1e3), "tokens_per_s": data_tokens / (ms / 1e3),
                           "computed_tokens": steps[layout][1], "fill": data_tokens / steps[layout][1],
                           **flops[layout]}
    if _ok(results.get("trl")):
        for r in results.values():
            if _ok(r):
                r["time_vs_trl"] = r["ms"] / results["trl"]["ms"]
                r["memory_vs_trl"] = r["peak_mb"] / max(results["trl"]["peak_mb"], 1e-9)
    n = len(lengths)
    return {"status": "ok", "layouts": results, "pairs": n, "data_tokens": data_tokens,
            "mean_prompt": sum(p for p, _, _ in lengths) / n,
            "mean_response": sum(c + r for _, c, r in lengths) / (2 * n), "preset": preset,
            "baseline": "trl", "rounds": rounds}


def _ok(r) -> bool:
    return isinstance(r, dict) and r.get("status") == "ok"
