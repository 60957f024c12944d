"""TRL 1.16 drop-in: the same DPOTrainer and DPOConfig, with the loss computed by fastdpo.

    from fastdpo.trl import DPOConfig, DPOTrainer      # instead of: from trl import DPOConfig, DPOTrainer

Same arguments, datasets (conversational or not, tokenized by TRL), callbacks, config fields and logged
metrics. What changes is how a batch is scored:

* the pairs of a batch are packed without padding, one copy of the prompt per pair (``shared_prompt``), by
  :class:`DataCollatorForPackedPreference`;
* the model is called through its outermost ``__call__`` (DDP, FSDP2, accelerate's autocast, torch.compile,
  PEFT, gradient checkpointing) with the LM head skipped, and the completion tokens are scored by fastdpo's
  fused LM-head loss: the logits are never materialised;
* the reference runs on the fly (a separate ``ref_model``, or the PEFT model with its adapter disabled), or
  comes from TRL's ``precompute_ref_log_probs``; ``sync_ref_model`` (TR-DPO) is TRL's own callback.

TRL options fastdpo cannot honour (``ld_alpha``, MoE auxiliary loss, vision datasets, ``compute_metrics`` on
logits, custom collators, ``truncation_mode="keep_end"``) raise at construction.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

try:
    import trl
except ImportError as error:  # an optional dependency
    raise ImportError("fastdpo.trl needs TRL 1.16: pip install 'fastdpo[trl]'") from error
from accelerate.utils import is_peft_model
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

import fastdpo
from .losses import check_loss_config
from .model import HeadInputs, forward_hidden, model_sequence_logps
from .packing import PackedBatch, pack_pairs

__all__ = ["DPOConfig", "DPOTrainer", "DataCollatorForPackedPreference", "loss_groups"]


@dataclass
class DPOConfig(trl.DPOConfig):
    """TRL 1.16's DPOConfig plus fastdpo's layout and metric switches (every TRL field keeps its meaning)."""

    shared_prompt: bool = field(
        default=True,
        metadata={"help": "Pack each pair as [prompt][chosen][last prompt token][rejected] (one copy of the prompt). "
                          "False: [prompt][chosen] and [prompt][rejected] side by side. Both are padding-free."})
    max_tokens_per_row: int | None = field(
        default=None,
        metadata={"help": "Token budget of a packed row. None: one row per batch, no padding at all (attention "
                          "costs the sum over the pairs' segments, not the square of the row; only eager attention, "
                          "the dense reference, pays rows x row_length^2: set a budget there)."})
    token_metrics: bool = field(
        default=True,
        metadata={"help": "Log TRL's `entropy` and `mean_token_accuracy` (one extra no-grad pass over the LM head "
                          "in chunks; logits are never materialised). False: these two metrics are not logged."})


# The loss types TRL 1.16 applies label_smoothing to (it ignores the value for every other type).
TRL_SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")


def loss_groups(args: trl.DPOConfig) -> list[dict[str, Any]]:
    """fastdpo.loss keyword arguments for a TRL DPOConfig's loss fields, validated (ValueError names the field).

    One dict per label-smoothing group: TRL 1.16 smooths only TRL_SMOOTHED_LOSSES, so a list mixing them with
    other types becomes two groups whose per-pair losses add up (sum_k w_k loss_k, as in TRL).
    """
    types, weights = list(args.loss_type), list(args.loss_weights or [1.0] * len(args.loss_type))
    common = dict(beta=args.beta)
    if args.f_divergence_type != "reverse_kl":
        common["f_divergence_type"] = args.f_divergence_type
    if args.f_divergence_type == "alpha_divergence":
        common["alpha"] = args.f_alpha_divergence_coef
    groups = []
    for smoothed in (False, True):
        members = [k for k, t in enumerate(types) if (t in TRL_SMOOTHED_LOSSES) == smoothed]
        if not members:
            continue
        group = dict(common, loss_type=[types[k] for k in members], loss_weights=[weights[k] for k in members],
                     label_smoothing=args.label_smoothing if smoothed else 0.0)
        if "discopop" in group["loss_type"]:
            group["discopop_tau"] = args.discopop_tau
        try:
            check_loss_config(**group)
        except ValueError as error:  # fastdpo's `alpha` is TRL's f_alpha_divergence_coef
            raise ValueError(f"DPOConfig: {str(error).replace('alpha', 'f_alpha_divergence_coef')}") from None
        groups.append(group)
    return groups


@dataclass
class DataCollatorForPackedPreference:
    """TRL 1.16 tokenized rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, optional ``ref_chosen_logps`` /
    ``ref_rejected_logps``) -> {"packed": PackedBatch, "num_tokens": int64 scalar, ["ref_chosen_logps",
    "ref_rejected_logps": [B] float32]}.

    Truncation is TRL's ``keep_start`` per sequence: prompt + completion cut to ``max_length`` tokens.
    ``num_tokens`` counts what TRL's padded batch attends to (2 x prompt + chosen + rejected per pair).
    """

    shared_prompt: bool = True
    max_length: int | None = None
    max_tokens_per_row: int | None = None
    pad_to_multiple_of: int | None = None
    pad_token_id: int = 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        prompts, chosen, rejected = [], [], []
        for i, example in enumerate(examples):
            prompt = list(example["prompt_ids"])
            keep = None if self.max_length is None else self.max_length - len(prompt)
            if keep is not None and keep < 1:
                raise ValueError(f"example {i}: its prompt ({len(prompt)} tokens) fills max_length={self.max_length}")
            prompts.append(prompt)
            chosen.append(list(example["chosen_ids"])[:keep])
            rejected.append(list(example["rejected_ids"])[:keep])
        batch = pack_pairs(prompts, chosen, rejected, max_tokens=self.max_tokens_per_row,
                           shared_prompt=self.shared_prompt, pad_token_id=self.pad_token_id,
                           pad_to_multiple_of=self.pad_to_multiple_of)
        num_tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected))
        out = {"packed": batch, "num_tokens": torch.tensor(num_tokens)}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                out[key] = torch.tensor([example[key] for example in examples], dtype=torch.float32)
        return out


class TokenStatistics(NamedTuple):
    """No-grad per-token statistics of the scored tokens (M of them), for TRL's metrics and WPO weights."""
    seq_index: torch.Tensor  # [M] int64, the token's sequence (TRL order)
    entropy: torch.Tensor  # [M] fp32, -sum_v p_v log p_v
    is_top1: torch.Tensor  # [M] bool, argmax_v z_v == target
    logp: torch.Tensor  # [M] fp32, log p(target)
    log_sum_sq_probs: torch.Tensor  # [M] fp32, log sum_v p_v^2 (WPO)


_STATS_TILE_BYTES = 32 * 2 ** 20  # fp32 logits rows per chunk of the statistics pass


@torch.no_grad()
def token_statistics(head: HeadInputs, batch: PackedBatch) -> TokenStatistics:
    """Entropy, top-1 hit, log p and log sum p^2 of every scored token, chunk by chunk over the LM head.

    Costs one more 2VD no-grad pass over the scored tokens (fastdpo's kernels do not produce these reductions);
    only a [chunk, V] fp32 tile of logits exists at a time.
    """
    labels, seq = batch.labels[:, 1:], batch.seq_ids[:, 1:]
    scored = (labels != batch.ignore_index) & (seq >= 0)
    hidden, targets = head.hidden[:, :-1][scored], labels[scored]
    rows = max(1, _STATS_TILE_BYTES // (4 * head.weight.shape[0]))
    parts = []
    for start in range(0, targets.numel(), rows):
        z = torch.nn.functional.linear(hidden[start:start + rows], head.weight, head.bias).float()
        z = z * head.logit_scale
        if head.softcap is not None:
            z = head.softcap * torch.tanh(z / head.softcap)
        t = targets[start:start + rows, None]
        lse = z.logsumexp(-1, keepdim=True)
        entropy = lse[:, 0] - (z.softmax(-1) * z).sum(-1)
        parts.append((entropy, z.argmax(-1) == t[:, 0], (z.gather(-1, t) - lse)[:, 0],
                      ((2 * z).logsumexp(-1, keepdim=True) - 2 * lse)[:, 0]))
    return TokenStatistics(seq[scored], *(torch.cat(column) for column in zip(*parts)))


def _wpo_weights(stats: TokenStatistics, num_sequences: int) -> torch.Tensor:
    """WPO pair weights [B] (TRL's use_weighting): exp(mean_t (log p_t - log sum_v p_v^2)) of chosen x rejected."""
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=stats.logp.device)
    sums.index_add_(0, stats.seq_index, stats.logp - stats.log_sum_sq_probs)
    counts = torch.bincount(stats.seq_index, minlength=num_sequences).clamp(min=1)
    chosen, rejected = torch.exp(sums / counts).chunk(2)
    return chosen * rejected


class DPOTrainer(trl.DPOTrainer):
    """TRL 1.16's DPOTrainer with fastdpo's packed, logits-free loss. Same constructor and behaviour.

    Refused at construction (ValueError / NotImplementedError naming the option): ``ld_alpha``, a custom
    ``data_collator``, ``compute_metrics`` (logits are never built), ``truncation_mode="keep_end"`` with
    ``max_length``, vision datasets, Mixture-of-Experts auxiliary losses, and invalid loss options (e.g.
    ``label_smoothing`` outside [0, 0.5) for ``robust``, an unknown ``loss_type``).
    """

    def __init__(self, model, ref_model=None, args: trl.DPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
            args = DPOConfig(f"{name.split('/')[-1]}-DPO")
        if args.ld_alpha is not None:
            raise NotImplementedError("ld_alpha (LD-DPO) is not supported by fastdpo.trl.DPOTrainer: it needs "
                                      "per-token weights that fastdpo.loss does not take; use ld_alpha=None")
        if data_collator is not None and not isinstance(data_collator, DataCollatorForPackedPreference):
            raise ValueError("data_collator: fastdpo.trl.DPOTrainer packs batches with its own "
                             "DataCollatorForPackedPreference; pass data_collator=None or one of those")
        if compute_metrics is not None:
            raise ValueError("compute_metrics: fastdpo.trl.DPOTrainer never builds logits to pass to it; "
                             "pass compute_metrics=None (the DPO metrics are logged as in TRL)")
        if args.max_length is not None and args.truncation_mode != "keep_start":
            raise ValueError(f"truncation_mode={args.truncation_mode!r}: packing shares one prompt per pair, so only "
                             "'keep_start' (TRL's default) is supported; use it or max_length=None")
        self._loss_groups = loss_groups(args)
        fastdpo_args = {f: getattr(args, f, default) for f, default in
                        (("shared_prompt", True), ("max_tokens_per_row", None), ("token_metrics", True))}
        self._token_metrics = fastdpo_args["token_metrics"]
        if data_collator is None:
            data_collator = DataCollatorForPackedPreference(
                shared_prompt=fastdpo_args["shared_prompt"], max_length=args.max_length,
                max_tokens_per_row=fastdpo_args["max_tokens_per_row"], pad_to_multiple_of=args.pad_to_multiple_of)
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         callbacks=callbacks, optimizers=optimizers, quantization_config=quantization_config,
                         peft_config=peft_config)
        if self._is_vision_dataset:
            raise NotImplementedError("vision datasets (images) are not supported by fastdpo.trl.DPOTrainer")
        if self.aux_loss_enabled:
            raise NotImplementedError("the Mixture-of-Experts auxiliary loss is not supported by fastdpo.trl."
                                      "DPOTrainer; set router_aux_loss_coef=0.0")

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs (chosen [B], rejected [B]) of a packed batch: `model` (the reference) under no_grad,
        or the PEFT policy with its adapter disabled (TRL's "ref" adapter if it has one)."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              adapter, self.accelerator.autocast()):
            logps = model_sequence_logps(model, inputs["packed"]).logps
        return logps.chunk(2)

    def _compute_loss(self, model, inputs, return_outputs):
        if return_outputs:
            raise ValueError("return_outputs=True: fastdpo.trl.DPOTrainer never builds the logits")
        mode = "train" if self.model.training else "eval"
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            reference = self.model if self.ref_model is None else self.ref_model
            ref_logps = torch.cat(self.compute_ref_log_probs(reference, inputs))
        head = forward_hidden(model, inputs["packed"])
        batch = inputs["packed"].to(head.weight.device)
        with torch.autocast(head.weight.device.type, enabled=False):
            out = fastdpo.loss(hidden=head.hidden, weight=head.weight, bias=head.bias, logit_scale=head.logit_scale,
                               softcap=head.softcap, labels=batch.labels, seq_ids=batch.seq_ids,
                               ignore_index=batch.ignore_index, num_sequences=batch.num_sequences,
                               ref_logps=ref_logps.to(head.weight.device, torch.float32), **self._loss_groups[0])
            losses = out.losses
            for group in self._loss_groups[1:]:
                losses = losses + fastdpo.preference_loss(
                    out.chosen_logps, out.rejected_logps, out.ref_chosen_logps, out.ref_rejected_logps,
                    chosen_lengths=out.chosen_lengths, rejected_lengths=out.rejected_lengths, **group).losses
        stats = token_statistics(head, batch) if self._token_metrics or self.use_weighting else None
        if self.use_weighting:
            losses = losses * _wpo_weights(stats, batch.num_sequences)
        loss = losses.mean()
        self._log_metrics(mode, out, stats, inputs["num_tokens"], batch.num_pairs)
        return loss

    def _log_metrics(self, mode: str, out, stats: TokenStatistics | None, num_tokens: torch.Tensor,
                     num_pairs: int) -> None:
        """TRL 1.16's metrics, same names, same cross-process aggregation."""
        gather_sum = lambda x: self.accelerator.gather_for_metrics(x.detach().reshape(1)).sum().item()  # noqa: E731
        metrics = self._metrics[mode]
        n_chosen, n_rejected = out.chosen_lengths.sum(), out.rejected_lengths.sum()
        if stats is not None and self._token_metrics:
            total = gather_sum(n_chosen + n_rejected)
            metrics["entropy"].append(gather_sum(stats.entropy.sum()) / total if total > 0 else 0.0)
            chosen_total = gather_sum(n_chosen)
            correct = gather_sum((stats.is_top1 & (stats.seq_index < num_pairs)).sum())
            metrics["mean_token_accuracy"].append(correct / chosen_total if chosen_total > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += int(gather_sum(num_tokens.to(self.accelerator.device))) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        for side, count in (("chosen", n_chosen), ("rejected", n_rejected)):
            logit_total = gather_sum(out.metrics[f"logits/{side}"] * count)  # fastdpo's metric is the token mean
            tokens = gather_sum(count)
            metrics[f"logits/{side}"].append(logit_total / tokens if tokens > 0 else 0.0)
        chosen_rewards = self.accelerator.gather(out.chosen_rewards)
        rejected_rewards = self.accelerator.gather(out.rejected_rewards)
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(self.accelerator.gather(out.chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(self.accelerator.gather(out.rejected_logps.detach()).mean().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
