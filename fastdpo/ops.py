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
from typing import Optional

import torch

from . import torch_ops
from .head import Products, check_head_options, make_head

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


# The LM head as a torch.library custom op: opaque to torch.compile (no graph break inside, whatever the backend
# does on the host), with fake implementations for tracing and autograd registered on the op. Its configuration
# travels as plain arguments; `_head` rebuilds the head object from them (cheap: no tensor work).
HeadConfig = tuple  # (backend, head_mode, head_memory_budget (0 = default), fp32_precision, logit_scale, softcap
#                      (0.0 = none), temperature)


def _head(config, weight, num_rows, needs_grad):
    backend, head_mode, budget, fp32_precision, logit_scale, softcap, temperature = config
    transforms = dict(logit_scale=logit_scale, softcap=softcap or None, temperature=temperature)
    return make_head(resolve_backend(backend, weight.device), head_mode=head_mode, head_memory_budget=budget or None,
                     weight=weight, num_rows=num_rows, transforms=transforms, fp32_precision=fp32_precision,
                     needs_grad=needs_grad)


@torch.library.custom_op("fastdpo::head_forward", mutates_args=())
def _head_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: torch.Tensor,
                  targets: torch.Tensor, seq_of_rows: torch.Tensor, num_sequences: int, backend: str, head_mode: str,
                  budget: int, fp32_precision: str, logit_scale: float, softcap: float, temperature: float,
                  keep: bool, token_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (per-sequence sums [K, S]: log-prob, logit sum (+ entropy, top-1 hits with token_stats), saved for
    backward: U [M, V], stats [2, M] or empty)."""
    config = (backend, head_mode, budget, fp32_precision, logit_scale, softcap, temperature)
    head = _head(config, weight, rows.numel(), keep)
    with _no_autocast(hidden.device):
        row_logp, logit_sum, saved, metrics = head.forward(hidden, weight, bias, rows, targets, keep=keep,
                                                           token_stats=token_stats)
        sums = head.impl.segment_sum(torch.stack(_row_values(row_logp, logit_sum, metrics)), seq_of_rows,
                                     num_sequences)
    return sums, saved[0] if saved else row_logp.new_empty(0)


@_head_forward.register_fake
def _(hidden, weight, bias, rows, targets, seq_of_rows, num_sequences, backend, head_mode, budget, fp32_precision,
      logit_scale, softcap, temperature, keep, token_stats):
    M = rows.shape[0]
    head = _head((backend, head_mode, budget, fp32_precision, logit_scale, softcap, temperature), weight, M, keep)
    math = torch.float64 if weight.dtype == torch.float64 else torch.float32
    sums = hidden.new_empty(4 if token_stats else 2, num_sequences, dtype=math)
    if not keep:
        return sums, sums.new_empty(0)
    if getattr(head, "store", False):
        return sums, Products(weight, head.impl).buffer(M, hidden.dtype)  # U in the real op's layout
    return sums, sums.new_empty(2, M)


@torch.library.custom_op("fastdpo::head_backward", mutates_args=())
def _head_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: torch.Tensor,
                   targets: torch.Tensor, saved: torch.Tensor, grad_rows: torch.Tensor, backend: str, head_mode: str,
                   budget: int, fp32_precision: str, logit_scale: float, softcap: float, temperature: float,
                   needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_hidden, grad_weight, grad_bias), an empty tensor for each one not needed."""
    config = (backend, head_mode, budget, fp32_precision, logit_scale, softcap, temperature)
    head = _head(config, weight, rows.numel(), True)
    with _no_autocast(hidden.device):
        grads = head.backward(hidden, weight, bias, rows, targets, (saved,), grad_rows, needs=needs)
    return tuple(hidden.new_empty(0) if grad is None else grad for grad in grads)


@_head_backward.register_fake
def _(hidden, weight, bias, rows, targets, saved, grad_rows, backend, head_mode, budget, fp32_precision,
      logit_scale, softcap, temperature, needs):
    like = (hidden, weight, bias if bias is not None else weight.new_empty(0))
    return tuple(torch.empty_like(t) if need and t.numel() else hidden.new_empty(0) for t, need in zip(like, needs))


def _head_setup_context(ctx, inputs, output):
    hidden, weight, bias, rows, targets, seq_of_rows, num_sequences, *config, keep, token_stats = inputs
    ctx.save_for_backward(hidden, weight, bias, rows, targets, seq_of_rows, output[1])
    ctx.config = config
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the saved output (it can be [M, V])


def _head_autograd_backward(ctx, grad_sums, _):
    hidden, weight, bias, rows, targets, seq_of_rows, saved = ctx.saved_tensors
    if grad_sums is None:  # a vector-Jacobian product that does not reach the sums (e.g. gradcheck's)
        return (None,) * 16
    needs = [bool(flag) for flag in ctx.needs_input_grad[:3]]
    needs[2] = needs[2] and bias is not None
    grad_rows = _rows_gradient(grad_sums[0], seq_of_rows, grad_sums.dtype)
    grads = _head_backward(hidden, weight, bias, rows, targets, saved, grad_rows, *ctx.config, needs)
    return (*(grad if need else None for grad, need in zip(grads, needs)),) + (None,) * 13


_head_forward.register_autograd(_head_autograd_backward, setup_context=_head_setup_context)


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
    if rows is None:
        rows = torch.nonzero(seq_index >= 0).squeeze(1)
    row_targets, seq_of_rows = targets[rows].contiguous(), seq_index[rows].contiguous()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    check_head_options(head_mode, head_memory_budget, fp32_precision)  # head_memory_budget None travels as 0
    sums, _ = _head_forward(hidden, weight, bias, rows, row_targets, seq_of_rows, num_sequences, backend, head_mode,
                            head_memory_budget or 0, fp32_precision, float(logit_scale), float(softcap or 0.0),
                            float(temperature), needs_grad, token_stats)
    return tuple(sums.unbind(0))
