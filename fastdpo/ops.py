"""Autograd ops over the kernels, with backend dispatch.

Two ops, one per input form, each mapping tokens to per-sequence sums:
  logits_sequence_logps(logits [N, V], targets [N], seq_index [N], S)
  linear_sequence_logps(hidden [N, D], weight [V, D], bias [V] | None, targets [N], seq_index [N], S)
both -> (logps [S] fp32, logit_sums [S] fp32). targets are -1 and seq_index is -1 where a token has no
target. The backend is a module with the launcher functions: `fastdpo.kernels` (Triton) or
`fastdpo.torch_ops` (PyTorch). Without grad (the reference model) the launchers are called directly and
nothing is saved for backward.
"""
import torch

from . import torch_ops

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend, device):
    """The launcher module for `backend` ("auto" = Triton on CUDA tensors, PyTorch elsewhere)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return torch_ops
    from . import kernels  # imports triton; the PyTorch backend never needs it

    return kernels


def _sequence_sums(impl, row_logps, logit_sum, seq_index, num_sequences):
    sums = impl.segment_sum(torch.stack([row_logps, logit_sum]), seq_index, num_sequences)
    return sums[0], sums[1]


def _rows_gradient(grad_logps, seq_index, dtype):
    """Per-token upstream gradient: grad_logps[seq_index], 0 where seq_index is -1."""
    return torch.where(seq_index >= 0, grad_logps.to(dtype)[seq_index.clamp(min=0)], 0.0).contiguous()


class _LogitsSequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, seq_index, num_sequences, impl, inplace_backward):
        target_logit, lse, logit_sum = impl.row_logps_forward(logits, targets)
        logps, logit_sums = _sequence_sums(impl, target_logit - lse, logit_sum, seq_index, num_sequences)
        ctx.save_for_backward(logits, targets, seq_index, lse)
        ctx.impl, ctx.inplace_backward = impl, inplace_backward
        ctx.mark_non_differentiable(logit_sums)
        return logps, logit_sums

    @staticmethod
    def backward(ctx, grad_logps, _):
        logits, targets, seq_index, lse = ctx.saved_tensors
        grad_rows = _rows_gradient(grad_logps, seq_index, lse.dtype)
        out = logits if ctx.inplace_backward else None
        grad_logits = ctx.impl.row_logps_backward(logits, targets, lse, grad_rows, out=out)
        return grad_logits, None, None, None, None, None


def logits_sequence_logps(logits, targets, seq_index, num_sequences, *, backend="auto",
                          inplace_backward=False):
    """Per-sequence log-prob sums from logits [N, V] -> (logps [S], logit_sums [S]) fp32."""
    impl = resolve_backend(backend, logits.device)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _LogitsSequenceLogps.apply(logits, targets, seq_index, num_sequences, impl, inplace_backward)
    target_logit, lse, logit_sum = impl.row_logps_forward(logits.detach(), targets)
    return _sequence_sums(impl, target_logit - lse, logit_sum, seq_index, num_sequences)


class _LinearSequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, seq_of_rows, num_sequences, impl, transforms):
        target_logit, lse, logit_sum = impl.linear_logps_forward(hidden, weight, bias, rows, targets,
                                                                 **transforms)
        logps, logit_sums = _sequence_sums(impl, target_logit - lse, logit_sum, seq_of_rows, num_sequences)
        ctx.save_for_backward(hidden, weight, bias, rows, targets, seq_of_rows, lse)
        ctx.impl, ctx.transforms = impl, transforms
        ctx.mark_non_differentiable(logit_sums)
        return logps, logit_sums

    @staticmethod
    def backward(ctx, grad_logps, _):
        hidden, weight, bias, rows, targets, seq_of_rows, lse = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = ctx.impl.linear_logps_backward(
            hidden, weight, bias, rows, targets, lse, _rows_gradient(grad_logps, seq_of_rows, lse.dtype),
            needs_hidden_grad=ctx.needs_input_grad[0], needs_weight_grad=ctx.needs_input_grad[1],
            needs_bias_grad=ctx.needs_input_grad[2], **ctx.transforms)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def linear_sequence_logps(hidden, weight, bias, targets, seq_index, num_sequences, *, backend="auto",
                          logit_scale=1.0, softcap=None, temperature=1.0):
    """Per-sequence log-prob sums through the LM head, logits never materialised.

    hidden [N, D], weight [V, D], bias [V] | None -> (logps [S], logit_sums [S]) fp32. Only tokens with
    a target are processed (the index of those rows is built here: one host sync).
    """
    impl = resolve_backend(backend, hidden.device)
    rows = torch.nonzero(seq_index >= 0).squeeze(1)
    row_targets, seq_of_rows = targets[rows].contiguous(), seq_index[rows].contiguous()
    transforms = dict(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    needs_grad = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if torch.is_grad_enabled() and needs_grad:
        return _LinearSequenceLogps.apply(hidden, weight, bias, rows, row_targets, seq_of_rows,
                                          num_sequences, impl, transforms)
    with torch.no_grad():
        target_logit, lse, logit_sum = impl.linear_logps_forward(hidden, weight, bias, rows, row_targets,
                                                                 **transforms)
    return _sequence_sums(impl, target_logit - lse, logit_sum, seq_of_rows, num_sequences)
