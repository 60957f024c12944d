"""Per-token log-probabilities from materialised logits: one read forward, one read + one write backward.

Forward, one program per row of logits [N, V]: an online log-sum-exp over BLOCK_V-wide vocabulary
blocks (fp32 math), the target logit and the row's logit sum. Rows without a target (prompt, padding)
read nothing. Backward, one program per row: grad = g * (onehot(target) - softmax), written in the
logits' dtype, optionally into the logits buffer itself.
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _row_logps_fwd_kernel(
    logits_ptr, stride_logits, targets_ptr, target_logit_ptr, lse_ptr, logit_sum_ptr, V,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    active = target >= 0
    n_cols = tl.where(active, V, 0)  # rows without a target read nothing
    row_ptr = logits_ptr + row * stride_logits
    offsets = tl.arange(0, BLOCK_V)

    running_max = -float("inf")
    sum_exp = tl.zeros([BLOCK_V], dtype=tl.float32)  # per lane, rescaled to running_max
    logit_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        in_vocab = cols < n_cols
        x = tl.load(row_ptr + cols, mask=in_vocab, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)  # a row of -inf so far stays exact
        sum_exp = sum_exp * tl.exp(running_max - shift) + tl.exp(x - shift)
        logit_sum += tl.where(in_vocab, x, 0.0)
        running_max = new_max

    shift = tl.where(running_max == -float("inf"), 0.0, running_max)
    lse = shift + tl.log(tl.where(active, tl.sum(sum_exp, axis=0), 1.0))
    target_logit = tl.load(row_ptr + tl.maximum(target, 0), mask=active, other=0.0).to(tl.float32)
    tl.store(target_logit_ptr + row, tl.where(active, target_logit, 0.0))
    tl.store(lse_ptr + row, tl.where(active, lse, 0.0))
    tl.store(logit_sum_ptr + row, tl.sum(logit_sum, axis=0))


@triton.jit
def _row_logps_bwd_kernel(
    logits_ptr, stride_logits, grad_ptr, stride_grad, targets_ptr, lse_ptr, grad_rows_ptr, V,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    g = tl.load(grad_rows_ptr + row)
    active = (target >= 0) & (g != 0.0)
    n_read = tl.where(active, V, 0)  # inactive rows read nothing and write zeros
    lse = tl.load(lse_ptr + row)
    logits_row = logits_ptr + row * stride_logits
    grad_row = grad_ptr + row * stride_grad
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        in_vocab = cols < V
        x = tl.load(logits_row + cols, mask=cols < n_read, other=0.0).to(tl.float32)
        grad = g * (tl.where(cols == target, 1.0, 0.0) - tl.exp(x - lse))
        grad = tl.where(active, grad, 0.0)
        tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_vocab)


def _block_v(V):
    return min(triton.next_power_of_2(V), MAX_BLOCK_V)


def row_logps_forward(logits, targets):
    """logits [N, V] (fp32/bf16/fp16, unit column stride), targets [N] int64 (-1 = no target).

    Returns (target_logit, lse, logit_sum), each [N] float32; rows without a target give 0 for the first
    two, and logit_sum is 0 for them too.
    """
    N, V = logits.shape
    target_logit, lse, logit_sum = (torch.empty(N, device=logits.device, dtype=torch.float32) for _ in range(3))
    if N:
        _row_logps_fwd_kernel[(N,)](
            logits, logits.stride(0), targets, target_logit, lse, logit_sum, V,
            BLOCK_V=_block_v(V), num_warps=NUM_WARPS,
        )
    return target_logit, lse, logit_sum


def row_logps_backward(logits, targets, lse, grad_rows, out=None):
    """grad_logits [N, V] in the logits' dtype: grad_rows[n] * (onehot(targets[n]) - softmax(logits[n])).

    Rows without a target or with grad_rows == 0 get zeros. `out` may be `logits` itself (in place).
    """
    N, V = logits.shape
    grad = torch.empty_like(logits) if out is None else out
    if N:
        _row_logps_bwd_kernel[(N,)](
            logits, logits.stride(0), grad, grad.stride(0), targets, lse, grad_rows, V,
            BLOCK_V=_block_v(V), num_warps=NUM_WARPS,
        )
    return grad


def _aot_specs():
    specs = []
    for dtype in ("fp32", "bf16"):
        common = {"num_warps": NUM_WARPS, "num_stages": 3, "constexprs": {"BLOCK_V": MAX_BLOCK_V},
                  # aligned rows (V % 16 == 0: 32000, 128256, 151936, 262144, ...), as the JIT specialises
                  "divisible": ("logits_ptr", "stride_logits", "V")}
        specs.append(dict(
            name=f"row_logps_fwd[{dtype}]", fn=_row_logps_fwd_kernel,
            signature={"logits_ptr": f"*{dtype}", "stride_logits": "i64", "targets_ptr": "*i64",
                       "target_logit_ptr": "*fp32", "lse_ptr": "*fp32", "logit_sum_ptr": "*fp32",
                       "V": "i32", "BLOCK_V": "constexpr"},
            **common))
        specs.append(dict(
            name=f"row_logps_bwd[{dtype}]", fn=_row_logps_bwd_kernel,
            signature={"logits_ptr": f"*{dtype}", "stride_logits": "i64", "grad_ptr": f"*{dtype}",
                       "stride_grad": "i64", "targets_ptr": "*i64", "lse_ptr": "*fp32",
                       "grad_rows_ptr": "*fp32", "V": "i32", "BLOCK_V": "constexpr"},
            **{**common, "divisible": common["divisible"] + ("grad_ptr", "stride_grad")}))
    return specs


AOT_SPECS = _aot_specs()
