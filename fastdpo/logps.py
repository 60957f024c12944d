"""Per-sequence log-probabilities: the user-facing shapes (HF labels, shifting, packed rows) -> ops."""
from typing import NamedTuple

import torch

from .head import HEAD_MODES
from .ops import BACKENDS, linear_sequence_logps, logits_sequence_logps
from .parallel import is_vocab_sharded, vocab_parallel_sequence_logps
from .torch_ops import FP32_PRECISIONS
from .validate import check_bool, check_choice, check_int, check_real, check_same_device, check_tensor, require

INDEX_DTYPES = (torch.int64, torch.int32)
DEFAULT_HEAD_OPTIONS = dict(head_mode="auto", head_memory_budget=None, fp32_precision="ieee")


class SequenceLogps(NamedTuple):
    logps: torch.Tensor  # [S] float32 (float64 for float64 inputs), sum of log p(token) over scored tokens
    n_tokens: torch.Tensor  # [S] int64, number of scored tokens


class TokenTargets(NamedTuple):
    """Flattened scoring plan: token n is scored against targets[n] and credited to seq_index[n]."""
    targets: torch.Tensor  # [N] int64, -1 = no target
    seq_index: torch.Tensor  # [N] int64, -1 = no sequence
    num_sequences: int
    vocab_size: int  # the targets were validated against [0, vocab_size)
    rows: torch.Tensor  # [M] int64, the tokens with a target (shared by the policy and the reference)
    n_tokens: torch.Tensor  # [S] int64, scored tokens per sequence


def token_targets(labels, seq_ids, *, vocab_size, ignore_index, shift, num_sequences=None):
    """Validate labels [R, T] (or [T]) and seq_ids (same shape) and flatten them to a TokenTargets.

    The data-dependent checks (label range, seq_ids range, the number of sequences and of scored tokens)
    come to the host in one transfer; everything else stays on the device.
    """
    check_tensor("labels", labels, dtypes=INDEX_DTYPES)
    require(labels.dim() in (1, 2), f"labels must have shape [R, T] or [T], got {tuple(labels.shape)}")
    require(labels.numel() > 0, f"labels must have at least one row and one position, got shape "
                                f"{tuple(labels.shape)} (empty batch)")
    check_int("num_sequences", num_sequences, minimum=1, optional=True)
    rows = labels.long().reshape(-1, labels.shape[-1])
    if seq_ids is None:
        require(num_sequences in (None, rows.shape[0]),
                f"num_sequences must equal the number of rows of labels ({rows.shape[0]}) when seq_ids is not "
                f"given (each row is one sequence), got {num_sequences}; pass seq_ids for packed rows")
        num_sequences = rows.shape[0]
        seq = torch.arange(rows.shape[0], device=rows.device)[:, None].expand_as(rows)
    else:
        check_tensor("seq_ids", seq_ids, dtypes=INDEX_DTYPES)
        require(seq_ids.shape == labels.shape,
                f"seq_ids must have the shape of labels {tuple(labels.shape)}, got {tuple(seq_ids.shape)}")
        check_same_device(labels=labels, seq_ids=seq_ids)
        seq = seq_ids.long().reshape(rows.shape)
    if shift:  # logits at t are scored against labels[t + 1]
        rows = torch.cat([rows[:, 1:], torch.full_like(rows[:, :1], ignore_index)], dim=1)
        seq_scored = torch.cat([seq[:, 1:], torch.full_like(seq[:, :1], -1)], dim=1)
    else:
        seq_scored = seq
    scored = (rows != ignore_index) & (seq_scored >= 0)
    out_of_range = (scored & ((rows < 0) | (rows >= vocab_size))).reshape(-1)
    first_bad = rows.reshape(-1).index_select(0, out_of_range.to(torch.uint8).argmax().reshape(1))[0]
    n_bad, bad, seq_min, seq_max, n_scored = torch.stack(
        [out_of_range.sum(), first_bad, seq.min(), seq.max(), scored.sum()]).tolist()  # the one host sync
    if num_sequences is None:
        require(seq_max >= 0, "seq_ids hold no sequence (all -1): nothing to score" if seq_min == -1 else
                f"seq_ids must be >= -1 (-1 = no sequence; sequences are numbered from 0), found {seq_min}")
        num_sequences = seq_max + 1
    require(seq_min >= -1 and seq_max < num_sequences,
            f"seq_ids must lie in [-1, {num_sequences}) (-1 = no sequence; num_sequences={num_sequences}), "
            f"found {seq_min if seq_min < -1 else seq_max}")
    require(n_bad == 0, f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; found {bad} "
                        f"({n_bad} scored position(s) out of range)")
    targets = torch.where(scored, rows, -1).reshape(-1)
    seq_index = torch.where(scored, seq_scored, -1).reshape(-1)
    scored_rows = torch.nonzero_static(scored.reshape(-1), size=n_scored).squeeze(1)
    n_tokens = torch.zeros(num_sequences, dtype=torch.int64, device=rows.device).index_add_(
        0, seq_index[scored_rows], torch.ones_like(scored_rows))
    return TokenTargets(targets, seq_index, num_sequences, vocab_size, scored_rows, n_tokens)


def check_transforms(*, logit_scale, softcap, temperature):
    """z = softcap(logit_scale * x) / temperature: logit_scale and temperature > 0, softcap None or > 0."""
    check_real("logit_scale", logit_scale, positive=True)
    check_real("softcap", softcap, positive=True, optional=True)
    check_real("temperature", temperature, positive=True)


def check_head_options(*, head_mode, head_memory_budget, fp32_precision):
    """The fused form's LM-head options (see fastdpo.head): mode, memory budget in bytes, fp32 products."""
    check_choice("head_mode", head_mode, HEAD_MODES)
    check_int("head_memory_budget", head_memory_budget, minimum=1, optional=True)
    check_choice("fp32_precision", fp32_precision, FP32_PRECISIONS)


def refuse_head_options_without_head(head_options):
    """head_mode / head_memory_budget / fp32_precision act on the fused LM head only: refuse them otherwise."""
    check_head_options(**head_options)
    changed = [name for name, value in head_options.items() if value != DEFAULT_HEAD_OPTIONS[name]]
    require(not changed, f"{', '.join(changed)} only apply to the fused LM-head form (hidden=, weight=), not to "
                         f"logits input: drop them")


def check_finite_logps(named_logps, *, also=()):
    """One fused NaN/inf check over the named [S] results (None entries skipped) and one host transfer,
    which also brings the 0-d integer tensors `also` (their values are returned). The error names the
    non-finite results."""
    given = {name: logps for name, logps in named_logps.items() if logps is not None}
    flags = [torch.isfinite(logps).all().long() for logps in given.values()]
    values = torch.stack(flags + list(also)).tolist()
    bad = [name for name, ok in zip(given, values) if not ok]
    if bad:
        raise FloatingPointError(f"non-finite sequence log-probs: {' and '.join(bad)} contain NaN or inf "
                                 f"(pass check_finite=False to let them propagate)")
    return values[len(flags):]


def _check_fused_inputs(hidden, weight, bias, labels):
    check_tensor("hidden", hidden, floating=True)
    check_tensor("weight", weight, floating=True)
    check_tensor("bias", bias, floating=True, optional=True)
    require(weight.dim() == 2 and weight.numel() > 0, f"weight must have shape [V, D] with V, D >= 1, "
                                                      f"got {tuple(weight.shape)}")
    vocab_size, dim = weight.shape
    require(hidden.shape[:-1] == labels.shape and hidden.shape[-1] == dim,
            f"hidden must have shape {tuple(labels.shape) + (dim,)} (labels shape + weight's D), "
            f"got {tuple(hidden.shape)}")
    require(hidden.dtype == weight.dtype,
            f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype} (cast one of them)")
    require(bias is None or (bias.shape == (vocab_size,) and bias.dtype == weight.dtype),
            f"bias must have shape ({vocab_size},) and dtype {weight.dtype}, "
            f"got {None if bias is None else (tuple(bias.shape), bias.dtype)}")
    check_same_device(labels=labels, hidden=hidden, weight=weight, bias=bias)
    return vocab_size


def _check_logits_input(logits, labels):
    check_tensor("logits", logits, floating=True)
    require(logits.dim() == labels.dim() + 1 and logits.shape[:-1] == labels.shape and logits.shape[-1] > 0,
            f"logits must have shape {tuple(labels.shape)} + (V,) with V >= 1 to match labels, "
            f"got {tuple(logits.shape)}")
    check_same_device(labels=labels, logits=logits)
    return logits.shape[-1]


def _float64_backend(backend, dtype):
    """float64 inputs run on the PyTorch twin (float64 math); the Triton kernels compute in float32."""
    if dtype != torch.float64 or backend == "torch":
        return backend
    require(backend == "auto", "float64 inputs are computed by the PyTorch twin only (float64 results): "
                               "use backend='torch' or 'auto', or cast the inputs to float32")
    return "torch"


def check_token_weights(token_weights, labels):
    """token_weights: None or a finite floating tensor shaped like labels, on labels' device."""
    if token_weights is None:
        return
    check_tensor("token_weights", token_weights, floating=True)
    require(token_weights.shape == labels.shape,
            f"token_weights must have the shape of labels {tuple(labels.shape)} (one weight per label), "
            f"got {tuple(token_weights.shape)}")
    check_same_device(labels=labels, token_weights=token_weights)
    require(bool(torch.isfinite(token_weights).all()), "token_weights must be finite (found NaN or inf)")


def weighted_segments(plan, token_weights, shift):
    """The plan with every sequence split into one segment per distinct token weight, and those weights.

    Segment k * S + s holds the scored tokens of sequence s whose weight is weights[k] (K distinct weights among
    the scored tokens). A weighted sum sum_t w_t log p_t is then sum_k weights[k] * (sum of segment k * S + s):
    the heads never see the weights. Costs K x S segment sums and one host sync (torch.unique); meant for a few
    distinct values (LD-DPO: 2). Returns (TokenTargets over K * S segments, weights [K] float64).
    """
    flat = token_weights.to(torch.float64).reshape(-1, token_weights.shape[-1])
    if shift:  # aligned with the shifted targets, as in token_targets
        flat = torch.cat([flat[:, 1:], torch.zeros_like(flat[:, :1])], dim=1)
    weights, klass = torch.unique(flat.reshape(-1)[plan.rows], return_inverse=True)
    segment_index = torch.full_like(plan.seq_index, -1)
    segment_index[plan.rows] = klass * plan.num_sequences + plan.seq_index[plan.rows]
    return plan._replace(seq_index=segment_index, num_sequences=max(1, weights.numel()) * plan.num_sequences), weights


def _combine_segments(values, weights, num_sequences):
    """[K * S] segment sums -> [S], weighted by `weights` [K] (None: a plain sum)."""
    blocks = values.reshape(-1, num_sequences)
    if weights is None or weights.numel() == 0:  # no scored token: all-zero sums
        return blocks.sum(0)
    return (blocks * weights.to(blocks.dtype)[:, None]).sum(0)


def compute_sequence_logps(logits=None, labels=None, seq_ids=None, *, hidden=None, weight=None, bias=None,
                           ignore_index=-100, shift=True, num_sequences=None, logit_scale=1.0, softcap=None,
                           temperature=1.0, backend="auto", check_finite=True, inplace_backward=False,
                           head_mode="auto", head_memory_budget=None, fp32_precision="ieee", plan=None,
                           token_weights=None):
    """`sequence_logps` plus the per-sequence logit sums (for TRL's logits/* metrics).

    The head options are validated always and used by the fused form only (the public entry points refuse
    them for logits input). `plan` reuses the TokenTargets of an earlier call on the same labels (the
    reference model scores the policy's tokens). `token_weights` (shape of labels) weights each token's
    log-prob in its sequence's sum (the logit sums and n_tokens stay unweighted). Returns (logps [S],
    n_tokens [S] int64, logit_sums [S], plan); logps and logit_sums are float32 (float64 for float64 inputs).
    """
    require(labels is not None, "labels is required")
    check_tensor("labels", labels, dtypes=INDEX_DTYPES)
    check_int("ignore_index", ignore_index)
    for name, flag in (("shift", shift), ("check_finite", check_finite), ("inplace_backward", inplace_backward)):
        check_bool(name, flag)
    check_transforms(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    check_choice("backend", backend, BACKENDS)
    head_options = dict(head_mode=head_mode, head_memory_budget=head_memory_budget, fp32_precision=fp32_precision)
    check_head_options(**head_options)
    fused = hidden is not None or weight is not None
    require(fused != (logits is not None), "pass either logits, or hidden and weight (the fused LM-head form), "
                                           "not both")
    if fused:
        vocab_size = _check_fused_inputs(hidden, weight, bias, labels)
        require(not inplace_backward, "inplace_backward=True applies to the logits form only (the fused form "
                                      "never stores logits)")
    else:
        require(bias is None, "bias applies to the fused form (hidden, weight) only, not to logits")
        vocab_size = _check_logits_input(logits, labels)
    require(not 0 <= ignore_index < vocab_size,
            f"ignore_index must lie outside the vocabulary [0, {vocab_size}) so that it cannot be mistaken for a "
            f"token id, got {ignore_index}")
    inputs = hidden if fused else logits
    backend = _float64_backend(backend, inputs.dtype)
    if plan is None:
        plan = token_targets(labels, seq_ids, vocab_size=vocab_size, ignore_index=ignore_index, shift=shift,
                             num_sequences=num_sequences)
    require(plan.vocab_size == vocab_size,
            f"the reference vocabulary ({vocab_size}) differs from the policy's ({plan.vocab_size})")
    transforms = dict(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    check_token_weights(token_weights, labels)
    segments, segment_weights = (plan, None) if token_weights is None else weighted_segments(plan, token_weights,
                                                                                             shift)
    if fused:
        head = vocab_parallel_sequence_logps if is_vocab_sharded(weight) else linear_sequence_logps
        logps, logit_sums = head(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, *segments[:3], backend=backend, rows=segments.rows,
            **transforms, **head_options)
    else:
        flat = logits.reshape(-1, vocab_size)
        if flat.stride(1) != 1:
            flat = flat.contiguous()
        logps, logit_sums = logits_sequence_logps(flat, *segments[:3], backend=backend,
                                                  inplace_backward=inplace_backward, **transforms)
    if token_weights is not None:
        logps = _combine_segments(logps, segment_weights, plan.num_sequences)
        logit_sums = _combine_segments(logit_sums, None, plan.num_sequences)
    if check_finite:
        check_finite_logps({"hidden/weight" if fused else "logits": logps})
    return logps, plan.n_tokens, logit_sums, plan


def sequence_logps(logits=None, labels=None, seq_ids=None, *, hidden=None, weight=None, bias=None,
                   ignore_index=-100, shift=True, num_sequences=None, logit_scale=1.0, softcap=None,
                   temperature=1.0, backend="auto", check_finite=True, inplace_backward=False, head_mode="auto",
                   head_memory_budget=None, fp32_precision="ieee", token_weights=None):
    """Summed log-probability of each sequence's target tokens.

    Logits form: logits [R, T, V] (fp32/bf16/fp16/fp64) with labels [R, T] (or [T, V] with [T]).
    Fused form: hidden [R, T, D], weight [V, D], bias [V] | None: the LM head is applied tile by tile and
    the logits z = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature are kept within
    head_memory_budget bytes (None = library default) as head_mode says ("auto", "stored", "recompute",
    "fused": see fastdpo.head); fp32_precision "ieee" (exact fp32 products) or "tf32" (TF32 allowed on GPU).
    The logits form scores z = softcap(logit_scale * logits) / temperature.
    labels are Hugging Face style: with shift=True the logits at t are scored against labels[..., t + 1];
    ignore_index (outside [0, V)) marks tokens with no target. Without seq_ids each row is one sequence
    (num_sequences, if given, must equal R); seq_ids (shape of labels, -1 = none) lets one row hold several
    sequences, numbered [0, num_sequences). Returns SequenceLogps(logps [S] float32, or float64 for float64
    inputs, n_tokens [S] int64). A sequence with no scored token has logps 0 and n_tokens 0.
    check_finite raises FloatingPointError when a result is NaN/inf (a NaN/+inf logit in a scored row, or
    -inf at a target); inplace_backward writes grad_logits into the logits buffer (logits form only).
    token_weights (floating, shape of labels, aligned with labels) makes each sum weighted,
    sum_t token_weights[t] * log p(labels[t]), e.g. LD-DPO's down-weighted tail; n_tokens still counts every
    scored token. Few distinct weight values are cheap (each is a segment of the sums).
    """
    head_options = dict(head_mode=head_mode, head_memory_budget=head_memory_budget, fp32_precision=fp32_precision)
    if logits is not None:
        refuse_head_options_without_head(head_options)
    logps, n_tokens, _, _ = compute_sequence_logps(
        logits, labels, seq_ids, hidden=hidden, weight=weight, bias=bias, ignore_index=ignore_index,
        shift=shift, num_sequences=num_sequences, logit_scale=logit_scale, softcap=softcap,
        temperature=temperature, backend=backend, check_finite=check_finite,
        inplace_backward=inplace_backward, token_weights=token_weights, **head_options)
    return SequenceLogps(logps, n_tokens)
