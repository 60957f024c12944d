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
NUM_WARPS_WRITE_GRAD = 16  # the write_grad pass holds more per thread: 8 warps spill on sm_80 (0 with 16)
LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _row_logps_fwd_kernel(
    logits_ptr, stride_logits, grad_ptr, stride_grad, targets_ptr, row_logp_ptr, stats_ptr, logit_sum_ptr,
    entropy_ptr, top1_ptr, N, V, logit_scale, softcap, inv_temp,
    HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, TOKEN_STATS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    active = target >= 0
    n_read = tl.where(active, V, 0)  # rows without a target read nothing
    row_ptr = logits_ptr + row * stride_logits
    offsets = tl.arange(0, BLOCK_V)

    running_max = -float("inf")
    sum_exp = tl.zeros([BLOCK_V], dtype=tl.float32)  # per lane, rescaled to running_max
    centred_sum = tl.zeros([BLOCK_V], dtype=tl.float32)  # per lane, sum exp(z - running_max) (z - running_max)
    logit_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    target_z = tl.zeros([BLOCK_V], dtype=tl.float32)
    best = 0  # first column of the row max (TOKEN_STATS)
    for start in range(0, n_read, BLOCK_V):
        cols = start + offsets
        in_vocab = cols < V
        x = tl.load(row_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
        z = tl.where(in_vocab, transformed_logits(x, logit_scale, softcap, inv_temp, HAS_SOFTCAP), -float("inf"))
        block_max = tl.max(z, axis=0)
        new_max = tl.maximum(running_max, block_max)
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)  # a row of -inf so far stays exact
        rescale = tl.exp(running_max - shift)
        exp_z = tl.exp(z - shift)
        if TOKEN_STATS:  # entropy: sum exp(z - m) (z - m), moved to the new max like sum_exp
            moved = tl.where(running_max == -float("inf"), 0.0, running_max - shift)
            centred = tl.where(exp_z > 0.0, exp_z * (z - shift), 0.0)
            centred_sum = (centred_sum + sum_exp * moved) * rescale + centred
            best = tl.where(block_max > running_max, start + tl.argmax(z, axis=0), best)
        sum_exp = sum_exp * rescale + exp_z
        logit_sum += tl.where(in_vocab, z, 0.0)
        target_z += tl.where(cols == target, z, 0.0)
        running_max = new_max

    shift = tl.where(running_max == -float("inf"), 0.0, running_max)
    total_exp = tl.where(active, tl.sum(sum_exp, axis=0), 1.0)
    log_sum_exp = tl.log(total_exp)
    row_logp = (tl.sum(target_z, axis=0) - shift) - log_sum_exp
    tl.store(row_logp_ptr + row, tl.where(active, row_logp, 0.0))
    tl.store(stats_ptr + row, tl.where(active, shift, 0.0))
    tl.store(stats_ptr + N + row, tl.where(active, log_sum_exp, 0.0))
    tl.store(logit_sum_ptr + row, tl.where(active, tl.sum(logit_sum, axis=0), 0.0))
    if TOKEN_STATS:
        entropy = log_sum_exp - tl.sum(centred_sum, axis=0) / total_exp
        tl.store(entropy_ptr + row, tl.where(active, entropy, 0.0))
        tl.store(top1_ptr + row, active & (best == target))

    if WRITE_GRAD:  # U = d row_logp / d x into grad (may be logits itself); rows without a target become 0
        grad_row = grad_ptr + row * stride_grad
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            in_vocab = cols < V
            x = tl.load(row_ptr + cols, mask=cols < n_read, other=0.0).to(tl.float32)
            z, slope = transformed_logits_and_slope(x, logit_scale, softcap, inv_temp, HAS_SOFTCAP)
            # (z - shift) - log_sum_exp rather than z - lse: exact at large logits
            u = (tl.where(cols == target, 1.0, 0.0) - tl.exp((z - shift) - log_sum_exp)) * slope
            tl.store(grad_row + cols, tl.where(active, u, 0.0).to(grad_ptr.dtype.element_ty), mask=in_vocab)


@triton.jit
def _row_logps_bwd_kernel(
    logits_ptr, stride_logits, grad_ptr, stride_grad, targets_ptr, stats_ptr, grad_rows_ptr, N, V,
    logit_scale, softcap, inv_temp,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    g = tl.load(grad_rows_ptr + row)
    active = (target >= 0) & (g != 0.0)  # NaN != 0: a NaN upstream gradient propagates
    n_read = tl.where(active, V, 0)  # inactive rows read nothing and write zeros
    shift = tl.load(stats_ptr + row)
    log_sum_exp = tl.load(stats_ptr + N + row)
    logits_row = logits_ptr + row * stride_logits
    grad_row = grad_ptr + row * stride_grad
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        in_vocab = cols < V
        x = tl.load(logits_row + cols, mask=cols < n_read, other=0.0).to(tl.float32)
        z, slope = transformed_logits_and_slope(x, logit_scale, softcap, inv_temp, HAS_SOFTCAP)
        # (z - shift) - log_sum_exp rather than z - lse: no cancellation at large logits
        grad = g * (tl.where(cols == target, 1.0, 0.0) - tl.exp((z - shift) - log_sum_exp)) * slope
        tl.store(grad_row + cols, tl.where(active, grad, 0.0).to(grad_ptr.dtype.element_ty), mask=in_vocab)


def _fwd_warps(write_grad, token_stats):
    """Warps of the forward kernel: the variants that hold the most per thread get more warps (0 spills on sm_80
    and sm_90, scripts/compile_check.py)."""
    return NUM_WARPS_WRITE_GRAD if write_grad and not token_stats else NUM_WARPS


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


def _check_stats(stats, N, device):
    if stats.shape != (2, N) or stats.dtype != torch.float32 or stats.device != device:
        raise ValueError(f"stats must be a float32 [2, {N}] tensor (shift, log_sum_exp) from row_logps_forward on "
                         f"{device}, got {stats.dtype} {tuple(stats.shape)} on {stats.device}")


def _check_out(out, logits, targets, name, dtypes_must_match):
    _check_rows(out, targets, name=name)
    if out.shape != logits.shape or (dtypes_must_match and out.dtype != logits.dtype):
        raise ValueError(f"{name} must match logits ({tuple(logits.shape)}"
                         f"{' ' + str(logits.dtype) if dtypes_must_match else ''}), got {tuple(out.shape)} "
                         f"{out.dtype}")


def row_logps_forward(logits, targets, *, logit_scale=1.0, softcap=None, temperature=1.0, write_grad=False,
                      grad_out=None, token_stats=False, overwrite=False):
    """Per-row log-prob of the target under z = softcap(logit_scale * logits) / temperature.

    logits [N, V] fp32/bf16/fp16 (unit vocabulary stride, any row stride), targets [N] int64 in [0, V)
    or -1 (no target; the range is the caller's to check, as the ops layer does for labels). Returns
    (row_logp [N], stats [2, N], logit_sum [N]) fp32: (z_t - m) - log sum exp(z - m) with m the row max,
    stats = (m, log sum exp(z - m)) (lse = their sum; the backward's softmax uses both, without
    cancellation), and sum_v z; all 0 for rows without a target. token_stats=True adds (entropy [N] fp32,
    top1 [N] bool: argmax_v z_v == target, first maximum) from the same pass. write_grad=True then writes
    U = (onehot - softmax(z)) * dz/dx (0 for rows without a target) into grad_out [N, V] (any of the three
    dtypes; default `logits` itself). overwrite is accepted for the twin's signature (the kernel needs no
    scratch).
    """
    _check_rows(logits, targets)
    grad = logits if grad_out is None else grad_out
    if grad_out is not None:
        _check_out(grad_out, logits, targets, "grad_out", dtypes_must_match=False)
    scalars = transform_scalars(logit_scale, softcap, temperature)
    N, V = logits.shape
    row_logp, logit_sum, entropy = (torch.empty(N, device=logits.device, dtype=torch.float32) for _ in range(3))
    stats = torch.empty(2, N, device=logits.device, dtype=torch.float32)
    top1 = torch.empty(N, device=logits.device, dtype=torch.bool)
    if N:
        _row_logps_fwd_kernel[(N,)](
            logits, logits.stride(0), grad, grad.stride(0), targets.contiguous(), row_logp, stats, logit_sum,
            entropy, top1, N, V, *scalars, HAS_SOFTCAP=softcap is not None, WRITE_GRAD=bool(write_grad),
            TOKEN_STATS=bool(token_stats), BLOCK_V=_block_v(V), num_warps=_fwd_warps(write_grad, token_stats),
        )
    return (row_logp, stats, logit_sum, entropy, top1) if token_stats else (row_logp, stats, logit_sum)


def row_logps_backward(logits, targets, stats, grad_rows, *, out=None, logit_scale=1.0, softcap=None,
                       temperature=1.0, overwrite=False):
    """grad [N, V] in out's dtype (default the logits'): grad_rows[n] * (onehot(targets[n]) - softmax(z[n])) * dz/dx.

    stats [2, N] fp32 from row_logps_forward with the same transforms; grad_rows [N] fp32. The softmax is
    exp((z - m) - log sum exp(z - m)): exact at large logits. Rows without a target or with grad_rows
    exactly 0 get zeros; NaN/inf in grad_rows propagate. `out` [N, V] may be `logits` itself (in place:
    each block is read before it is written) or another dtype. overwrite: as in row_logps_forward.
    """
    _check_rows(logits, targets)
    scalars = transform_scalars(logit_scale, softcap, temperature)
    N, V = logits.shape
    _check_stats(stats, N, logits.device)
    if grad_rows.shape != (N,) or grad_rows.dtype != torch.float32 or grad_rows.device != logits.device:
        raise ValueError(f"grad_rows must be a float32 [{N}] tensor on {logits.device}, got {grad_rows.dtype} "
                         f"{tuple(grad_rows.shape)} on {grad_rows.device}")
    grad = torch.empty_like(logits) if out is None else out
    if out is not None:
        _check_out(out, logits, targets, "out", dtypes_must_match=False)
    if N:
        _row_logps_bwd_kernel[(N,)](
            logits, logits.stride(0), grad, grad.stride(0), targets.contiguous(), stats.contiguous(),
            grad_rows.contiguous(), N, V, *scalars, HAS_SOFTCAP=softcap is not None, BLOCK_V=_block_v(V),
            num_warps=NUM_WARPS,
        )
    return grad


def _aot_specs():
    """Every compiled variant: fp32 / bf16 logits, with and without softcap, forward plain, with write_grad
    (the head's stored mode: fp32 logits in, U out in the named dtype), each with and without token_stats, at
    BLOCK_V = MAX_BLOCK_V and the JIT's specialisation for aligned rows (V % 16 == 0: 32000, 128256, 151936,
    262144, ...)."""
    scalars = {"logit_scale": "fp32", "softcap": "fp32", "inv_temp": "fp32"}
    specs = []
    for dtype in ("fp32", "bf16"):
        for softcap in (False, True):
            tag = f"{dtype}{',softcap' if softcap else ''}"
            for write_grad, token_stats in ((False, False), (False, True), (True, False), (True, True)):
                suffix = (",write_grad" if write_grad else "") + (",token_stats" if token_stats else "")
                specs.append(dict(
                    name=f"row_logps_fwd[{tag}{suffix}]", fn=_row_logps_fwd_kernel,
                    signature={"logits_ptr": "*fp32" if write_grad else f"*{dtype}", "stride_logits": "i64",
                               "grad_ptr": f"*{dtype}", "stride_grad": "i64", "targets_ptr": "*i64",
                               "row_logp_ptr": "*fp32", "stats_ptr": "*fp32", "logit_sum_ptr": "*fp32",
                               "entropy_ptr": "*fp32", "top1_ptr": "*i1", "N": "i32", "V": "i32",
                               **scalars, "HAS_SOFTCAP": "constexpr", "WRITE_GRAD": "constexpr",
                               "TOKEN_STATS": "constexpr", "BLOCK_V": "constexpr"},
                    constexprs={"HAS_SOFTCAP": softcap, "WRITE_GRAD": write_grad, "TOKEN_STATS": token_stats,
                                "BLOCK_V": MAX_BLOCK_V},
                    divisible=("logits_ptr", "stride_logits", "grad_ptr", "stride_grad", "V"),
                    num_warps=_fwd_warps(write_grad, token_stats), num_stages=3))
            specs.append(dict(
                name=f"row_logps_bwd[{tag}]", fn=_row_logps_bwd_kernel,
                signature={"logits_ptr": "*fp32", "stride_logits": "i64", "grad_ptr": f"*{dtype}",
                           "stride_grad": "i64", "targets_ptr": "*i64", "stats_ptr": "*fp32",
                           "grad_rows_ptr": "*fp32", "N": "i32", "V": "i32", **scalars, "HAS_SOFTCAP": "constexpr",
                           "BLOCK_V": "constexpr"},
                constexprs={"HAS_SOFTCAP": softcap, "BLOCK_V": MAX_BLOCK_V},
                divisible=("logits_ptr", "stride_logits", "grad_ptr", "stride_grad", "V"),
                num_warps=NUM_WARPS, num_stages=3))
    return specs


AOT_SPECS = _aot_specs()
