"""TRL 1.16 drop-in: the same DPOTrainer and DPOConfig, with the loss computed by fastdpo.

    from fastdpo.trl import DPOConfig, DPOTrainer      # instead of: from trl import DPOConfig, DPOTrainer

Same arguments, datasets (conversational or not, tokenized by TRL), callbacks, config fields and logged
metrics (``total_flos`` and ``num_input_tokens_seen`` count TRL's padded batch, as TRL logs them). What
changes is how a batch is scored:

* the pairs of a batch are packed without padding, one copy of the prompt per pair (``shared_prompt``; with
  ``group_prompts`` one copy for all the pairs of a batch that share it), by
  :class:`DataCollatorForPackedPreference` (a custom ``data_collator`` yielding TRL's padded keys is
  unpadded and packed the same way);
* the model is called through its outermost ``__call__`` (DDP, FSDP2, accelerate's autocast, torch.compile,
  PEFT, gradient checkpointing) with the LM head skipped, and the completion tokens are scored by fastdpo's
  fused LM-head loss: the logits are never materialised;
* the reference runs on the fly (a separate ``ref_model``, or the PEFT model with its adapter disabled), or
  comes from TRL's ``precompute_ref_log_probs``; ``sync_ref_model`` (TR-DPO) is TRL's own callback; a
  reference-free loss (``simpo``, ``sft``) runs no reference at all;
* evaluation with ``compute_metrics`` gets fastdpo's EvalPrediction: ``predictions`` [N, 4] = per pair
  (chosen log-prob, rejected log-prob, chosen reward, rejected reward) (:data:`PREDICTION_COLUMNS`),
  ``label_ids`` [N] = 0 (the chosen response, column 0 / 2, is the preferred one).

Refused at construction, naming the option: vision datasets, ``include_for_metrics=["inputs"]``, ``ld_alpha``
with ``loss_type`` ``sft``; see :data:`TRL_CONFIG_FIELDS` for every TRL 1.16 DPOConfig field.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
import pyarrow.compute as pc
import torch

try:
    import trl
except ImportError as error:  # an optional dependency
    raise ImportError("fastdpo.trl needs TRL 1.16: pip install 'fastdpo[trl]'") from error
from accelerate.utils import is_peft_model
from transformers.utils import logging
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer import dpo_trainer as trl_dpo_trainer
from trl.trainer.utils import use_adapter

import fastdpo
from .head import check_head_options
from .losses import check_loss_config
from .model import HeadInputs, forward_hidden, model_sequence_logps, unwrap_causal_lm
from .packing import BRANCH_CONTEXT, PackedBatch, pack_pairs, pair_length, pair_parts
from .parallel import is_vocab_sharded
from .validate import check_bool, check_int, check_real, require

__all__ = ["DPOConfig", "DPOTrainer", "DataCollatorForPackedPreference", "PackingCollator", "loss_groups",
           "ld_token_weights", "PREDICTION_COLUMNS", "TRL_CONFIG_FIELDS"]

logger = logging.get_logger(__name__)

# fastdpo's EvalPrediction.predictions columns, one row per pair (see prediction_step)
PREDICTION_COLUMNS = ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards")


@dataclass
class DPOConfig(trl.DPOConfig):
    """TRL 1.16's DPOConfig plus fastdpo's layout and metric switches (every TRL field keeps its meaning)."""

    shared_prompt: bool = field(
        default=True,
        metadata={"help": "Pack each pair as [prompt][chosen][last prompt token][rejected] (one copy of the prompt). "
                          "False: [prompt][chosen] and [prompt][rejected] side by side. Both are padding-free."})
    group_prompts: bool = field(
        default=False,
        metadata={"help": "With shared_prompt: pairs of a batch with an identical prompt share one copy of it, "
                          "[prompt][chosen 1][rejected 1][chosen 2]... (several pairs per prompt, e.g. on-policy "
                          "samples); exact log-probs, fewer tokens. Needs max_tokens_per_row=None."})
    max_tokens_per_row: int | None = field(
        default=None,
        metadata={"help": "Token budget of a packed row. None: one row per batch, no padding at all (attention "
                          "costs the sum over the pairs' segments, not the square of the row; only eager attention, "
                          "the dense reference, pays rows x row_length^2: set a budget there)."})
    token_metrics: bool = field(
        default=True,
        metadata={"help": "Log TRL's `entropy` and `mean_token_accuracy` (from the LM head's own row pass: no "
                          "extra matrix product; a vocabulary-sharded head takes one extra no-grad pass). False: "
                          "these two metrics are not logged."})
    simpo_gamma: float = field(
        default=0.5,
        metadata={"help": "Target reward margin of loss_type 'simpo' (as TRL's CPOConfig.simpo_gamma)."})
    head_mode: str = field(
        default="auto",
        metadata={"help": "fastdpo.loss's LM-head mode: 'auto' (stored within head_memory_budget, else recompute), "
                          "'stored' (6VD, keeps U), 'recompute' (8VD), 'fused' (logits never stored; the token "
                          "metrics then take one extra no-grad pass)."})
    head_memory_budget: int | None = field(
        default=None,
        metadata={"help": "Bytes the 'auto' / 'stored' head may keep; None: fastdpo's fixed default."})

    def __post_init__(self):
        super().__post_init__()
        check_bool("DPOConfig.shared_prompt", self.shared_prompt)
        check_bool("DPOConfig.group_prompts", self.group_prompts)
        require(self.shared_prompt or not self.group_prompts,
                "DPOConfig.group_prompts=True needs shared_prompt=True (one prompt copy for the pairs that share it)")
        require(self.max_tokens_per_row is None or not self.group_prompts,
                f"DPOConfig.group_prompts=True needs max_tokens_per_row=None (one row per batch), got "
                f"{self.max_tokens_per_row}: a group's length depends on which pairs a batch draws, so a budget could "
                f"only be checked batch by batch, mid-training")
        check_bool("DPOConfig.token_metrics", self.token_metrics)
        check_int("DPOConfig.max_tokens_per_row", self.max_tokens_per_row, minimum=4, optional=True)
        check_real("DPOConfig.simpo_gamma", self.simpo_gamma)
        check_head_options(self.head_mode, self.head_memory_budget, "ieee", owner="DPOConfig.")
        check_trl_fields(self)


def check_trl_fields(args: trl.DPOConfig) -> None:
    """The TRL DPOConfig fields whose values fastdpo checks itself (TypeError / ValueError naming the field)."""
    check_int("DPOConfig.max_length", args.max_length, minimum=2, optional=True)
    check_real("DPOConfig.ld_alpha", args.ld_alpha, optional=True)
    require(args.ld_alpha is None or 0.0 <= args.ld_alpha <= 1.0,
            f"DPOConfig.ld_alpha must lie in [0.0, 1.0] (1.0: no down-weighting, 0.0: the tail beyond the shorter "
            f"response is masked) or be None, got {args.ld_alpha}")
    require(args.ld_alpha is None or "sft" not in args.loss_type,
            f"DPOConfig.ld_alpha={args.ld_alpha} with loss_type 'sft': TRL's sft term uses the unweighted "
            f"log-probs while every other term uses the LD-weighted ones; fastdpo computes only the weighted "
            f"sums, so drop 'sft' or ld_alpha")
    require(args.truncation_mode in ("keep_start", "keep_end"),
            f"DPOConfig.truncation_mode must be 'keep_start' or 'keep_end', got {args.truncation_mode!r}")


# Every field TRL 1.16's DPOConfig declares (itself or in TRL's base config) and what fastdpo.trl does with it;
# tests/test_trl.py walks them all.
_TRL_OWN = "supported: TRL's own handling, unchanged"
_TRL_LOSS = "supported: same meaning, computed by fastdpo.loss (tested against TRL)"
TRL_CONFIG_FIELDS = {
    "learning_rate": _TRL_OWN, "model_init_kwargs": _TRL_OWN, "trust_remote_code": _TRL_OWN,
    "disable_dropout": _TRL_OWN, "dataset_num_proc": _TRL_OWN, "logging_steps": _TRL_OWN,
    "gradient_checkpointing": _TRL_OWN, "lr_scheduler_kwargs": _TRL_OWN, "torch_empty_cache_steps": _TRL_OWN,
    "activation_offloading": _TRL_OWN, "pad_token": _TRL_OWN + " (deprecated; padding never reaches the loss)",
    "use_liger_kernel": _TRL_OWN + " (layer kernels only, as TRL: the fused LM head stays fastdpo's)",
    "precompute_ref_batch_size": _TRL_OWN + " (batches packed by fastdpo)",
    "sync_ref_model": _TRL_OWN + " (TR-DPO callback)", "ref_model_mixup_alpha": _TRL_OWN,
    "ref_model_sync_steps": _TRL_OWN, "bf16": _TRL_OWN + " (accelerate's autocast around the model call)",
    "precompute_ref_log_probs": "supported: TRL's precompute, scored by fastdpo (refused for a reference-free "
                                "loss)",
    "max_length": "supported: truncation per sequence (truncation_mode), as TRL's collator",
    "truncation_mode": "supported: keep_start and keep_end (a pair whose two sequences keep different prompt "
                       "tokens is packed as two entries)",
    "padding_free": "supported: fastdpo always packs without padding (TRL's fallback warning does not apply)",
    "pad_to_multiple_of": "supported: packed rows padded to the multiple; token counts as TRL's",
    "router_aux_loss_coef": "supported: MoE load-balancing loss on the packed batch, as TRL (refused on a model "
                            "without routers)",
    "ld_alpha": "supported: LD-DPO token weights (refused with loss_type 'sft')",
    "loss_type": _TRL_LOSS + "; also 'simpo' (no reference); unknown types refused",
    "loss_weights": _TRL_LOSS, "f_divergence_type": _TRL_LOSS, "f_alpha_divergence_coef": _TRL_LOSS,
    "label_smoothing": _TRL_LOSS + " (out-of-range values refused)", "beta": _TRL_LOSS,
    "use_weighting": _TRL_LOSS + " (WPO)", "discopop_tau": _TRL_LOSS,
}

# The loss types TRL 1.16 applies label_smoothing to (it ignores the value for every other type), plus simpo,
# which TRL's CPOTrainer smooths.
TRL_SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired", "simpo")


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
        if "simpo" in group["loss_type"]:
            group["gamma"] = getattr(args, "simpo_gamma", 0.5)
        try:
            check_loss_config(**group)
        except ValueError as error:  # fastdpo's `alpha` is TRL's f_alpha_divergence_coef
            raise ValueError(f"DPOConfig: {str(error).replace('alpha', 'f_alpha_divergence_coef')}") from None
        groups.append(group)
    return groups


@dataclass
class DataCollatorForPackedPreference:
    """TRL 1.16 tokenized rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, or TRL < 1.0's
    ``prompt_input_ids`` / ``chosen_input_ids`` / ``rejected_input_ids``; optional ``ref_chosen_logps`` /
    ``ref_rejected_logps`` on every row) -> {"packed": PackedBatch, "token_counts": [R, T] fp32,
    "num_tokens", "padded_tokens": int64 scalars, ["ref_chosen_logps", "ref_rejected_logps": [B] float64]}.

    Truncation is TRL's, per sequence: prompt + completion cut to ``max_length`` tokens, keeping the start
    (``truncation_mode="keep_start"``) or the end (``"keep_end"``; a pair whose chosen and rejected sequences
    then keep different prompt tokens is packed as two entries, see :meth:`pack`).
    ``num_tokens`` counts the tokens TRL's padded batch attends to (2 x prompt + chosen + rejected per pair),
    ``padded_tokens`` the size of TRL's padded ``input_ids`` (2B x the longest sequence, rounded up to
    ``pad_to_multiple_of``): the trainer's ``num_input_tokens_seen`` and ``total_flos`` use them as TRL does.
    ``token_counts`` says how many of TRL's sequences hold each packed token (the MoE router loss's weights).
    Reference log-probs are carried in float64 (exactly what the dataset holds); the trainer casts them to
    the loss's dtype.
    """

    shared_prompt: bool = True
    group_prompts: bool = False
    max_length: int | None = None
    max_tokens_per_row: int | None = None
    pad_to_multiple_of: int | None = None
    pad_token_id: int = 0
    truncation_mode: str = "keep_start"

    def __post_init__(self):
        check_bool("shared_prompt", self.shared_prompt)
        check_bool("group_prompts", self.group_prompts)
        require(self.shared_prompt or not self.group_prompts, "group_prompts=True needs shared_prompt=True")
        require(self.max_tokens_per_row is None or not self.group_prompts,
                "group_prompts=True needs max_tokens_per_row=None (one row per batch)")
        check_int("max_length", self.max_length, minimum=2, optional=True)
        check_int("max_tokens_per_row", self.max_tokens_per_row, minimum=4, optional=True)
        check_int("pad_to_multiple_of", self.pad_to_multiple_of, minimum=1, optional=True)
        check_int("pad_token_id", self.pad_token_id, minimum=0)
        require(self.truncation_mode in ("keep_start", "keep_end"),
                f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        require(len(examples) > 0, "DataCollatorForPackedPreference: the batch is empty (no rows); a DataLoader "
                                   "batch needs at least one preference row")
        sequences = []
        for i, example in enumerate(examples):
            try:
                prompt, chosen, rejected = (list(part) for part in pair_parts(example))
            except (TypeError, ValueError) as error:
                raise type(error)(f"DataCollatorForPackedPreference: row {i}: {error}") from None
            sequences.append(self._truncate(prompt, chosen, i) + self._truncate(prompt, rejected, i))
        out = self.pack(sequences)
        lengths = [len(prompt) + len(completion) for pair in sequences for prompt, completion in (pair[:2], pair[2:])]
        longest = max(lengths)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out["num_tokens"] = torch.tensor(sum(lengths))
        out["padded_tokens"] = torch.tensor(len(lengths) * longest)
        out.update(reference_columns(examples))
        return out

    def _truncate(self, prompt: list, completion: list, row: int) -> tuple[list, list]:
        """(prompt, completion) of one sequence, cut to max_length as TRL's collator cuts prompt + completion."""
        if self.max_length is None:
            return prompt, completion
        if self.truncation_mode == "keep_start":
            keep = self.max_length - len(prompt)
            require(keep >= 1, f"row {row}: its prompt ({len(prompt)} tokens) fills max_length={self.max_length}")
            return prompt, completion[:keep]
        cut = max(0, len(prompt) + len(completion) - self.max_length)
        return prompt[cut:], completion[max(0, cut - len(prompt)):]

    def pack(self, sequences: list[tuple[list, list, list, list]]) -> dict[str, Any]:
        """(chosen prompt, chosen, rejected prompt, rejected) token-id lists per pair -> {"packed": PackedBatch,
        "token_counts": [R, T] fp32}; a pair longer than max_tokens_per_row is an error.

        A pair whose two prompts are equal is one packed pair. One whose prompts differ (keep_end cut them at
        different tokens) becomes two entries, (chosen prompt, chosen, [pad]) and (rejected prompt, [pad],
        rejected), whose stand-in responses are unscored; the batch is renumbered to TRL's sequences (chosen
        of pair i -> i, rejected -> B + i). A sequence left with no prompt token (keep_end cut into its
        completion) uses its first completion token as the prompt: that token has no predecessor and is
        never scored, in TRL too.
        """
        entries, live, owners = [], [], []
        for i, (chosen_prompt, chosen, rejected_prompt, rejected) in enumerate(sequences):
            chosen_prompt, chosen = _with_prompt(chosen_prompt, chosen)
            rejected_prompt, rejected = _with_prompt(rejected_prompt, rejected)
            if chosen_prompt == rejected_prompt:
                entries.append((chosen_prompt, chosen, rejected))
                live.append((True, True))
            else:
                entries += [(chosen_prompt, chosen, [self.pad_token_id]), (rejected_prompt, [self.pad_token_id],
                                                                           rejected)]
                live += [(True, False), (False, True)]
            owners += [i] * (len(entries) - len(owners))
        lengths = [pair_length(len(p), len(c), len(r), self.shared_prompt) for p, c, r in entries]
        budget = sum(lengths) if self.max_tokens_per_row is None else self.max_tokens_per_row  # None: one row
        too_long = [k for k, n in enumerate(lengths) if n > budget]
        if too_long:
            k = too_long[0]
            raise ValueError(
                f"max_tokens_per_row={budget}: pair {owners[k]} of this batch needs {lengths[k]} tokens "
                f"({'shared' if self.shared_prompt else 'separate'}-prompt layout: prompt {len(entries[k][0])}, "
                f"chosen {len(entries[k][1])}, rejected {len(entries[k][2])}); raise DPOConfig.max_tokens_per_row, "
                f"set it to None (one row per batch) or lower DPOConfig.max_length")
        batch = pack_pairs(*zip(*entries), max_tokens=budget, shared_prompt=self.shared_prompt,
                           group_prompts=self.group_prompts, pad_token_id=self.pad_token_id,
                           pad_to_multiple_of=self.pad_to_multiple_of)
        E, B = len(entries), len(sequences)
        new_ids = torch.tensor([owners[k] if live[k][0] else -1 for k in range(E)]
                               + [B + owners[k] if live[k][1] else -1 for k in range(E)])
        counts = _sequence_counts(batch, (new_ids >= 0).float())
        if E > B:
            batch = _renumbered(batch, new_ids, B)
        return {"packed": batch, "token_counts": counts}


def _keep_end_lengths(n_prompt: np.ndarray, n_completion: np.ndarray, max_length: int):
    """(tokens cut, prompt length, completion length) of sequences cut by keep_end, as `pack` lays them out
    (an emptied prompt takes the completion's first token)."""
    cut = np.maximum(0, n_prompt + n_completion - max_length)
    prompt = n_prompt - np.minimum(cut, n_prompt)
    completion = n_completion - np.maximum(0, cut - n_prompt)
    return cut, np.maximum(prompt, 1), completion - (prompt == 0)


def _with_prompt(prompt: list, completion: list) -> tuple[list, list]:
    """A sequence cut into its completion lends its first (never scored) token to the empty prompt."""
    return (prompt, completion) if prompt else (completion[:1], completion[1:])


def _renumbered(batch: PackedBatch, new_ids: torch.Tensor, num_pairs: int) -> PackedBatch:
    """`batch` with its entries' sequences renumbered by new_ids [2E] (-1: a stand-in, unscored)."""
    scored = batch.seq_ids >= 0
    seq_ids = torch.where(scored, new_ids[batch.seq_ids.clamp(min=0)], -1)
    labels = torch.where(scored & (seq_ids < 0), batch.ignore_index, batch.labels)
    # entries come in pair order and each pair has one entry holding its chosen sequence: the pair's row
    pair_rows = [row for owner, row in zip(new_ids[:len(batch.pair_rows)].tolist(), batch.pair_rows) if owner >= 0]
    return dataclasses.replace(batch, seq_ids=seq_ids, labels=labels, num_pairs=num_pairs, pair_rows=pair_rows)


def _sequence_counts(batch: PackedBatch, live: torch.Tensor) -> torch.Tensor:
    """[R, T] fp32: how many live sequences (live [2E], by the batch's own numbering) contain each token, i.e.
    how often TRL's padded batch holds it. A token of a branch (a whole sequence in the separate layout; last
    prompt token + response in the shared one) belongs to the sequence that branch scores; a shared context token
    to every sequence of its block (the pair's two, or every pair's with group_prompts); padding 0."""
    segments, seq = batch.segment_ids.reshape(-1), batch.seq_ids.reshape(-1)
    labelled, block = seq >= 0, segments.clamp(min=0)
    branch = batch.branch_ids.reshape(-1).clamp(min=0)
    width = int(branch.max()) + 1
    key = block * width + branch  # (block, branch): every branch holds at least one scored token
    seq_of_key = torch.full(((int(segments.max()) + 1) * width,), -1, dtype=torch.long)
    seq_of_key[key[labelled]] = seq[labelled]
    live_of_key = torch.where(seq_of_key >= 0, live[seq_of_key.clamp(min=0)], 0.0)
    block_live = live_of_key.view(-1, width).sum(dim=1)  # the context branch holds no scored token: 0
    counts = torch.where(branch == BRANCH_CONTEXT, block_live[block], live_of_key[key])
    return torch.where(segments >= 0, counts, 0.0).reshape(batch.seq_ids.shape)


def reference_columns(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """{"ref_chosen_logps", "ref_rejected_logps": [B] float64} when every row has them, {} when none has; a
    batch where only some rows have them is an error."""
    out = {}
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        have = [key in example for example in examples]
        if any(have):
            missing = [i for i, has in enumerate(have) if not has]
            require(not missing, f"{key}: rows {missing[:10]} of the batch lack it while the others have it; "
                                 f"precomputed reference log-probs must be on every row (or none)")
            out[key] = torch.tensor([float(example[key]) for example in examples], dtype=torch.float64)
    return out


@dataclass
class PackingCollator:
    """A custom ``data_collator`` yielding TRL's padded keys, packed: ``input_ids``, ``attention_mask`` and
    ``completion_mask`` [2B, L] (rows 0..B-1 prompt + chosen, rows B..2B-1 prompt + rejected, either padding
    side; optional ``ref_chosen_logps`` / ``ref_rejected_logps`` [B]) -> the output of ``packer.pack``.

    A row's prompt is its attended tokens with completion_mask 0, which must precede the completion (it may
    be empty, as after TRL's keep_end truncation). ``num_tokens`` / ``padded_tokens`` are the custom batch's
    own (attention_mask sum, input_ids size).
    """

    collator: Callable[[list], dict]
    packer: DataCollatorForPackedPreference

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        padded = self.collator(examples)
        expected = {"input_ids", "attention_mask", "completion_mask"}
        require(hasattr(padded, "keys") and expected <= set(padded.keys()),
                f"data_collator must return TRL's padded keys {sorted(expected)} (chosen rows first, then "
                f"rejected), got {sorted(padded.keys()) if hasattr(padded, 'keys') else type(padded).__name__}")
        ids, attention, completion = (padded[k] for k in ("input_ids", "attention_mask", "completion_mask"))
        require(ids.dim() == 2 and ids.shape[0] % 2 == 0 and ids.shape[0] > 0
                and attention.shape == ids.shape == completion.shape,
                f"data_collator: input_ids, attention_mask and completion_mask must share one shape [2B, L], got "
                f"{tuple(ids.shape)}, {tuple(attention.shape)}, {tuple(completion.shape)}")
        half = ids.shape[0] // 2
        parts = [self._split(ids[k], attention[k], completion[k], k) for k in range(ids.shape[0])]
        out = self.packer.pack([parts[i] + parts[half + i] for i in range(half)])
        out["num_tokens"] = attention.sum().long()
        out["padded_tokens"] = torch.tensor(ids.numel())
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in padded:
                out[key] = torch.as_tensor(padded[key]).to(torch.float64)
        return out

    @staticmethod
    def _split(ids, attention, completion, row) -> tuple[list, list]:
        """(prompt, completion) token-id lists of one padded row."""
        kept = attention.bool()
        tokens, is_completion = ids[kept].tolist(), completion[kept].bool()
        n_prompt = int((~is_completion).sum())
        require(bool(is_completion[n_prompt:].all()) and n_prompt < len(tokens),
                f"data_collator: row {row}: completion_mask must mark a non-empty completion after the prompt "
                f"among the attended tokens")
        return tokens[:n_prompt], tokens[n_prompt:]


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


def ld_token_weights(batch: PackedBatch, ld_alpha: float) -> torch.Tensor:
    """LD-DPO token weights [R, T] fp32, aligned with batch.labels (TRL 1.16's split): 1 on the first
    min(|y_c|, |y_r|) scored tokens of each response of a pair, ld_alpha on the rest."""
    scored = (batch.labels != batch.ignore_index) & (batch.seq_ids >= 0)
    scored[:, 0] = False  # position 0 of a row has no preceding logits (shifted scoring)
    flat_scored = torch.nonzero(scored.reshape(-1)).squeeze(1)
    seq = batch.seq_ids.reshape(-1)[flat_scored]
    counts = torch.bincount(seq, minlength=batch.num_sequences)
    order = torch.argsort(seq, stable=True)  # a sequence's tokens are contiguous and in order in its row
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - (torch.cumsum(counts, 0) - counts)[seq[order]]
    shared = torch.minimum(*counts.chunk(2)).repeat(2)
    weights = torch.zeros(scored.numel(), dtype=torch.float32, device=scored.device)
    weights[flat_scored] = torch.where(rank < shared[seq], 1.0, float(ld_alpha))
    return weights.reshape(scored.shape)


class RouterAuxLoss:
    """The Mixture-of-Experts load-balancing loss of a Hugging Face MoE causal LM on a packed batch, as TRL
    computes it on its padded batch.

    Forward hooks on the model's routers (the module class of Transformers' own ``router_logits`` output
    recorder) collect each layer's router logits [R * T, E]; the model's own ``load_balancing_loss_func``
    averages them over the tokens of TRL's padded batch, each packed token weighted by how many of TRL's
    sequences hold it (the collator's ``token_counts``: 2 for a shared prompt's tokens, 0 for padding).
    """

    def __init__(self, model: torch.nn.Module):
        lm = unwrap_causal_lm(model)
        recorder = getattr(lm, "_can_record_outputs", None) or {}
        recorder = recorder.get("router_logits")
        self.loss_fn = getattr(sys.modules[type(lm).__module__], "load_balancing_loss_func", None)
        self.num_experts = getattr(lm, "num_experts", None)
        self.top_k = getattr(lm, "num_experts_per_tok", None)
        require(recorder is not None and self.loss_fn is not None and self.num_experts and self.top_k,
                f"router_aux_loss_coef: {type(lm).__name__} has no router_logits recorder / "
                f"load_balancing_loss_func / num_experts / num_experts_per_tok that fastdpo can read; set "
                f"DPOConfig(router_aux_loss_coef=0.0) to train without the auxiliary loss")
        self.routers = [m for m in lm.modules() if isinstance(m, recorder.target_class)]
        self.index = recorder.index

    @contextlib.contextmanager
    def recording(self):
        """Collects the router logits of the forwards run inside the block (a list, in layer order)."""
        logits = []

        def record(module, args, output):
            logits.append(output[self.index] if isinstance(output, (tuple, list)) else output)

        hooks = [router.register_forward_hook(record) for router in self.routers]
        try:
            yield logits
        finally:
            for hook in hooks:
                hook.remove()

    def __call__(self, router_logits: list[torch.Tensor], token_counts: torch.Tensor) -> torch.Tensor:
        """router_logits: one [R * T, E] per layer; token_counts [R, T] (the collator's)."""
        counts = token_counts.to(router_logits[0].device, torch.float32).reshape(-1)
        return self.loss_fn(tuple(router_logits), self.num_experts, self.top_k, counts)


@contextlib.contextmanager
def _reference_not_loaded(policy_is_path: bool):
    """TRL loads a reference model from the policy's path when ref_model is None (without PEFT or precompute);
    a reference-free loss needs none. Inside this block TRL's loader returns None for that reference (the
    policy itself, when given as a path, is still loaded)."""
    load = trl_dpo_trainer.create_model_from_path
    calls = []

    def load_policy_only(*args, **kwargs):
        calls.append(args)
        return load(*args, **kwargs) if policy_is_path and len(calls) == 1 else None

    trl_dpo_trainer.create_model_from_path = load_policy_only
    try:
        yield
    finally:
        trl_dpo_trainer.create_model_from_path = load


class DPOTrainer(trl.DPOTrainer):
    """TRL 1.16's DPOTrainer with fastdpo's packed, logits-free loss. Same constructor and behaviour.

    Refused at construction, before tokenization (ValueError / NotImplementedError naming the option):
    vision datasets, ``router_aux_loss_coef`` on a model without routers, invalid loss options (e.g.
    ``label_smoothing`` outside [0, 0.5) for ``robust``, an unknown ``loss_type``), and, for a reference-free
    loss (``simpo``, ``sft``), a ``ref_model``, ``precompute_ref_log_probs`` or ``sync_ref_model`` (there is
    no reference to use). Refused as TRL tokenizes, before any reference precompute: a pair longer than
    ``max_tokens_per_row``.
    """

    def __init__(self, model, ref_model=None, args: trl.DPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
            args = DPOConfig(f"{name.split('/')[-1]}-DPO")
        check_trl_fields(args)
        self._loss_groups = loss_groups(args)
        self._reference_free = not any(check_loss_config(**group).needs_reference for group in self._loss_groups)
        if self._reference_free:
            for name, value in (("ref_model", ref_model is not None),
                                ("precompute_ref_log_probs", args.precompute_ref_log_probs),
                                ("sync_ref_model", args.sync_ref_model)):
                require(not value, f"{name}: loss_type {list(args.loss_type)} uses no reference model, so there is "
                                   f"no reference to {'compute' if name != 'ref_model' else 'use'}; pass "
                                   f"{name}={None if name == 'ref_model' else False}")
        self._refuse_unsupported_data_and_models(model, args, train_dataset)
        require("inputs" not in (args.include_for_metrics or []),
                "include_for_metrics=['inputs']: fastdpo's batches are packed, there is no padded input_ids to hand "
                "compute_metrics; drop 'inputs' (predictions are per pair, see fastdpo.trl.PREDICTION_COLUMNS)")
        fastdpo_args = {f: getattr(args, f, default) for f, default in
                        (("shared_prompt", True), ("group_prompts", False), ("max_tokens_per_row", None),
                         ("token_metrics", True),
                         ("head_mode", "auto"), ("head_memory_budget", None))}
        self._token_metrics = fastdpo_args["token_metrics"]
        self._head_options = {name: fastdpo_args[name] for name in ("head_mode", "head_memory_budget")}
        packer = DataCollatorForPackedPreference(
            shared_prompt=fastdpo_args["shared_prompt"], group_prompts=fastdpo_args["group_prompts"],
            max_length=args.max_length,
            max_tokens_per_row=fastdpo_args["max_tokens_per_row"], pad_to_multiple_of=args.pad_to_multiple_of,
            truncation_mode=args.truncation_mode)
        if data_collator is None:
            data_collator = packer
        elif not isinstance(data_collator, (DataCollatorForPackedPreference, PackingCollator)):
            data_collator = PackingCollator(data_collator, dataclasses.replace(packer, max_length=None))
        # the datasets are checked against this as TRL tokenizes them (_prepare_dataset), before any precompute
        self._packer = data_collator if isinstance(data_collator, DataCollatorForPackedPreference) else None
        padding_free = args.padding_free
        args.padding_free = False  # fastdpo always packs: TRL's "falling back to padding" warning does not apply
        loading = _reference_not_loaded(isinstance(model, str)) if self._reference_free else contextlib.nullcontext()
        try:
            with loading:
                super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                                 train_dataset=train_dataset, eval_dataset=eval_dataset,
                                 processing_class=processing_class, compute_metrics=compute_metrics,
                                 callbacks=callbacks, optimizers=optimizers, quantization_config=quantization_config,
                                 peft_config=peft_config)
        finally:
            args.padding_free = padding_free
        self._router_aux_loss = RouterAuxLoss(self.model) if self.aux_loss_enabled else None
        if isinstance(self.data_collator, DataCollatorForPackedPreference):
            self.data_collator.pad_token_id = self._tokenizer.pad_token_id
        if self._reference_free:
            logger.warning(f"fastdpo: loss_type {list(args.loss_type)} uses no reference model: no reference "
                           f"model is loaded and no reference forward is run")

    def _refuse_unsupported_data_and_models(self, model, args, train_dataset) -> None:
        """Vision data, and router_aux_loss_coef on a model without routers, refused before TRL tokenizes."""
        if train_dataset is not None and not isinstance(train_dataset, str):
            sample = next(iter(train_dataset))
            if "image" in sample or "images" in sample:
                raise NotImplementedError("train_dataset: vision datasets (an 'image' / 'images' column) are not "
                                          "supported by fastdpo.trl.DPOTrainer; use trl.DPOTrainer for them")
        if not isinstance(model, str):
            config = model.config.get_text_config()
            coef = args.router_aux_loss_coef
            require(not coef or hasattr(config, "output_router_logits"),
                    f"router_aux_loss_coef={coef}: {type(model).__name__} is not a Mixture-of-Experts model that "
                    f"returns router logits, so there is no auxiliary loss to weight; leave it None or 0.0")
            coef = getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef  # TRL's resolution
            if hasattr(config, "output_router_logits") and coef != 0.0:
                RouterAuxLoss(model)  # refuses an MoE model whose router logits fastdpo cannot read

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's tokenization, then the checks that need token counts (before any reference precompute)."""
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self._packer is not None:
            self._check_pairs(dataset, dataset_name, args)
        return dataset

    def _check_pairs(self, dataset, name: str, args) -> None:
        """Every pair of a map-style dataset fits max_tokens_per_row once truncated as the collator truncates it
        (keep_end: a pair whose two sequences both lose their whole prompt is left to the per-batch check, its
        packing depends on its first completion tokens)."""
        budget = self._packer.max_tokens_per_row
        if budget is None or not hasattr(dataset, "column_names"):  # IterableDataset: checked per batch
            return
        columns = dataset.with_format("arrow")  # lengths straight from the Arrow columns: no Python lists
        n_prompt, n_chosen, n_rejected = (pc.list_value_length(columns[column]).to_numpy(zero_copy_only=False)
                                          for column in ("prompt_ids", "chosen_ids", "rejected_ids"))
        shared = self._packer.shared_prompt
        if args.max_length is None:
            needed = pair_length(n_prompt, n_chosen, n_rejected, shared)  # elementwise on arrays
        elif args.truncation_mode == "keep_start":
            n_chosen, n_rejected = (np.minimum(n, args.max_length - n_prompt) for n in (n_chosen, n_rejected))
            needed = pair_length(n_prompt, n_chosen, n_rejected, shared)
        else:  # keep_end, as DataCollatorForPackedPreference.pack lays the kept sequences out
            kept = [_keep_end_lengths(n_prompt, n, args.max_length) for n in (n_chosen, n_rejected)]
            (cut_c, prompt_c, chosen), (cut_r, prompt_r, rejected) = kept
            one_entry = pair_length(prompt_c, chosen, rejected, shared)
            two_entries = np.maximum(pair_length(prompt_c, chosen, 1, shared),
                                     pair_length(prompt_r, 1, rejected, shared))
            needed = np.where((cut_c == cut_r) & (n_prompt > cut_c), one_entry, two_entries)
            needed = np.where((n_prompt <= cut_c) & (n_prompt <= cut_r), 0, needed)
        over = np.nonzero(needed > budget)[0]
        require(not len(over),
                f"DPOConfig.max_tokens_per_row={budget} is smaller than pair {over[0] if len(over) else ''} of "
                f"the {name} dataset, which needs {needed[over[0]] if len(over) else ''} tokens "
                f"({'shared' if shared else 'separate'}-prompt layout, after max_length truncation); raise "
                f"max_tokens_per_row, set it to None (one row per batch) or lower max_length")

    # -- token accounting: TRL's padded batch, which Trainer would measure on input_ids ------------------------

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Trainer's estimate, 6 x tokens x non-embedding parameters, on TRL's padded batch (``padded_tokens``)."""
        if not hasattr(self.model, "num_parameters"):
            return 0
        return 6 * int(inputs["padded_tokens"]) * self.model.num_parameters(exclude_embeddings=True)

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Trainer's num_input_tokens_seen: "all" counts TRL's padded input_ids, "non_padding" its attention mask."""
        mode = self.args.include_num_input_tokens_seen
        if mode == "no":
            return
        tokens = inputs["num_tokens"] if mode == "non_padding" else inputs["padded_tokens"]
        tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    # -- scoring -------------------------------------------------------------------------------------------------

    def _token_weights(self, batch: PackedBatch) -> torch.Tensor | None:
        return None if self.ld_alpha is None else ld_token_weights(batch, self.ld_alpha)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs (chosen [B], rejected [B]) of a packed batch: `model` (the reference) under no_grad,
        or the PEFT policy with its adapter disabled (TRL's "ref" adapter if it has one); LD-weighted with
        ld_alpha."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        batch = inputs["packed"]
        weights = self._token_weights(batch)
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              adapter, self.accelerator.autocast()):
            logps = model_sequence_logps(model, batch, token_weights=weights).logps
        return logps.chunk(2)

    def _reference_logps(self, inputs) -> torch.Tensor | None:
        """[2B] reference log-probs (chosen then rejected), None for a reference-free loss."""
        if self._reference_free:
            return None
        if self.precompute_ref_logps:
            return torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        reference = self.model if self.ref_model is None else self.ref_model
        return torch.cat(self.compute_ref_log_probs(reference, inputs))

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        ref_logps = self._reference_logps(inputs)
        with self._router_aux_loss.recording() if self._router_aux_loss else contextlib.nullcontext([]) as routed:
            head = forward_hidden(model, inputs["packed"])
        batch = inputs["packed"].to(head.weight.device)
        # the row pass gives the token metrics unless a no-grad statistics pass runs anyway (WPO weighting, or
        # heads whose row pass cannot: vocabulary-sharded, fused)
        free_token_metrics = (self._token_metrics and not self.use_weighting and not is_vocab_sharded(head.weight)
                              and self._head_options["head_mode"] != "fused")
        weights = self._token_weights(batch)
        reference = {}
        if ref_logps is not None:  # kept in float64 for a float64 model, else float32 (as TRL's batch holds them)
            dtype = torch.float64 if head.hidden.dtype == torch.float64 else torch.float32
            reference = dict(ref_logps=ref_logps.to(head.weight.device, dtype))
        with torch.autocast(head.weight.device.type, enabled=False):
            out = fastdpo.loss(hidden=head.hidden, weight=head.weight, bias=head.bias, logit_scale=head.logit_scale,
                               softcap=head.softcap, labels=batch.labels, seq_ids=batch.seq_ids,
                               ignore_index=batch.ignore_index, num_sequences=batch.num_sequences,
                               token_weights=weights, token_metrics=free_token_metrics, **self._head_options,
                               **reference,
                               **self._loss_groups[0])
            losses = out.losses
            for group in self._loss_groups[1:]:
                losses = losses + fastdpo.preference_loss(
                    out.chosen_logps, out.rejected_logps, out.ref_chosen_logps, out.ref_rejected_logps,
                    chosen_lengths=out.chosen_lengths, rejected_lengths=out.rejected_lengths, **group).losses
        extra_pass = (self._token_metrics and not free_token_metrics) or self.use_weighting
        stats = token_statistics(head, batch) if extra_pass else None
        if self.use_weighting:
            losses = losses * _wpo_weights(stats, batch.num_sequences)
        loss = losses.mean()
        if self._router_aux_loss is not None:  # TRL: loss + router_aux_loss_coef * aux_loss, aux_loss logged
            aux_loss = self._router_aux_loss(routed, inputs["token_counts"])
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        self._log_metrics(mode, out, stats, inputs["num_tokens"], batch.num_pairs)
        if not return_outputs:
            return loss
        outputs = {name: getattr(out, name).detach() for name in PREDICTION_COLUMNS}
        outputs.update(ref_chosen_logps=out.ref_chosen_logps, ref_rejected_logps=out.ref_rejected_logps,
                       losses=losses.detach(), metrics=out.metrics)
        return loss, outputs

    def _log_metrics(self, mode: str, out, stats: TokenStatistics | None, num_tokens: torch.Tensor,
                     num_pairs: int) -> None:
        """TRL 1.16's metrics, same names, same cross-process aggregation."""
        gather_sum = lambda x: self.accelerator.gather_for_metrics(x.detach().reshape(1)).sum().item()  # noqa: E731
        metrics = self._metrics[mode]
        n_chosen, n_rejected = out.chosen_lengths.sum(), out.rejected_lengths.sum()
        if "entropy" in out.metrics:  # from the head's pass: token means -> sums for the cross-process mean
            total = gather_sum(n_chosen + n_rejected)
            entropy = gather_sum(out.metrics["entropy"] * (n_chosen + n_rejected))
            metrics["entropy"].append(entropy / total if total > 0 else 0.0)
            chosen_total = gather_sum(n_chosen)
            correct = gather_sum(out.metrics["mean_token_accuracy"] * n_chosen)
            metrics["mean_token_accuracy"].append(correct / chosen_total if chosen_total > 0 else 0.0)
        elif stats is not None and self._token_metrics:
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
        """(loss, predictions, label_ids): fastdpo's EvalPrediction has ``predictions`` [B, 4] fp32, the columns
        of PREDICTION_COLUMNS per pair, and ``label_ids`` [B] int64 zeros (the chosen response is preferred);
        (loss, None, None) with prediction_loss_only."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs).detach(), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        predictions = torch.stack([outputs[name].float() for name in PREDICTION_COLUMNS], dim=1)
        return loss.detach(), predictions, torch.zeros(predictions.shape[0], dtype=torch.int64,
                                                       device=predictions.device)
