"""`fastdpo.loss`: policy and reference log-probs -> preference loss -> DPOOutput with TRL's metrics."""
from dataclasses import dataclass, field

import torch

from .logps import compute_sequence_logps
from .losses import check_loss_config, preference_loss


@dataclass
class DPOOutput:
    """Result of one DPO loss evaluation; per-pair tensors are [B], `metrics` holds detached scalars."""
    loss: torch.Tensor
    losses: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor | None
    ref_rejected_logps: torch.Tensor | None
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    metrics: dict = field(default_factory=dict)


def _split_pairs(values, name):
    num_sequences = values.shape[0]
    if num_sequences == 0 or num_sequences % 2:
        raise ValueError(f"{name}: expected an even, non-zero number of sequences (B chosen then B rejected), "
                         f"got {num_sequences}")
    half = num_sequences // 2
    return values[:half], values[half:]


def _reference_logps(ref_logps, num_sequences):
    if not isinstance(ref_logps, torch.Tensor) or ref_logps.dtype != torch.float32:
        raise ValueError("ref_logps must be a float32 tensor of per-sequence log-probs [2B]")
    if ref_logps.shape != (num_sequences,):
        raise ValueError(f"ref_logps must have shape ({num_sequences},) to match the {num_sequences} policy "
                         f"sequences, got {tuple(ref_logps.shape)}")
    if not bool(torch.isfinite(ref_logps).all()):
        raise ValueError("ref_logps contains NaN or inf")
    return ref_logps.detach()


def _metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, logit_sums, n_tokens, vocab_size):
    logit_chosen, logit_rejected = _split_pairs(logit_sums, "logits")
    n_chosen, n_rejected = _split_pairs(n_tokens, "labels")
    mean_logit = lambda total, count: total.sum() / (count.sum().clamp(min=1) * vocab_size)
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
        "logits/chosen": mean_logit(logit_chosen, n_chosen),
        "logits/rejected": mean_logit(logit_rejected, n_rejected),
    }


def loss(logits=None, labels=None, *, ref_logits=None, ref_logps=None, seq_ids=None, hidden=None, weight=None,
         bias=None, ref_hidden=None, ref_weight=None, ref_bias=None, beta=0.1, loss_type="sigmoid",
         loss_weights=None, label_smoothing=0.0, reference_free=False, ignore_index=-100, shift=True,
         num_sequences=None, logit_scale=1.0, softcap=None, temperature=1.0, backend="auto",
         check_finite=True, **loss_params):
    """DPO-family loss for a batch of 2B sequences: B chosen, then B rejected (pair i = i and B + i).

    Policy: `logits` [R, T, V], or the fused LM-head form `hidden` [R, T, D] + `weight` [V, D] (+ `bias`).
    Reference, one of: `ref_logits`; `ref_hidden` (+ `ref_weight`, defaulting to `weight`, + `ref_bias`);
    precomputed `ref_logps` [2B] float32; none with reference_free=True or a reference-free loss (simpo,
    sft). Reference inputs run forward-only under no_grad. `labels`/`seq_ids` as in `sequence_logps`.
    `loss_type` (str or list, with `loss_weights`), `beta`, `label_smoothing` and `loss_params` (e.g.
    gamma for simpo) follow TRL's DPOTrainer. Returns a DPOOutput; `.loss` is the mean over pairs.
    """
    loss_config = dict(beta=beta, loss_type=loss_type, loss_weights=loss_weights,
                       label_smoothing=label_smoothing, reference_free=reference_free, **loss_params)
    needs_reference = check_loss_config(**loss_config).needs_reference
    given = [name for name, value in (("ref_logits", ref_logits), ("ref_hidden", ref_hidden),
                                      ("ref_logps", ref_logps)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one reference input, got {given}")
    if needs_reference and not given:
        raise ValueError(f"loss_type={loss_type!r} needs the reference model: pass ref_logits, ref_hidden or "
                         f"ref_logps, or reference_free=True")
    common = dict(seq_ids=seq_ids, ignore_index=ignore_index, shift=shift, num_sequences=num_sequences,
                  logit_scale=logit_scale, softcap=softcap, temperature=temperature, backend=backend,
                  check_finite=check_finite)
    logps, n_tokens, logit_sums, plan = compute_sequence_logps(
        logits, labels, hidden=hidden, weight=weight, bias=bias, **common)
    chosen_logps, rejected_logps = _split_pairs(logps, "labels/seq_ids")
    chosen_lengths, rejected_lengths = _split_pairs(n_tokens, "labels/seq_ids")

    if ref_logps is not None and not reference_free:
        ref = _reference_logps(ref_logps, logps.shape[0])
    elif given and not reference_free:
        if ref_hidden is not None and ref_weight is None:
            ref_weight, ref_bias = weight, (bias if ref_bias is None else ref_bias)
        try:
            with torch.no_grad():
                ref = compute_sequence_logps(ref_logits, labels, hidden=ref_hidden, weight=ref_weight, bias=ref_bias,
                                             plan=plan, **common)[0]
        except (ValueError, FloatingPointError) as error:
            raise type(error)(f"reference model inputs: {error}") from None
    else:
        ref = None
    ref_chosen, ref_rejected = (None, None) if ref is None else _split_pairs(ref, "reference")

    terms = preference_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected,
                            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **loss_config)
    metrics = _metrics(chosen_logps, rejected_logps, terms.chosen_rewards, terms.rejected_rewards,
                       logit_sums, n_tokens, plan.vocab_size)
    return DPOOutput(loss=terms.losses.mean(), losses=terms.losses, chosen_logps=chosen_logps,
                     rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
                     chosen_rewards=terms.chosen_rewards, rejected_rewards=terms.rejected_rewards,
                     chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, metrics=metrics)
