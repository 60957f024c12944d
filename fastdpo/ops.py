"""Autograd ops over the kernels, with backend dispatch.

Two ops, one per input form, each mapping tokens to per-sequence sums:
  logits_sequence_logps(logits [N, V], targets [N], seq_index [N], S)
  linear_sequence_logps(hidden [N, D], weight [V, D], bias [V] | None, targets [N], seq_index [N], S)
both -> (logps [S] fp32, logit_sums [S] fp32); with token_stats=True the fused form also returns the
per-sequence sums of the token entropies and of the top-1 hits (from the same row pass: no extra GEMM). targets are -1 and seq_index is -1 where a token has no
target. The backend is a module with the launcher functions: `fastdpo.kernels` (Triton) or
`fastdpo.torch_ops` (PyTorch). The LM head of the second form runs in one of the head modes of
`fastdpo.head`. Without grad (the reference model) nothing is saved for backward. Autocast is disabled
inside the ops: they compute in the input dtypes (fp32 math for the row reductions).
"""
import torch

from . import torch_ops
from .head import make_head

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend, device):
    """The launcher module for `backend` ("auto" = Triton on CUDA tensors, PyTorch elsewhere)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return torch_ops
    from . import kernels  # imports triton; the PyTorch backend never needs it

    return kernels


def _no_autocast(device):
    return torch.autocast(device.type, enabled=False)


def _sequence_sums(impl, rows, seq_index, num_sequences):
    """[C] per-row values (a list) -> a tuple of C per-sequence sums [S]."""
    return tuple(impl.segment_sum(torch.stack(rows), seq_index, num_sequences).unbind(0))


def _rows_gradient(grad_logps, seq_index, dtype):
    """Per-token upstream gradient: grad_logps[seq_index], 0 where seq_index is -1."""
    return torch.where(seq_index >= 0, grad_logps.to(dtype)[seq_index.clamp(min=0)], 0.0).contiguous()


class _LogitsSequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, seq_index, num_sequences, impl, inplace_backward, transforms):
        row_logp, stats, logit_sum = impl.row_logps_forward(logits, targets, **transforms)
        logps, logit_sums = _sequence_sums(impl, [row_logp, logit_sum], seq_index, num_sequences)
        ctx.save_for_backward(logits, targets, seq_index, stats)
        ctx.impl, ctx.inplace_backward, ctx.transforms = impl, inplace_backward, transforms
        ctx.mark_non_differentiable(logit_sums)
        return logps, logit_sums

    @staticmethod
    def backward(ctx, grad_logps, _):
        logits, targets, seq_index, stats = ctx.saved_tensors
        grad_rows = _rows_gradient(grad_logps, seq_index, stats.dtype)
        out = logits if ctx.inplace_backward else None
        with _no_autocast(logits.device):
            grad_logits = ctx.impl.row_logps_backward(logits, targets, stats, grad_rows, out=out, **ctx.transforms)
        return grad_logits, None, None, None, None, None, None


def logits_sequence_logps(logits, targets, seq_index, num_sequences, *, backend="auto",
                          inplace_backward=False, logit_scale=1.0, softcap=None, temperature=1.0):
    """Per-sequence log-prob sums from raw logits [N, V] -> (logps [S], logit_sums [S]) fp32.

    The scored logits are z = softcap(logit_scale * logits) / temperature.
    """
    impl = resolve_backend(backend, logits.device)
    transforms = dict(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    with _no_autocast(logits.device):
        if torch.is_grad_enabled() and logits.requires_grad:
            return _LogitsSequenceLogps.apply(logits, targets, seq_index, num_sequences, impl, inplace_backward,
                                              transforms)
        row_logp, _, logit_sum = impl.row_logps_forward(logits.detach(), targets, **transforms)
        return _sequence_sums(impl, [row_logp, logit_sum], seq_index, num_sequences)


class _LinearSequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, seq_of_rows, num_sequences, head, token_stats):
        row_logp, logit_sum, saved, metrics = head.forward(hidden, weight, bias, rows, targets, keep=True,
                                                           token_stats=token_stats)
        sums = _sequence_sums(head.impl, _row_values(row_logp, logit_sum, metrics), seq_of_rows, num_sequences)
        ctx.save_for_backward(hidden, weight, bias, rows, targets, seq_of_rows, *saved)
        ctx.head, ctx.grad_dtype = head, row_logp.dtype
        ctx.mark_non_differentiable(*sums[1:])
        return sums

    @staticmethod
    def backward(ctx, grad_logps, *_):
        hidden, weight, bias, rows, targets, seq_of_rows, *saved = ctx.saved_tensors
        grad_rows = _rows_gradient(grad_logps, seq_of_rows, ctx.grad_dtype)
        with _no_autocast(hidden.device):
            grads = ctx.head.backward(hidden, weight, bias, rows, targets, saved, grad_rows,
                                      needs=ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None, None)


def _row_values(row_logp, logit_sum, metrics):
    """The per-row values summed per sequence: log-prob, logit sum (+ entropy, top-1 hit as a float)."""
    if metrics is None:
        return [row_logp, logit_sum]
    entropy, top1 = metrics
    return [row_logp, logit_sum, entropy, top1.to(row_logp.dtype)]


def linear_sequence_logps(hidden, weight, bias, targets, seq_index, num_sequences, *, backend="auto",
                          logit_scale=1.0, softcap=None, temperature=1.0, head_mode="auto",
                          head_memory_budget=None, fp32_precision="ieee", rows=None, token_stats=False):
    """Per-sequence log-prob sums through the LM head.

    hidden [N, D], weight [V, D], bias [V] | None -> (logps [S], logit_sums [S]) fp32, for the logits
    z = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature. Only tokens with a target are
    processed: `rows` [M] int64 is their index (None: built here, one host sync). head_mode,
    head_memory_budget: see `fastdpo.head`; fp32_precision: "ieee" (exact fp32 products) or "tf32".
    token_stats=True adds (entropy_sums [S], top1_hits [S]): per-sequence sums of the token entropies
    -sum_v p_v log p_v and of [argmax_v z_v == target], from the forward's row pass (not differentiable).
    """
    impl = resolve_backend(backend, hidden.device)
    if rows is None:
        rows = torch.nonzero(seq_index >= 0).squeeze(1)
    row_targets, seq_of_rows = targets[rows].contiguous(), seq_index[rows].contiguous()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    head = make_head(impl, head_mode=head_mode, head_memory_budget=head_memory_budget, weight=weight,
                     num_rows=rows.numel(), fp32_precision=fp32_precision, needs_grad=needs_grad,
                     transforms=dict(logit_scale=logit_scale, softcap=softcap, temperature=temperature))
    with _no_autocast(hidden.device):
        if needs_grad:
            return _LinearSequenceLogps.apply(hidden, weight, bias, rows, row_targets, seq_of_rows,
                                              num_sequences, head, token_stats)
        with torch.no_grad():
            row_logp, logit_sum, _, metrics = head.forward(hidden, weight, bias, rows, row_targets, keep=False,
                                                           token_stats=token_stats)
        return _sequence_sums(impl, _row_values(row_logp, logit_sum, metrics), seq_of_rows, num_sequences)
