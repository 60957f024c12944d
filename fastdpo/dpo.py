"""`fastdpo.loss`: policy and reference log-probs -> preference loss -> DPOOutput with TRL's metrics."""
import warnings
from dataclasses import dataclass, field

import torch

from .logps import check_finite_logps, compute_sequence_logps, refuse_head_options_without_head
from .losses import check_loss_config, preference_loss
from .validate import check_bool, check_same_device, check_tensor, require


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


class EmptySequenceWarning(UserWarning):
    """A pair's chosen or rejected response has no scored token (usually a data or truncation bug)."""


def _split_pairs(values, name):
    num_sequences = values.shape[0]
    if num_sequences == 0 or num_sequences % 2:
        raise ValueError(f"{name}: expected an even, non-zero number of sequences (B chosen then B rejected), "
                         f"got {num_sequences}")
    half = num_sequences // 2
    return values[:half], values[half:]


def _check_ref_logps(ref_logps, policy_logps):
    """Type, dtype, shape and device of a precomputed ref_logps [2B] (its values are checked later, in the
    fused check of `_check_results`)."""
    check_tensor("ref_logps", ref_logps)
    require(ref_logps.dtype in (torch.float32, policy_logps.dtype),
            f"ref_logps must be a float32 tensor of per-sequence log-probs [2B], got {ref_logps.dtype}")
    require(ref_logps.shape == policy_logps.shape,
            f"ref_logps must have shape ({policy_logps.shape[0]},) to match the {policy_logps.shape[0]} policy "
            f"sequences, got {tuple(ref_logps.shape)}")
    check_same_device(labels=policy_logps, ref_logps=ref_logps)
    return ref_logps.detach()


def _check_results(policy_name, logps, ref_name, ref, ref_is_input, n_tokens, check_finite):
    """The loss's one host transfer after the log-probs: a fused NaN/inf check of the policy and computed
    reference results [S], the finiteness of a precomputed ref_logps (`ref_is_input`; whatever check_finite
    says) and the number of empty sequences. Warns (EmptySequenceWarning) naming the pairs with an empty
    member; naming them costs one more transfer, on that path only."""
    checked = {}
    if check_finite:
        checked[policy_name] = logps
        if ref is not None and not ref_is_input:
            checked[ref_name] = ref
    also = [(n_tokens == 0).sum()]
    if ref_is_input:
        also.append(torch.isfinite(ref).all().long())
    n_empty, *ref_logps_finite = check_finite_logps(checked, also=also)
    require(all(ref_logps_finite), "ref_logps contains NaN or inf")
    if n_empty:
        half = n_tokens.shape[0] // 2
        pairs = sorted({i % half for i in torch.nonzero(n_tokens == 0).squeeze(1).tolist()})
        warnings.warn(f"fastdpo.loss: pair(s) {pairs[:10]}{' ...' if len(pairs) > 10 else ''} have a chosen or "
                      f"rejected response with no scored token; such a response counts as log-prob 0 (usually a "
                      f"sign of bad labels or truncation)", EmptySequenceWarning, stacklevel=3)


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
         check_finite=True, head_mode="auto", head_memory_budget=None, fp32_precision="ieee", token_weights=None,
         **loss_params):
    """DPO-family loss for a batch of 2B sequences: B chosen, then B rejected (pair i = i and B + i).

    Policy: `logits` [R, T, V], or the fused LM-head form `hidden` [R, T, D] + `weight` [V, D] (+ `bias`).
    Reference, one of: `ref_logits`; `ref_hidden` (+ `ref_weight`, defaulting to `weight`, + `ref_bias`);
    precomputed `ref_logps` [2B] float32; none with reference_free=True or loss_type simpo, which refuse a
    reference they would ignore. Reference inputs run forward-only under no_grad. `labels`/`seq_ids` as in
    `sequence_logps`, as are the logit transforms (both forms) and the LM-head options head_mode,
    head_memory_budget, fp32_precision (fused form). `loss_type` (str or list, with `loss_weights`),
    `beta`, `label_smoothing` and `loss_params` (e.g. gamma for simpo) follow TRL's DPOTrainer. A pair
    whose chosen or rejected response has no scored token gets an EmptySequenceWarning naming it (that
    response counts as log-prob 0). `token_weights` (shape of labels) weights each token's log-prob in its
    sequence's sum, for the policy and a computed reference alike (LD-DPO; see `sequence_logps`); a
    precomputed `ref_logps` must already be weighted the same way.
    Returns a DPOOutput; `.loss` is the mean over pairs.
    """
    loss_config = dict(beta=beta, loss_type=loss_type, loss_weights=loss_weights,
                       label_smoothing=label_smoothing, reference_free=reference_free, **loss_params)
    config = check_loss_config(**loss_config)
    given = [name for name, value in (("ref_logits", ref_logits), ("ref_hidden", ref_hidden),
                                      ("ref_logps", ref_logps)) if value is not None]
    require(len(given) <= 1, f"pass at most one reference input, got {given}")
    require(ref_hidden is not None or (ref_weight is None and ref_bias is None),
            "ref_weight and ref_bias go with ref_hidden (the reference's fused LM-head form); pass ref_hidden too")
    uses_reference = not reference_free and "simpo" not in config.loss_types
    ignoring = "reference_free=True" if reference_free else "loss_type simpo"
    require(uses_reference or not given,
            f"{given[0] if given else ''} was given but {ignoring} does not use a reference model: drop it "
            f"(it would be ignored)")
    require(given or not config.needs_reference,
            f"loss_type={loss_type!r} needs the reference model: pass ref_logits, ref_hidden or ref_logps, or "
            f"reference_free=True")
    check_bool("check_finite", check_finite)
    head_options = dict(head_mode=head_mode, head_memory_budget=head_memory_budget, fp32_precision=fp32_precision)
    if hidden is None and ref_hidden is None:
        refuse_head_options_without_head(head_options)
    common = dict(seq_ids=seq_ids, ignore_index=ignore_index, shift=shift, num_sequences=num_sequences,
                  logit_scale=logit_scale, softcap=softcap, temperature=temperature, backend=backend,
                  check_finite=False, token_weights=token_weights, **head_options)
    logps, n_tokens, logit_sums, plan = compute_sequence_logps(
        logits, labels, hidden=hidden, weight=weight, bias=bias, **common)
    chosen_logps, rejected_logps = _split_pairs(logps, "labels/seq_ids")
    chosen_lengths, rejected_lengths = _split_pairs(n_tokens, "labels/seq_ids")

    if ref_logps is not None:
        ref, ref_name = _check_ref_logps(ref_logps, logps), "ref_logps"
    elif given:
        if ref_hidden is not None and ref_weight is None:
            require(weight is not None, "ref_weight is required with ref_hidden when the policy is given as logits")
            ref_weight, ref_bias = weight, (bias if ref_bias is None else ref_bias)
        try:
            with torch.no_grad():
                ref = compute_sequence_logps(ref_logits, labels, hidden=ref_hidden, weight=ref_weight, bias=ref_bias,
                                             plan=plan, **common)[0]
        except (ValueError, TypeError) as error:
            raise type(error)(f"reference model inputs: {error}") from None
        ref_name = "reference model " + ("logits" if ref_logits is not None else "hidden/weight")
    else:
        ref, ref_name = None, None
    policy_name = "logits" if logits is not None else "hidden/weight"
    _check_results(policy_name, logps, ref_name, ref, ref_logps is not None, n_tokens, check_finite)
    ref_chosen, ref_rejected = (None, None) if ref is None else _split_pairs(ref, "reference")

    terms = preference_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected,
                            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **loss_config)
    metrics = _metrics(chosen_logps, rejected_logps, terms.chosen_rewards, terms.rejected_rewards,
                       logit_sums, n_tokens, plan.vocab_size)
    return DPOOutput(loss=terms.losses.mean(), losses=terms.losses, chosen_logps=chosen_logps,
                     rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
                     chosen_rewards=terms.chosen_rewards, rejected_rewards=terms.rejected_rewards,
                     chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, metrics=metrics)
