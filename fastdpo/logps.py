"""Per-sequence log-probabilities: the user-facing shapes (HF labels, shifting, packed rows) -> ops."""
from typing import NamedTuple

import torch

from .ops import linear_sequence_logps, logits_sequence_logps


class SequenceLogps(NamedTuple):
    logps: torch.Tensor  # [S] float32, sum of log p(token) over each sequence's scored tokens
    n_tokens: torch.Tensor  # [S] int64, number of scored tokens


class TokenTargets(NamedTuple):
    """Flattened scoring plan: token n is scored against targets[n] and credited to seq_index[n]."""
    targets: torch.Tensor  # [N] int64, -1 = no target
    seq_index: torch.Tensor  # [N] int64, -1 = no sequence
    num_sequences: int
    vocab_size: int  # the targets were validated against [0, vocab_size)


def _require(condition, message):
    if not condition:
        raise ValueError(message)


def token_targets(labels, seq_ids, *, vocab_size, ignore_index, shift, num_sequences=None):
    """Validate labels [R, T] (or [T]) and seq_ids (same shape) and flatten them to a TokenTargets."""
    _require(isinstance(labels, torch.Tensor) and labels.dtype in (torch.int64, torch.int32),
             f"labels must be an int64 or int32 tensor, got "
             f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    _require(labels.dim() in (1, 2), f"labels must have shape [R, T] or [T], got {tuple(labels.shape)}")
    rows = labels.long().reshape(-1, labels.shape[-1])
    _require(rows.numel() > 0, f"empty batch: labels has shape {tuple(labels.shape)}")
    if seq_ids is None:
        seq = torch.arange(rows.shape[0], device=rows.device)[:, None].expand_as(rows)
        num_sequences = rows.shape[0] if num_sequences is None else num_sequences
    else:
        _require(isinstance(seq_ids, torch.Tensor) and seq_ids.dtype in (torch.int64, torch.int32),
                 "seq_ids must be an int64 or int32 tensor")
        _require(seq_ids.shape == labels.shape,
                 f"seq_ids must have the shape of labels {tuple(labels.shape)}, got {tuple(seq_ids.shape)}")
        seq = seq_ids.long().reshape(rows.shape)
        if num_sequences is None:
            num_sequences = int(seq.max()) + 1
        _require(bool((seq >= -1).all() and (seq < num_sequences).all()),
                 f"seq_ids must lie in [-1, {num_sequences}) (-1 = no sequence)")
    if shift:  # logits at t are scored against labels[t + 1]
        last = torch.full_like(rows[:, :1], ignore_index)
        rows = torch.cat([rows[:, 1:], last], dim=1)
        seq = torch.cat([seq[:, 1:], torch.full_like(last, -1)], dim=1)
    scored = (rows != ignore_index) & (seq >= 0)
    out_of_range = scored & ((rows < 0) | (rows >= vocab_size))
    if bool(out_of_range.any()):
        bad = rows[out_of_range][0].item()
        raise ValueError(f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
                         f"found {bad}")
    targets = torch.where(scored, rows, -1).reshape(-1)
    seq_index = torch.where(scored, seq, -1).reshape(-1)
    return TokenTargets(targets, seq_index, num_sequences, vocab_size)


def _check_float(name, tensor):
    _require(isinstance(tensor, torch.Tensor) and tensor.is_floating_point(),
             f"{name} must be a floating-point tensor, got "
             f"{tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")


def _check_finite(name, logps):
    if not bool(torch.isfinite(logps).all()):
        raise FloatingPointError(f"non-finite sequence log-probs: {name} contain NaN or inf "
                                 f"(pass check_finite=False to let them propagate)")


def compute_sequence_logps(logits=None, labels=None, seq_ids=None, *, hidden=None, weight=None, bias=None,
                           ignore_index=-100, shift=True, num_sequences=None, logit_scale=1.0, softcap=None,
                           temperature=1.0, backend="auto", check_finite=True, inplace_backward=False, plan=None):
    """`sequence_logps` plus the per-sequence logit sums (for TRL's logits/* metrics).

    `plan` reuses the TokenTargets of an earlier call on the same labels (the reference model scores the
    policy's tokens). Returns (logps [S] fp32, n_tokens [S] int64, logit_sums [S] fp32, plan).
    """
    _require(labels is not None, "labels is required")
    fused = hidden is not None or weight is not None
    _require(fused != (logits is not None),
             "pass either logits, or hidden and weight (the fused LM-head form), not both")
    if fused:
        _check_float("hidden", hidden)
        _check_float("weight", weight)
        _require(weight.dim() == 2, f"weight must have shape [V, D], got {tuple(weight.shape)}")
        vocab_size, dim = weight.shape
        _require(hidden.shape[:-1] == labels.shape and hidden.shape[-1] == dim,
                 f"hidden must have shape {tuple(labels.shape) + (dim,)} (labels shape + weight's D), "
                 f"got {tuple(hidden.shape)}")
        _require(hidden.dtype == weight.dtype,
                 f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype} (cast one of them)")
        if bias is not None:
            _require(bias.shape == (vocab_size,) and bias.dtype == weight.dtype,
                     f"bias must have shape ({vocab_size},) and dtype {weight.dtype}, "
                     f"got {tuple(bias.shape)} {bias.dtype}")
        _require(softcap is None or softcap > 0, f"softcap must be None or > 0, got {softcap}")
        _require(temperature > 0, f"temperature must be > 0, got {temperature}")
    else:
        _check_float("logits", logits)
        vocab_size = logits.shape[-1]
        _require(logits.shape[:-1] == labels.shape,
                 f"logits must have shape {tuple(labels.shape)} + (V,) to match labels, got {tuple(logits.shape)}")
    if plan is None:
        plan = token_targets(labels, seq_ids, vocab_size=vocab_size, ignore_index=ignore_index, shift=shift,
                             num_sequences=num_sequences)
    _require(plan.vocab_size == vocab_size,
             f"the reference vocabulary ({vocab_size}) differs from the policy's ({plan.vocab_size})")
    if fused:
        logps, logit_sums = linear_sequence_logps(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, *plan[:3], backend=backend,
            logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    else:
        flat = logits.reshape(-1, vocab_size)
        if flat.stride(1) != 1:
            flat = flat.contiguous()
        logps, logit_sums = logits_sequence_logps(flat, *plan[:3], backend=backend,
                                                  inplace_backward=inplace_backward, logit_scale=logit_scale,
                                                  softcap=softcap, temperature=temperature)
    if check_finite:
        _check_finite("hidden/weight" if fused else "logits", logps)
    n_tokens = torch.bincount(plan.seq_index[plan.seq_index >= 0], minlength=plan.num_sequences)
    return logps, n_tokens, logit_sums, plan


def sequence_logps(logits=None, labels=None, seq_ids=None, *, hidden=None, weight=None, bias=None,
                   ignore_index=-100, shift=True, num_sequences=None, logit_scale=1.0, softcap=None,
                   temperature=1.0, backend="auto", check_finite=True, inplace_backward=False):
    """Summed log-probability of each sequence's target tokens.

    Logits form: logits [R, T, V] (fp32/bf16/fp16) with labels [R, T] (or [T, V] with [T]).
    Fused form: hidden [R, T, D], weight [V, D], bias [V] | None: the LM head is applied tile by tile and
    the logits z = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature are never stored.
    labels are Hugging Face style: with shift=True the logits at t are scored against labels[..., t + 1];
    ignore_index marks tokens with no target. Without seq_ids each row is one sequence; seq_ids (shape of
    labels, -1 = none) lets one row hold several sequences. Returns SequenceLogps(logps [S] float32,
    n_tokens [S] int64). A sequence with no scored token has logps 0 and n_tokens 0.
    check_finite raises FloatingPointError when a result is NaN/inf (a NaN/+inf logit in a scored row, or
    -inf at a target); inplace_backward writes grad_logits into the logits buffer (logits form only).
    """
    logps, n_tokens, _, _ = compute_sequence_logps(
        logits, labels, seq_ids, hidden=hidden, weight=weight, bias=bias, ignore_index=ignore_index,
        shift=shift, num_sequences=num_sequences, logit_scale=logit_scale, softcap=softcap,
        temperature=temperature, backend=backend, check_finite=check_finite,
        inplace_backward=inplace_backward)
    return SequenceLogps(logps, n_tokens)
