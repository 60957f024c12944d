"""Per-token log-probabilities from materialised logits: one read forward, one read + one write backward.

Logits are transformed in the kernel: z = softcap(logit_scale * x) / temperature (kernels/transforms.py).
Forward, one program per row of logits [N, V]: an online log-sum-exp over BLOCK_V-wide vocabulary
blocks (fp32 math) that tracks the row's exact maximum m, so that
row_logp = (z_t - m) - log(sum_v exp(z_v - m)) never cancels at large logits; also lse and the row's
sum of z. Rows without a target (prompt, padding) read nothing. With WRITE_GRAD a second pass over the
row (still hot in L2) overwrites it with U = (onehot(target) - softmax(z)) * dz/dx.
Backward, one program per row: grad = g * (onehot(target) - softmax(z)) * dz/dx, written in the
logits' dtype, optionally into the logits buffer itself.
Row offsets are int64 (row * stride), so buffers past 2^31 elements are addressed correctly.
"""
import torch
import triton
import triton.language as tl

from .transforms import transform_scalars, transformed_logits, transformed_logits_and_slope

MAX_BLOCK_V = 4096
NUM_WARPS = 8
LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _row_logps_fwd_kernel(
    logits_ptr, stride_logits, targets_ptr, row_logp_ptr, lse_ptr, logit_sum_ptr, V,
    logit_scale, softcap, inv_temp,
    HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    active = target >= 0
    n_read = tl.where(active, V, 0)  # rows without a target read nothing
    row_ptr = logits_ptr + row * stride_logits
    offsets = tl.arange(0, BLOCK_V)

    running_max = -float("inf")
    sum_exp = tl.zeros([BLOCK_V], dtype=tl.float32)  # per lane, rescaled to running_max
    logit_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    target_z = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, n_read, BLOCK_V):
        cols = start + offsets
        in_vocab = cols < V
        x = tl.load(row_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
        z = tl.where(in_vocab, transformed_logits(x, logit_scale, softcap, inv_temp, HAS_SOFTCAP), -float("inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)  # a row of -inf so far stays exact
        sum_exp = sum_exp * tl.exp(running_max - shift) + tl.exp(z - shift)
        logit_sum += tl.where(in_vocab, z, 0.0)
        target_z += tl.where(cols == target, z, 0.0)
        running_max = new_max

    shift = tl.where(running_max == -float("inf"), 0.0, running_max)
    log_sum_exp = tl.log(tl.where(active, tl.sum(sum_exp, axis=0), 1.0))
    row_logp = (tl.sum(target_z, axis=0) - shift) - log_sum_exp
    tl.store(row_logp_ptr + row, tl.where(active, row_logp, 0.0))
    tl.store(lse_ptr + row, tl.where(active, shift + log_sum_exp, 0.0))
    tl.store(logit_sum_ptr + row, tl.where(active, tl.sum(logit_sum, axis=0), 0.0))

    if WRITE_GRAD:  # U = d row_logp / d x, in place; rows without a target become 0
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            in_vocab = cols < V
            x = tl.load(row_ptr + cols, mask=cols < n_read, other=0.0).to(tl.float32)
            z, slope = transformed_logits_and_slope(x, logit_scale, softcap, inv_temp, HAS_SOFTCAP)
            # (z - shift) - log_sum_exp rather than z - lse: exact at large logits
            u = (tl.where(cols == target, 1.0, 0.0) - tl.exp((z - shift) - log_sum_exp)) * slope
            tl.store(row_ptr + cols, tl.where(active, u, 0.0).to(logits_ptr.dtype.element_ty), mask=in_vocab)


@triton.jit
def _row_logps_bwd_kernel(
    logits_ptr, stride_logits, grad_ptr, stride_grad, targets_ptr, lse_ptr, grad_rows_ptr, V,
    logit_scale, softcap, inv_temp,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    g = tl.load(grad_rows_ptr + row)
    active = (target >= 0) & (g != 0.0)  # NaN != 0: a NaN upstream gradient propagates
    n_read = tl.where(active, V, 0)  # inactive rows read nothing and write zeros
    lse = tl.load(lse_ptr + row)
    logits_row = logits_ptr + row * stride_logits
    grad_row = grad_ptr + row * stride_grad
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        in_vocab = cols < V
        x = tl.load(logits_row + cols, mask=cols < n_read, other=0.0).to(tl.float32)
        z, slope = transformed_logits_and_slope(x, logit_scale, softcap, inv_temp, HAS_SOFTCAP)
        grad = g * (tl.where(cols == target, 1.0, 0.0) - tl.exp(z - lse)) * slope
        tl.store(grad_row + cols, tl.where(active, grad, 0.0).to(grad_ptr.dtype.element_ty), mask=in_vocab)


def _block_v(V):
    return min(triton.next_power_of_2(V), MAX_BLOCK_V)


def _check_rows(logits, targets, name="logits"):
    if logits.dim() != 2 or logits.dtype not in LOGITS_DTYPES:
        raise ValueError(f"{name} must be a 2-D float32/bfloat16/float16 tensor, got {tuple(logits.shape)} "
                         f"{logits.dtype}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"{name} must have a unit stride along the vocabulary, got strides {logits.stride()}")
    if targets.shape != logits.shape[:1] or targets.dtype != torch.int64 or targets.device != logits.device:
        raise ValueError(f"targets must be an int64 [{logits.shape[0]}] tensor on {logits.device}, got "
                         f"{targets.dtype} {tuple(targets.shape)} on {targets.device}")


def row_logps_forward(logits, targets, *, logit_scale=1.0, softcap=None, temperature=1.0, write_grad=False):
    """Per-row log-prob of the target under z = softcap(logit_scale * logits) / temperature.

    logits [N, V] fp32/bf16/fp16 (unit vocabulary stride, any row stride), targets [N] int64 in [0, V)
    or -1 (no target). Returns (row_logp, lse, logit_sum), each [N] fp32: (z_t - m) - log sum exp(z - m)
    with m the row max, m + log sum exp(z - m), and sum_v z; all 0 for rows without a target.
    write_grad=True then overwrites `logits` in place with U = (onehot - softmax(z)) * dz/dx (0 for rows
    without a target), in the logits' dtype.
    """
    _check_rows(logits, targets)
    scalars = transform_scalars(logit_scale, softcap, temperature)
    N, V = logits.shape
    row_logp, lse, logit_sum = (torch.empty(N, device=logits.device, dtype=torch.float32) for _ in range(3))
    if N:
        _row_logps_fwd_kernel[(N,)](
            logits, logits.stride(0), targets.contiguous(), row_logp, lse, logit_sum, V, *scalars,
            HAS_SOFTCAP=softcap is not None, WRITE_GRAD=bool(write_grad), BLOCK_V=_block_v(V),
            num_warps=NUM_WARPS,
        )
    return row_logp, lse, logit_sum


def row_logps_backward(logits, targets, lse, grad_rows, *, out=None, logit_scale=1.0, softcap=None,
                       temperature=1.0):
    """grad [N, V] in the logits' dtype: grad_rows[n] * (onehot(targets[n]) - softmax(z[n])) * dz/dx.

    lse, grad_rows [N] fp32 (lse from row_logps_forward with the same transforms). Rows without a target
    or with grad_rows exactly 0 get zeros; NaN/inf in grad_rows propagate. `out` may be `logits` itself
    (in place: each block is read before it is written). softmax = exp(z - lse), so its relative error
    is ~|lse| * 2^-24 (6e-4 at logits near 1e4; write_grad does not have this limit).
    """
    _check_rows(logits, targets)
    scalars = transform_scalars(logit_scale, softcap, temperature)
    N, V = logits.shape
    for name, t in (("lse", lse), ("grad_rows", grad_rows)):
        if t.shape != (N,) or t.dtype != torch.float32 or t.device != logits.device:
            raise ValueError(f"{name} must be a float32 [{N}] tensor on {logits.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    grad = torch.empty_like(logits) if out is None else out
    if out is not None:
        _check_rows(out, targets, name="out")
        if out.shape != logits.shape or out.dtype != logits.dtype:
            raise ValueError(f"out must match logits ({tuple(logits.shape)} {logits.dtype}), got "
                             f"{tuple(out.shape)} {out.dtype}")
    if N:
        _row_logps_bwd_kernel[(N,)](
            logits, logits.stride(0), grad, grad.stride(0), targets.contiguous(), lse.contiguous(),
            grad_rows.contiguous(), V, *scalars, HAS_SOFTCAP=softcap is not None, BLOCK_V=_block_v(V),
            num_warps=NUM_WARPS,
        )
    return grad


def _aot_specs():
    """Every compiled variant: fp32 / bf16 logits, with and without softcap, forward with and without
    write_grad, at BLOCK_V = MAX_BLOCK_V and the JIT's specialisation for aligned rows (V % 16 == 0:
    32000, 128256, 151936, 262144, ...)."""
    scalars = {"logit_scale": "fp32", "softcap": "fp32", "inv_temp": "fp32"}
    specs = []
    for dtype in ("fp32", "bf16"):
        for softcap in (False, True):
            tag = f"{dtype}{',softcap' if softcap else ''}"
            for write_grad in (False, True):
                specs.append(dict(
                    name=f"row_logps_fwd[{tag}{',write_grad' if write_grad else ''}]", fn=_row_logps_fwd_kernel,
                    signature={"logits_ptr": f"*{dtype}", "stride_logits": "i64", "targets_ptr": "*i64",
                               "row_logp_ptr": "*fp32", "lse_ptr": "*fp32", "logit_sum_ptr": "*fp32", "V": "i32",
                               **scalars, "HAS_SOFTCAP": "constexpr", "WRITE_GRAD": "constexpr",
                               "BLOCK_V": "constexpr"},
                    constexprs={"HAS_SOFTCAP": softcap, "WRITE_GRAD": write_grad, "BLOCK_V": MAX_BLOCK_V},
                    divisible=("logits_ptr", "stride_logits", "V"), num_warps=NUM_WARPS, num_stages=3))
            specs.append(dict(
                name=f"row_logps_bwd[{tag}]", fn=_row_logps_bwd_kernel,
                signature={"logits_ptr": f"*{dtype}", "stride_logits": "i64", "grad_ptr": f"*{dtype}",
                           "stride_grad": "i64", "targets_ptr": "*i64", "lse_ptr": "*fp32",
                           "grad_rows_ptr": "*fp32", "V": "i32", **scalars, "HAS_SOFTCAP": "constexpr",
                           "BLOCK_V": "constexpr"},
                constexprs={"HAS_SOFTCAP": softcap, "BLOCK_V": MAX_BLOCK_V},
                divisible=("logits_ptr", "stride_logits", "grad_ptr", "stride_grad", "V"),
                num_warps=NUM_WARPS, num_stages=3))
    return specs


AOT_SPECS = _aot_specs()
