"""Deterministic per-sequence sums of per-token values.

Tokens are ordered by sequence with a stable sort (integer work, deterministic), then program (s, c)
adds values[c, tokens of sequence s] in that fixed order: no float atomics, so repeated runs give
bitwise-identical sums.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _segment_sum_kernel(values_ptr, stride_values, order_ptr, offsets_ptr, out_ptr, stride_out,
                        BLOCK: tl.constexpr):
    seq = tl.program_id(0)
    channel = tl.program_id(1).to(tl.int64)
    begin = tl.load(offsets_ptr + seq)
    end = tl.load(offsets_ptr + seq + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(begin, end, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        token = tl.load(order_ptr + idx, mask=idx < end, other=0)
        acc += tl.load(values_ptr + channel * stride_values + token, mask=idx < end, other=0.0)
    tl.store(out_ptr + channel * stride_out + seq, tl.sum(acc, axis=0))


def segment_sum(values, seq_index, num_sequences):
    """values [C, N] float32, seq_index [N] int64 in [-1, S) (-1 = none) -> [C, S] float32 sums."""
    C, N = values.shape
    out = torch.empty(C, num_sequences, device=values.device, dtype=torch.float32)
    if num_sequences == 0:
        return out
    order = torch.argsort(seq_index, stable=True)  # -1 tokens first, then sequence 0, 1, ...
    # offsets[s] .. offsets[s + 1] are the tokens of sequence s (searchsorted: no host sync, unlike bincount)
    levels = torch.arange(-1, num_sequences, device=seq_index.device)
    offsets = torch.searchsorted(seq_index[order], levels, right=True)
    _segment_sum_kernel[(num_sequences, C)](
        values, values.stride(0), order, offsets, out, out.stride(0), BLOCK=BLOCK, num_warps=4,
    )
    return out


AOT_SPECS = [dict(
    name="segment_sum", fn=_segment_sum_kernel, num_warps=4, num_stages=3, constexprs={"BLOCK": BLOCK},
    signature={"values_ptr": "*fp32", "stride_values": "i64", "order_ptr": "*i64", "offsets_ptr": "*i64",
               "out_ptr": "*fp32", "stride_out": "i64", "BLOCK": "constexpr"},
)]
