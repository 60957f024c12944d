"""Fused LM-head log-probs: per-token log-softmax through ``hidden @ weight.T`` without logits.

Logits ``z[m, v] = softcap(logit_scale * (hidden[rows[m]] . weight[v] + bias[v])) / temperature``
(``softcap(x) = c * tanh(x / c)``) are produced tile by tile in registers (``tl.dot`` with fp32
accumulation) and reduced on the fly; a ``[M, V]`` logits tensor never exists.

Forward (``linear_logps_forward``), one kernel + a tiny torch merge:
  programs = (cdiv(M, BLOCK_M) token tiles) x (S vocab splits) on a 1-D grid, launched in groups of
  FWD_GROUP_M token tiles x all splits (L2 reuse). Program (i, s) loops over the BLOCK_V vocab tiles of
  split s; each logits tile is a loop over D in BLOCK_D chunks. Online log-sum-exp; it writes
  per-(split, row) partials (max, sum exp, target logit, logit sum) to a [S, 4, M] fp32 buffer that
  ``_merge_forward`` combines with fixed-shape torch reductions (deterministic) into the cancellation-free
  row_logp = (z_t - max) - log sum exp(z - max). Extra memory O(S * M). S fills ~2 programs per SM when M
  is small and is >= FWD_L2_SPLITS when V is large.

Backward (``linear_logps_backward``), one kernel body, two launches chosen by a constexpr:
  OUTER_TOKENS=True  -> grad_hidden: program (token tile, vocab split) loops over its vocab tiles,
                        recomputes the logits tile, forms dz, and accumulates dz @ W into its own fp32
                        slice [split, BLOCK_M rows, D] (read-modify-write of D chunks only it owns).
  OUTER_TOKENS=False -> grad_weight / grad_bias: program (vocab tile, token split) loops over its token
                        tiles, accumulates dz^T @ hidden into its own slice [split, BLOCK_V rows, D] and
                        dz summed over tokens into its own bias partial.
  Token tiles whose grad_rows are all exactly 0 are skipped (a NaN is not 0: it propagates); rows past the
  last token of a tile load log_sum_exp = +inf, so they contribute exactly 0 however large their logits are.
  Split partials are summed with torch in a fixed order. No atomics: bitwise deterministic for a given
  shape and device.
fp32 inputs: ``fp32_precision="ieee"`` (default) multiplies exactly (FMA dots), "tf32" allows TF32 tensor
cores; never taken from torch.backends. All row offsets are int64 (row * stride).
  fp32 workspaces are bounded by ``workspace_bytes`` (the launcher walks the outer axis in chunks);
  fp32 inputs with a single split accumulate straight into the output.
"""

import torch
import triton
import triton.language as tl

from .transforms import check_fp32_precision, transform_scalars, transformed_logits

__all__ = ["linear_logps_forward", "linear_logps_backward", "AOT_SPECS", "BLOCKS"]


# --------------------------------------------------------------------------------------------
# device helpers (shared by the forward kernel and both backward passes)
# --------------------------------------------------------------------------------------------
@triton.jit
def _row_ptrs(base, idx, stride, ALIGN: tl.constexpr):
    """[B] pointers to rows ``idx`` of a row-major matrix (64-bit offsets). ALIGN > 1 promises a
    16-byte aligned base and a row stride that is a multiple of ALIGN elements (vectorised access)."""
    p = base + idx.to(tl.int64) * stride
    if ALIGN > 1:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _logits_tile(h_rows, w_rows, bias_ptr, mask_m, offs_v, mask_v, D, logit_scale, softcap, inv_temp,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TRANS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Transformed logits z of one tile, fp32: [BLOCK_M, BLOCK_V], or its transpose [BLOCK_V, BLOCK_M]
    when TRANS (computed as W @ H^T, so the weight-grad pass gets dz^T in the accumulator layout that
    feeds the next dot directly). h_rows [BLOCK_M] / w_rows [BLOCK_V]: row pointers of hidden / weight.
    Masked rows/columns load zeros (callers mask the results)."""
    offs_d = tl.arange(0, BLOCK_D)
    if TRANS:
        acc = tl.zeros([BLOCK_V, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        dmask = dd < D
        if TRANS:
            w = tl.load(w_rows[:, None] + dd[None, :], mask=mask_v[:, None] & dmask[None, :], other=0.0)
            ht = tl.load(h_rows[None, :] + dd[:, None], mask=mask_m[None, :] & dmask[:, None], other=0.0)
            acc = tl.dot(w, ht, acc, input_precision=DOT_PRECISION)
        else:
            h = tl.load(h_rows[:, None] + dd[None, :], mask=mask_m[:, None] & dmask[None, :], other=0.0)
            wt = tl.load(w_rows[None, :] + dd[:, None], mask=mask_v[None, :] & dmask[:, None], other=0.0)
            acc = tl.dot(h, wt, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        if TRANS:
            acc = acc + b[:, None]
        else:
            acc = acc + b[None, :]
    return transformed_logits(acc, logit_scale, softcap, inv_temp, HAS_SOFTCAP)


@triton.jit
def _dlogits(z, shift, log_sum_exp, g, tgt, offs_v, mask_v, logit_scale, softcap, inv_temp,
             HAS_SOFTCAP: tl.constexpr, TRANS: tl.constexpr):
    """d(sum_m g[m] * row_logp[m]) / d(raw logits hidden.weight + bias) for one tile (layout as in
    _logits_tile), fp32, with softmax = exp((z - shift) - log_sum_exp) (no z - lse cancellation at large
    logits). Masked columns give exactly 0; so do rows with g == 0 whose stats are finite, and masked rows,
    which callers load with log_sum_exp = +inf (p = 0 however large z is). NaN in g propagates."""
    if TRANS:
        p = tl.exp((z - shift[None, :]) - log_sum_exp[None, :])
        onehot = tl.where(offs_v[:, None] == tgt[None, :], 1.0, 0.0)
        dz = tl.where(mask_v[:, None], g[None, :] * (onehot - p), 0.0)
    else:
        p = tl.exp((z - shift[:, None]) - log_sum_exp[:, None])
        onehot = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
        dz = tl.where(mask_v[None, :], g[:, None] * (onehot - p), 0.0)
    if HAS_SOFTCAP:
        t = z * (1.0 / (softcap * inv_temp))  # tanh(y / softcap), recovered from z (no extra live tile)
        dz = dz * (1.0 - t * t)
    return dz * (inv_temp * logit_scale)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _linear_logps_fwd_kernel(
        hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr, part_ptr,
        M, V, D, stride_h, stride_w, n_split, v_per_split, group_m,
        logit_scale, softcap, inv_temp,
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (token tile, vocab split) on a 1-D grid of cdiv(M, BLOCK_M) * n_split programs, ordered
    in groups of group_m token tiles x all splits so that concurrently running programs share hidden
    and weight tiles in L2. part_ptr: fp32 [n_split, 4, M] = (max, sum exp(z - max), target logit,
    logit sum) over the split's columns."""
    pid = tl.program_id(0)
    n_mt = tl.cdiv(M, BLOCK_M)
    per_group = group_m * n_split
    first_m = (pid // per_group) * group_m
    group_size = tl.minimum(n_mt - first_m, group_m)
    pid_m = first_m + (pid % per_group) % group_size
    pid_s = (pid % per_group) // group_size
    if ALIGN > 1:
        D = D // ALIGN * ALIGN  # no-op (launcher checked); tells the compiler D % ALIGN == 0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)
    tgt = tl.load(targets_ptr + offs_m, mask=mask_m, other=-1)
    h_rows = _row_ptrs(hidden_ptr, rows, stride_h, ALIGN)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    z_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_hi
        w_rows = _row_ptrs(weight_ptr, offs_v, stride_w, ALIGN)
        z = _logits_tile(h_rows, w_rows, bias_ptr, mask_m, offs_v, mask_v, D, logit_scale, softcap,
                         inv_temp, HAS_BIAS, HAS_SOFTCAP, False, BLOCK_M, BLOCK_V, BLOCK_D, DOT_PRECISION)
        zm = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(zm, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(zm - m_new[:, None]), axis=1)
        m_i = m_new
        t_i += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        z_i += tl.sum(tl.where(mask_v[None, :], z, 0.0), axis=1)

    out = part_ptr + pid_s.to(tl.int64) * 4 * M + offs_m
    tl.store(out, m_i, mask=mask_m)
    tl.store(out + M, s_i, mask=mask_m)
    tl.store(out + 2 * M, t_i, mask=mask_m)
    tl.store(out + 3 * M, z_i, mask=mask_m)


@triton.jit
def _accumulate(dst_rows, mask_r, a, b_rows, mask_b, D, accum,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """dst[r, :] (+)= a @ B for a [BLOCK_R, BLOCK_K] tile ``a`` and B = rows ``b_rows`` [BLOCK_K] of a
    [*, D] matrix, over D in BLOCK_D chunks. dst is fp32 and owned by this program; accum == False
    (first contribution) stores without reading."""
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        dmask = dd < D
        b = tl.load(b_rows[:, None] + dd[None, :], mask=mask_b[:, None] & dmask[None, :], other=0.0)
        part = tl.dot(a, b, input_precision=DOT_PRECISION)
        ptrs = dst_rows[:, None] + dd[None, :]
        smask = mask_r[:, None] & dmask[None, :]
        prev = tl.load(ptrs, mask=tl.where(accum, smask, False), other=0.0)
        tl.store(ptrs, prev + part, mask=smask)
    # the next read-modify-write of these rows may be served by other threads of this program
    tl.debug_barrier()


@triton.jit
def _any_nonzero(g):
    """Whether a token tile has work: any g != 0, NaN included (a NaN gradient must propagate)."""
    return tl.sum((g != 0.0).to(tl.int32), axis=0) > 0


@triton.jit
def _store_zeros(dst_rows, mask_r, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        tl.store(dst_rows[:, None] + dd[None, :], tl.zeros([BLOCK_R, BLOCK_D], tl.float32),
                 mask=mask_r[:, None] & (dd < D)[None, :])


@triton.jit
def _linear_logps_bwd_kernel(
        hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr, stats_ptr, grad_ptr, dst_ptr, dbias_ptr,
        M, V, D, stride_h, stride_w, stride_dst_split, stride_dst_row,
        outer_lo, outer_hi, dst_row_base, inner_per_split,
        logit_scale, softcap, inv_temp,
        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, OUTER_TOKENS: tl.constexpr,
        SCATTER: tl.constexpr, COMPUTE_W: tl.constexpr, COMPUTE_B: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """One body, two passes (dst is fp32 [S, rows, D] with the given strides).

    OUTER_TOKENS: program (token tile of [outer_lo, outer_hi), vocab split of inner_per_split columns)
      accumulates dz @ W into dst[split, row - dst_row_base, :], row = rows[m] if SCATTER else m.
    else: program (vocab tile of [outer_lo, outer_hi), token split of inner_per_split token tiles)
      accumulates dz^T @ hidden into dst[split, v - dst_row_base, :] (COMPUTE_W) and sum_m dz into
      dbias[split, v] (fp32 [S, V], COMPUTE_B).
    Each program owns its destination rows: the first contribution stores, later ones read-modify-write.
    """
    pid_o = tl.program_id(0)
    pid_s = tl.program_id(1)
    if ALIGN > 1:
        D = D // ALIGN * ALIGN  # no-op (launcher checked); tells the compiler D % ALIGN == 0
    dst_base = dst_ptr + pid_s.to(tl.int64) * stride_dst_split
    if OUTER_TOKENS:
        offs_m = outer_lo + pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < outer_hi
        rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)
        g = tl.load(grad_ptr + offs_m, mask=mask_m, other=0.0)
        if SCATTER:
            dst_rows = _row_ptrs(dst_base, rows - dst_row_base, stride_dst_row, ALIGN)
        else:
            dst_rows = _row_ptrs(dst_base, offs_m - dst_row_base, stride_dst_row, ALIGN)
        if _any_nonzero(g):
            tgt = tl.load(targets_ptr + offs_m, mask=mask_m, other=-1)
            shift = tl.load(stats_ptr + offs_m, mask=mask_m, other=0.0)
            log_sum_exp = tl.load(stats_ptr + M + offs_m, mask=mask_m, other=float("inf"))
            h_rows = _row_ptrs(hidden_ptr, rows, stride_h, ALIGN)
            v_lo = pid_s * inner_per_split
            v_hi = tl.minimum(V, v_lo + inner_per_split)
            for v0 in range(v_lo, v_hi, BLOCK_V):
                offs_v = v0 + tl.arange(0, BLOCK_V)
                mask_v = offs_v < v_hi
                w_rows = _row_ptrs(weight_ptr, offs_v, stride_w, ALIGN)
                z = _logits_tile(h_rows, w_rows, bias_ptr, mask_m, offs_v, mask_v, D, logit_scale, softcap,
                                 inv_temp, HAS_BIAS, HAS_SOFTCAP, False, BLOCK_M, BLOCK_V, BLOCK_D, DOT_PRECISION)
                dx = _dlogits(z, shift, log_sum_exp, g, tgt, offs_v, mask_v, logit_scale, softcap, inv_temp, HAS_SOFTCAP,
                              False)
                _accumulate(dst_rows, mask_m, dx.to(weight_ptr.dtype.element_ty), w_rows, mask_v, D,
                            v0 > v_lo, BLOCK_M, BLOCK_V, BLOCK_D, DOT_PRECISION)
        else:
            _store_zeros(dst_rows, mask_m, D, BLOCK_M, BLOCK_D)
    else:
        offs_v = outer_lo + pid_o * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < outer_hi
        w_rows = _row_ptrs(weight_ptr, offs_v, stride_w, ALIGN)
        dst_rows = _row_ptrs(dst_base, offs_v - dst_row_base, stride_dst_row, ALIGN)
        t_lo = pid_s * inner_per_split
        t_hi = tl.minimum(tl.cdiv(M, BLOCK_M), t_lo + inner_per_split)
        db = tl.zeros([BLOCK_V], dtype=tl.float32)
        n_done = 0
        for mt in range(t_lo, t_hi):
            offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            g = tl.load(grad_ptr + offs_m, mask=mask_m, other=0.0)
            if _any_nonzero(g):
                rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)
                tgt = tl.load(targets_ptr + offs_m, mask=mask_m, other=-1)
                shift = tl.load(stats_ptr + offs_m, mask=mask_m, other=0.0)
                log_sum_exp = tl.load(stats_ptr + M + offs_m, mask=mask_m, other=float("inf"))
                h_rows = _row_ptrs(hidden_ptr, rows, stride_h, ALIGN)
                z = _logits_tile(h_rows, w_rows, bias_ptr, mask_m, offs_v, mask_v, D, logit_scale, softcap,
                                 inv_temp, HAS_BIAS, HAS_SOFTCAP, True, BLOCK_M, BLOCK_V, BLOCK_D, DOT_PRECISION)
                dx = _dlogits(z, shift, log_sum_exp, g, tgt, offs_v, mask_v, logit_scale, softcap, inv_temp, HAS_SOFTCAP,
                              True)
                if COMPUTE_B:
                    db += tl.sum(dx, axis=1)
                if COMPUTE_W:
                    _accumulate(dst_rows, mask_v, dx.to(hidden_ptr.dtype.element_ty), h_rows,
                                mask_m, D, n_done > 0, BLOCK_V, BLOCK_M, BLOCK_D, DOT_PRECISION)
                n_done += 1
        if COMPUTE_W:
            if n_done == 0:
                _store_zeros(dst_rows, mask_v, D, BLOCK_V, BLOCK_D)
        if COMPUTE_B:
            tl.store(dbias_ptr + pid_s.to(tl.int64) * V + offs_v, db, mask=mask_v)


# --------------------------------------------------------------------------------------------
# shipped configurations
# --------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_V, BLOCK_D, num_warps, num_stages) per pass and dot flavour: fp32 inputs with exact
# fp32 products ("ieee": FMA dots), fp32 inputs on TF32 tensor cores ("tf32"), 16-bit inputs (tensor
# cores, fp32 accumulation); 0 register spills on sm_80 and sm_90 (see AOT_SPECS). FMA dots hold more
# per thread than tensor-core dots: the ieee tiles use 8 warps (64 x 64 with 4 warps spills).
# bwd_hidden re-reads / re-writes its fp32 [BLOCK_M, D] slice once per vocab tile -> wide BLOCK_V;
# bwd_weight does the same with its [BLOCK_V, D] slice once per token tile -> tall BLOCK_M.
BLOCKS = {
    "fwd": {"fp32-ieee": (64, 64, 16, 8, 2), "fp32-tf32": (64, 64, 32, 4, 2), "16-bit": (128, 64, 64, 8, 3)},
    "bwd_hidden": {"fp32-ieee": (64, 64, 16, 8, 3), "fp32-tf32": (64, 64, 16, 4, 3), "16-bit": (64, 256, 32, 8, 3)},
    "bwd_weight": {"fp32-ieee": (64, 64, 16, 8, 3), "fp32-tf32": (64, 64, 16, 4, 3), "16-bit": (256, 64, 32, 8, 3)},
}
TARGET_PROGRAMS_CPU = 264  # 2 x 132 SMs (H100 SXM); on CUDA the device's SM count is used
MAX_FWD_SPLITS = 512  # partials are 16 bytes per (split, row)
MAX_BWD_SPLITS = 64  # also bounded by workspace_bytes (each split needs an fp32 [tile, D] slice)
FWD_L2_SPLITS = 8  # forward: >= this many vocab splits when V is large (L2 reuse of hidden tiles)
FWD_GROUP_M = 32  # forward: token tiles per launch-order group
DEFAULT_WORKSPACE_BYTES = 512 * 1024 * 1024


def _target_programs(t):
    if t.is_cuda:
        return 2 * torch.cuda.get_device_properties(t.device).multi_processor_count
    return TARGET_PROGRAMS_CPU


def _flavour(dtype, fp32_precision):
    """(BLOCKS key, tl.dot input_precision) for an input dtype; fp32_precision is validated for every dtype."""
    check_fp32_precision(fp32_precision)
    if dtype == torch.float32:
        return f"fp32-{fp32_precision}", fp32_precision
    return "16-bit", "ieee"  # input_precision only concerns fp32 operands


def _config(kind, flavour, blocks):
    bm, bv, bd, nw, ns = BLOCKS[kind][flavour]
    if blocks is not None:  # tests: smaller tiles, same kernels
        bm, bv, bd = blocks
    assert min(bm, bv, bd) >= 16 and all(x & (x - 1) == 0 for x in (bm, bv, bd))
    return bm, bv, bd, nw, ns


def _prep(hidden, weight, bias, rows, targets):
    """Checked inputs, with a unit stride along D (copies only where it is missing)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, D] and weight [V, D] must share D, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"hidden and weight must share one dtype of float32/bfloat16/float16, got {hidden.dtype} "
                         f"and {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be a {weight.dtype} [{weight.shape[0]}] tensor, got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    if rows.dtype != torch.int64 or targets.dtype != torch.int64 or rows.dim() != 1 or rows.shape != targets.shape:
        raise ValueError(f"rows and targets must be int64 [M] tensors, got {rows.dtype} {tuple(rows.shape)} and "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return hidden, weight, bias, rows.contiguous(), targets.contiguous()


def _align(D, elem_size, *mats):
    """ALIGN constexpr: 16 // elem_size when D, every matrix's row stride (in elements of the input
    dtype) and every base pointer allow 16-byte vector access; else 1 (no hint)."""
    a = 16 // elem_size
    ok = D % a == 0 and all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % (a * elem_size) == 0
                            for t in mats)
    return a if ok else 1


def _splits(n_outer_tiles, n_inner_tiles, target, cap):
    s = max(1, min(triton.cdiv(target, max(n_outer_tiles, 1)), n_inner_tiles, cap))
    per = triton.cdiv(n_inner_tiles, s)  # inner tiles per split
    return triton.cdiv(n_inner_tiles, per), per  # no empty split


def _merge_forward(part):
    """[S, 4, M] partials -> (row_logp [M], stats [2, M] = (row max, log_sum_exp), logit_sum [M]), fixed-shape
    reductions (deterministic).

    With m the exact row max over all splits: row_logp = (z_t - m) - log sum_s psum_s exp(pmax_s - m)
    (no cancellation at large logits; z_t comes from the one split holding the target, the others add 0).
    """
    pmax, psum, ptgt, plsum = part.unbind(1)
    if part.shape[0] == 1:
        row_max, log_sum_exp, target_z, logit_sum = pmax[0], torch.log(psum[0]), ptgt[0], plsum[0]
    else:
        row_max = pmax.amax(0)
        log_sum_exp = torch.log((psum * torch.exp(pmax - row_max)).sum(0))
        target_z, logit_sum = ptgt.sum(0), plsum.sum(0)
    return (target_z - row_max) - log_sum_exp, torch.stack([row_max, log_sum_exp]), logit_sum


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def linear_logps_forward(hidden, weight, bias, rows, targets, *, logit_scale=1.0, softcap=None,
                         temperature=1.0, fp32_precision="ieee", blocks=None, target_programs=None):
    """Per-token log-prob, log-sum-exp and logit sum through the LM head, logits never stored.

    hidden [N, D], weight [V, D], bias [V] or None (all fp32, bf16 or fp16, one dtype); rows [M] int64
    (indices into hidden), targets [M] int64 in [0, V) (not range-checked here: the caller validates
    labels). Returns (row_logp [M], stats [2, M], logit_sum [M]) fp32, for z = softcap(logit_scale *
    (hidden[rows] @ weight.T + bias)) / temperature; row_logp is computed from the exact row max m (no
    cancellation); stats = (m, log sum exp(z - m)) as in row_logps_forward. fp32_precision: "ieee" (exact fp32 products) or
    "tf32" (TF32 tensor cores allowed, fp32 inputs on a GPU only). Saves nothing; extra memory
    O(M * splits). ``blocks=(BLOCK_M, BLOCK_V, BLOCK_D)`` / ``target_programs`` override the tiling (tests).
    """
    flavour, dot_precision = _flavour(hidden.dtype, fp32_precision)
    scale, cap, inv_temp = transform_scalars(logit_scale, softcap, temperature)
    hidden, weight, bias, rows, targets = _prep(hidden, weight, bias, rows, targets)
    M, V, D = rows.shape[0], weight.shape[0], weight.shape[1]
    dev = hidden.device
    if M == 0:
        e = torch.empty(0, device=dev, dtype=torch.float32)
        return e, torch.empty(2, 0, device=dev, dtype=torch.float32), e.clone()
    bm, bv, bd, nw, ns = _config("fwd", flavour, blocks)
    n_mt, n_vt = triton.cdiv(M, bm), triton.cdiv(V, bv)
    # enough programs when M is small; and, when V is large, a few splits anyway so that the running
    # programs form a (group of token tiles) x (splits) block sharing tiles in L2
    target = max(target_programs or _target_programs(hidden), n_mt * min(FWD_L2_SPLITS, n_vt // 16))
    n_split, per = _splits(n_mt, n_vt, target, MAX_FWD_SPLITS)
    part = torch.empty((n_split, 4, M), device=dev, dtype=torch.float32)
    _linear_logps_fwd_kernel[(n_mt * n_split,)](
        hidden, weight, hidden if bias is None else bias, rows, targets, part,
        M, V, D, hidden.stride(0), weight.stride(0), n_split, per * bv, FWD_GROUP_M,
        scale, cap, inv_temp,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd,
        ALIGN=_align(D, hidden.element_size(), hidden, weight), DOT_PRECISION=dot_precision,
        num_warps=nw, num_stages=ns)
    return _merge_forward(part)


def linear_logps_backward(hidden, weight, bias, rows, targets, stats, grad_rows, *, logit_scale=1.0,
                          softcap=None, temperature=1.0, needs_hidden_grad=True, needs_weight_grad=True,
                          needs_bias_grad=True, fp32_precision="ieee", blocks=None, target_programs=None,
                          workspace_bytes=DEFAULT_WORKSPACE_BYTES):
    """Gradients of sum_m grad_rows[m] * row_logp[m] w.r.t. hidden, weight, bias.

    Shapes/dtypes as in ``linear_logps_forward``; stats [2, M] fp32 (from the forward), grad_rows [M] fp32.
    ``rows`` must not repeat (each position listed once). Returns (grad_hidden [N, D] | None,
    grad_weight [V, D] | None, grad_bias [V] | None) in the input dtypes; hidden rows not in ``rows``
    get 0. Token tiles whose grad_rows are all exactly 0 are skipped; NaN/inf in grad_rows propagate.
    Deterministic (no atomics). fp32 work buffers are bounded by ``workspace_bytes`` (the outer axis is
    processed in chunks when needed). fp32_precision as in ``linear_logps_forward``.
    """
    flavour, dot_precision = _flavour(hidden.dtype, fp32_precision)
    scale, cap, inv_temp = transform_scalars(logit_scale, softcap, temperature)
    hidden, weight, bias, rows, targets = _prep(hidden, weight, bias, rows, targets)
    M, V, D = rows.shape[0], weight.shape[0], weight.shape[1]
    N = hidden.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    for name, t, shape in (("stats", stats, (2, M)), ("grad_rows", grad_rows, (M,))):
        if t.shape != shape or t.dtype != torch.float32:
            raise ValueError(f"{name} must be a float32 {list(shape)} tensor, got {t.dtype} {tuple(t.shape)}")
    stats, grad_rows = stats.contiguous(), grad_rows.contiguous()
    needs_bias_grad = needs_bias_grad and bias is not None
    grad_hidden = grad_weight = grad_bias = None
    if M == 0:
        return (torch.zeros_like(hidden) if needs_hidden_grad else None,
                torch.zeros_like(weight) if needs_weight_grad else None,
                torch.zeros_like(bias) if needs_bias_grad else None)

    target = target_programs or _target_programs(hidden)
    ws_elems = max(1, workspace_bytes // 4)
    esz = hidden.element_size()
    bias_arg = hidden if bias is None else bias
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    args = (hidden, weight, bias_arg, rows, targets, stats, grad_rows)

    def launch(kind, grid, dst, dbias, dst_strides, outer, inner_per_split, align, **flags):
        bm, bv, bd, nw, ns = _config(kind, flavour, blocks)
        _linear_logps_bwd_kernel[grid](
            *args, dst, dbias, M, V, D, hidden.stride(0), weight.stride(0), *dst_strides, *outer,
            inner_per_split, scale, cap, inv_temp, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd, ALIGN=align, DOT_PRECISION=dot_precision,
            num_warps=nw, num_stages=ns, **flags)

    def chunks(n_tiles, tile, n_split, total):
        """Balanced chunks of the outer axis so that an fp32 [n_split, chunk, D] buffer fits the budget."""
        per_chunk = max(1, min(n_tiles, ws_elems // (n_split * tile * D)))
        n_chunks = triton.cdiv(n_tiles, per_chunk)
        size = min(total, triton.cdiv(n_tiles, n_chunks) * tile)
        return size, [(lo, min(total, lo + size)) for lo in range(0, total, size)]

    if needs_hidden_grad:
        bm, bv = _config("bwd_hidden", flavour, blocks)[:2]
        n_mt, n_vt = triton.cdiv(M, bm), triton.cdiv(V, bv)
        n_split, per = _splits(n_mt, n_vt, target, min(MAX_BWD_SPLITS, max(1, ws_elems // (bm * D))))
        flags = dict(OUTER_TOKENS=True, COMPUTE_W=True, COMPUTE_B=False)
        grad_hidden = torch.zeros((N, D), device=dev, dtype=dtype)
        if n_split == 1 and dtype == torch.float32:
            # accumulate straight into the fp32 output rows (rows are unique)
            launch("bwd_hidden", (n_mt, 1), grad_hidden, dummy, (0, grad_hidden.stride(0)), (0, M, 0),
                   per * bv, _align(D, esz, hidden, weight, grad_hidden), SCATTER=True, **flags)
        else:
            size, spans = chunks(n_mt, bm, n_split, M)
            ws = torch.empty((n_split, size, D), device=dev, dtype=torch.float32)
            align = _align(D, esz, hidden, weight, ws)
            for lo, hi in spans:
                launch("bwd_hidden", (triton.cdiv(hi - lo, bm), n_split), ws, dummy, ws.stride()[:2],
                       (lo, hi, lo), per * bv, align, SCATTER=False, **flags)
                acc = ws[0, :hi - lo] if n_split == 1 else ws[:, :hi - lo].sum(0)  # fixed order
                grad_hidden[rows[lo:hi]] = acc.to(dtype)
            del ws

    if needs_weight_grad or needs_bias_grad:
        bm, bv = _config("bwd_weight", flavour, blocks)[:2]
        n_mt, n_vt = triton.cdiv(M, bm), triton.cdiv(V, bv)
        n_split, per = _splits(n_vt, n_mt, target, min(MAX_BWD_SPLITS, max(1, ws_elems // (bv * D))))
        dbias = torch.empty((n_split, V), device=dev, dtype=torch.float32) if needs_bias_grad else dummy
        flags = dict(OUTER_TOKENS=False, SCATTER=False, COMPUTE_W=needs_weight_grad, COMPUTE_B=needs_bias_grad)
        if not needs_weight_grad or (n_split == 1 and dtype == torch.float32):
            # no weight-grad buffer, or accumulate straight into the fp32 output
            grad_weight = torch.empty((V, D), device=dev, dtype=dtype) if needs_weight_grad else None
            dst = grad_weight if needs_weight_grad else dummy
            align = _align(D, esz, hidden, weight, *([dst] if needs_weight_grad else []))
            launch("bwd_weight", (n_vt, n_split), dst, dbias, (0, D), (0, V, 0), per, align, **flags)
        else:
            grad_weight = torch.empty((V, D), device=dev, dtype=dtype)
            size, spans = chunks(n_vt, bv, n_split, V)
            ws = torch.empty((n_split, size, D), device=dev, dtype=torch.float32)
            align = _align(D, esz, hidden, weight, ws)
            for lo, hi in spans:
                launch("bwd_weight", (triton.cdiv(hi - lo, bv), n_split), ws, dbias, ws.stride()[:2],
                       (lo, hi, lo), per, align, **flags)
                acc = ws[0, :hi - lo] if n_split == 1 else ws[:, :hi - lo].sum(0)  # fixed order
                grad_weight[lo:hi].copy_(acc)
            del ws
        if needs_bias_grad:
            grad_bias = (dbias[0] if n_split == 1 else dbias.sum(0)).to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


# --------------------------------------------------------------------------------------------
# AOT compile specs (scripts/compile_check.py): every dot flavour (fp32 ieee, fp32 tf32, bf16) at the
# shipped block sizes, each pass plain (no bias, no softcap) and heaviest (bias + softcap; the weight
# pass computing weight and bias grads).
# --------------------------------------------------------------------------------------------
_ARG_TY = {
    "rows_ptr": "*i64", "targets_ptr": "*i64", "part_ptr": "*fp32", "stats_ptr": "*fp32",
    "grad_ptr": "*fp32", "dst_ptr": "*fp32", "dbias_ptr": "*fp32",
    "logit_scale": "fp32", "softcap": "fp32", "inv_temp": "fp32",
    "stride_dst_split": "i64",
}
_PASSES = {  # name: (kernel, BLOCKS kind, pass flags)
    "fwd": (_linear_logps_fwd_kernel, "fwd", {}),
    "bwd_hidden": (_linear_logps_bwd_kernel, "bwd_hidden",
                   dict(OUTER_TOKENS=True, SCATTER=False, COMPUTE_W=True, COMPUTE_B=False)),
    "bwd_weight": (_linear_logps_bwd_kernel, "bwd_weight",
                   dict(OUTER_TOKENS=False, SCATTER=False, COMPUTE_W=True, COMPUTE_B=True)),
}


def _aot_spec(pass_name, dtype, fp32_precision, heavy):
    fn, kind, flags = _PASSES[pass_name]
    flavour, dot_precision = _flavour(dtype, fp32_precision)
    bm, bv, bd, nw, ns = BLOCKS[kind][flavour]
    elem = "fp32" if dtype == torch.float32 else "bf16"
    # ALIGN: 16-byte vector access, what the launcher picks for real shapes (D % 8 == 0)
    constexprs = dict(HAS_BIAS=heavy, HAS_SOFTCAP=heavy, BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd,
                      ALIGN=16 // (4 if dtype == torch.float32 else 2), DOT_PRECISION=dot_precision, **flags)
    if not heavy and pass_name == "bwd_weight":
        constexprs["COMPUTE_B"] = False
    signature = {a: "constexpr" if a in constexprs else f"*{elem}" if a in ("hidden_ptr", "weight_ptr", "bias_ptr")
                 else _ARG_TY.get(a, "i32") for a in fn.arg_names}
    tag = elem if dtype != torch.float32 else f"fp32,{fp32_precision}"
    return {"name": f"linear_logps_{pass_name}[{tag}{',bias,softcap' if heavy else ''}]", "fn": fn,
            "signature": signature, "constexprs": constexprs, "num_warps": nw, "num_stages": ns}


AOT_SPECS = [_aot_spec(pass_name, dtype, precision, heavy)
             for dtype, precision in ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "ieee"))
             for pass_name in _PASSES for heavy in (False, True)]
