"""Attention of a packed batch at the cost of its segments.

``fastdpo.packing`` lays the tokens out (ids, positions, labels, segment and branch ids); this module turns
that layout into attention:

* :func:`segment_plan` (built once per batch and device, on the host): the query segments, the key/value
  gather index and ``cu_seqlens_q/k`` of one varlen attention call. A query segment attends causally, aligned
  to the bottom right, to a key set that is contiguous once gathered:

      shared layout      [P C] -> [P C]         [p' R] -> [P[:-1] p' R]      (P[:-1]: the prompt context)
      separate layout    [P C] -> [P C]         [P R]  -> [P R]
      padding            each token -> itself

  Its cost is the sum over segments, not ``rows x T^2``.
* :func:`packed_attention_forward`, registered with transformers' ``AttentionInterface`` as ``"fastdpo|X"``
  for the model's implementation X (with X's mask function in ``AttentionMaskInterface``): given the plan, the
  attention of one layer in X's kernel family: flash -> one varlen call (flash-attn's
  ``flash_attn_varlen_func``, else ``torch.nn.attention.varlen.varlen_attn``, on CUDA; per-segment SDPA
  elsewhere), sdpa -> SDPA per segment, batched by segment length, flex_attention -> FlexAttention over the
  gathered keys with a block mask built from the plan's segment ranges. Without a plan it is X itself.
  ``fastdpo.model`` switches a model to it on its first packed forward.
* :func:`bool_mask` / :func:`eager_mask`: the dense ``[R, 1, T, T]`` masks, for eager attention (the
  reference) only. Eager attention *adds* the mask to the scores, so it gets the additive float mask.

Rule (see ``fastdpo.packing`` for the layouts): kv is visible to q iff q == kv, or they are in the same
non-padding segment, kv <= q, and kv is prompt context or on q's branch. Padding tokens attend only to
themselves: no fully masked query rows, hence no NaNs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache, partial
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .packing import BRANCH_CHOSEN, BRANCH_CONTEXT, BRANCH_REJECTED, PackedBatch

__all__ = ["bool_mask", "eager_mask", "make_mask_mod", "SegmentPlan", "segment_plan",
           "flash_attn_varlen_kwargs", "packed_attention_forward", "packed_implementation", "mask_placeholder",
           "register_packed_attention", "attention_work", "segment_sdpa", "segment_varlen", "segment_flex",
           "varlen_kernel"]


def make_mask_mod(batch_or_segment_ids, branch_ids: torch.Tensor | None = None, *,
                  sliding_window: int | None = None, position_ids: torch.Tensor | None = None) -> Callable:
    """The visibility rule as a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool`` over rows of a packed
    batch (or its segment/branch ids): the definition the dense masks evaluate and the segment plan must match.

    With ``sliding_window`` w, kv must also satisfy pos[q] - pos[kv] < w. Works element-wise on index
    tensors, so it can also be evaluated with broadcasting on CPU.
    """
    if isinstance(batch_or_segment_ids, PackedBatch):
        seg, br = batch_or_segment_ids.segment_ids, batch_or_segment_ids.branch_ids
        pos = batch_or_segment_ids.position_ids if position_ids is None else position_ids
    else:
        seg, br, pos = batch_or_segment_ids, branch_ids, position_ids
        if br is None:
            raise ValueError("make_mask_mod needs branch_ids when given segment ids")
    if sliding_window is not None and pos is None:
        raise ValueError("make_mask_mod needs position_ids for a sliding window")

    def mask_mod(b, h, q_idx, kv_idx):
        sq, sk = seg[b, q_idx], seg[b, kv_idx]
        bq, bk = br[b, q_idx], br[b, kv_idx]
        same = (sq == sk) & (sq >= 0) & (kv_idx <= q_idx) & ((bk == BRANCH_CONTEXT) | (bk == bq))
        if sliding_window is not None:
            same = same & ((pos[b, q_idx] - pos[b, kv_idx]) < sliding_window)
        return same | (q_idx == kv_idx)

    return mask_mod


def _mask_from_ids(batch: PackedBatch, sliding_window: int | None = None) -> torch.Tensor:
    """make_mask_mod evaluated densely by broadcasting: [R, 1, T, T] bool."""
    R, T = batch.segment_ids.shape
    dev = batch.segment_ids.device
    q = torch.arange(T, device=dev)
    return make_mask_mod(batch, sliding_window=sliding_window)(
        torch.arange(R, device=dev)[:, None, None, None], 0, q[None, None, :, None], q[None, None, None, :])


def bool_mask(batch: PackedBatch, sliding_window: int | None = None) -> torch.Tensor:
    """[R, 1, T, T] boolean mask, True = attend, on the batch's device: the dense reference (eager attention,
    tests); the packed attentions never build it.

    With ``sliding_window`` w, a token only sees keys whose position is within w - 1 of its own
    (transformers' rule kv > q - w, applied to position ids so it matches unpacked runs).
    """
    return _mask_from_ids(batch, sliding_window)


def eager_mask(batch: PackedBatch, dtype: torch.dtype = torch.float32,
               sliding_window: int | None = None) -> torch.Tensor:
    """Additive float mask [R, 1, T, T] of `dtype`: 0 where attending, finfo(dtype).min elsewhere."""
    allowed = bool_mask(batch, sliding_window)
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)


def _block_mask_explicit(batch: PackedBatch) -> torch.Tensor:
    """Boolean [R, 1, T, T] mask written block by block from each segment's part lengths (independent of
    the id-based rule in make_mask_mod, which the tests compare against it)."""
    R, T = batch.input_ids.shape
    m = torch.zeros(R, 1, T, T, dtype=torch.bool)

    def causal(n):
        return torch.ones(n, n, dtype=torch.bool).tril_()

    seg_ids, branches = batch.segment_ids.cpu(), batch.branch_ids.cpu()
    for row in range(R):
        t = 0
        for segment in seg_ids[row][seg_ids[row] >= 0].unique_consecutive().tolist():
            branch = branches[row][seg_ids[row] == segment]
            if batch.shared_prompt:  # [prompt[:-1]][last prompt token + chosen][repeated token + rejected]
                n_context = int((branch == BRANCH_CONTEXT).sum())
                n_chosen, n_rejected = int((branch == BRANCH_CHOSEN).sum()), int((branch == BRANCH_REJECTED).sum())
                n1 = n_context + n_chosen
                m[row, 0, t:t + n1, t:t + n1] = causal(n1)
                s = t + n1
                m[row, 0, s:s + n_rejected, t:t + n_context] = True
                m[row, 0, s:s + n_rejected, s:s + n_rejected] = causal(n_rejected)
                t = s + n_rejected
            else:
                n = branch.numel()
                m[row, 0, t:t + n, t:t + n] = causal(n)
                t += n
        idx = torch.arange(t, T)
        m[row, 0, idx, idx] = True  # padding attends to itself only
    return m.to(batch.input_ids.device)


# --------------------------------------------------------------------------------------------------
# segment plan
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SegmentGroup:
    """Query segments of one (query length, key length): flat token indices, for a batched SDPA call."""
    q_len: int
    k_len: int
    q_index: torch.Tensor  # [n * q_len] int64 into the flattened R*T queries
    k_index: torch.Tensor  # [n * k_len] int64 into the flattened R*T keys/values


@dataclass(frozen=True)
class SegmentPlan:
    """Varlen attention of a packed batch over its flattened R*T tokens (see the module docstring).

    Query segment s is tokens ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` of the flattened batch; its keys are
    ``k_flat[kv_index][cu_seqlens_k[s]:cu_seqlens_k[s+1]]``, attended causally aligned to the bottom right
    (query i of a segment with q_len queries and k_len keys sees keys 0 .. k_len - q_len + i). Gathered key
    positions run consecutively and end at the query's own position (checked when built), so a sliding window
    of w positions is the key window (w - 1, 0) of every segment.
    """
    num_rows: int
    row_length: int
    cu_seqlens_q: torch.Tensor  # [S+1] int32
    cu_seqlens_k: torch.Tensor  # [S+1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    kv_index: torch.Tensor | None  # [total_k] int64 into the flattened keys; None: the keys are the queries
    first_key: torch.Tensor  # [R*T] int64: first gathered key a query sees (no window)
    last_key: torch.Tensor  # [R*T] int64: last gathered key a query sees (its own position)
    groups: tuple[SegmentGroup, ...]  # query segments by (q_len, k_len), for per-segment SDPA
    output_order: torch.Tensor  # [R*T] int64: row of each flattened token in the concatenated group outputs
    q_lengths: tuple[int, ...]  # host copies, for cost accounting
    k_lengths: tuple[int, ...]

    @property
    def num_segments(self) -> int:
        return len(self.q_lengths)


def _query_segments(segment_ids: np.ndarray, branch_ids: np.ndarray):
    """(q_start, q_end, [key ranges]) over flattened tokens, in order (see SegmentPlan)."""
    n = segment_ids.size
    change = np.flatnonzero((segment_ids[1:] != segment_ids[:-1]) | (branch_ids[1:] != branch_ids[:-1])) + 1
    out, context, context_joined = [], None, False
    for s, e in zip(np.r_[0, change].tolist(), np.r_[change, n].tolist()):
        seg, branch = int(segment_ids[s]), int(branch_ids[s])
        if seg < 0:  # padding attends to itself only
            out.extend((t, t + 1, [(t, t + 1)]) for t in range(s, e))
        elif branch == BRANCH_CONTEXT:  # prompt context: joins the first block after it in one causal segment
            context, context_joined = (seg, s, e), False
        elif context is not None and context[0] == seg:
            if not context_joined:
                out.append((context[1], e, [(context[1], e)]))
                context_joined = True
            else:
                out.append((s, e, [(context[1], context[2]), (s, e)]))
        else:
            out.append((s, e, [(s, e)]))
    return out


def _build_plan(batch: PackedBatch) -> SegmentPlan:
    R, T = batch.input_ids.shape
    segments = _query_segments(batch.segment_ids.reshape(-1).cpu().numpy(), batch.branch_ids.reshape(-1).cpu().numpy())
    q_lens = np.array([e - s for s, e, _ in segments], dtype=np.int64)
    k_lens = np.array([sum(b - a for a, b in keys) for _, _, keys in segments], dtype=np.int64)
    kv_index = np.concatenate([np.arange(a, b) for _, _, keys in segments for a, b in keys])
    cu_q, cu_k = np.r_[0, np.cumsum(q_lens)], np.r_[0, np.cumsum(k_lens)]
    if cu_q[-1] != R * T:
        raise AssertionError("query segments must cover every token once")
    # per query: the gathered keys it sees, [first_key, last_key]
    seg_of_query = np.repeat(np.arange(len(segments)), q_lens)
    local = np.arange(R * T) - cu_q[seg_of_query]
    last_key = cu_k[seg_of_query] + (k_lens - q_lens)[seg_of_query] + local
    first_key = cu_k[seg_of_query]
    # exactness of positions: gathered keys run consecutively and end at each query's own position
    pos = batch.position_ids.reshape(-1).cpu().numpy()
    key_pos = pos[kv_index]
    seg_of_key = np.repeat(np.arange(len(segments)), k_lens)
    steps = np.diff(key_pos)[seg_of_key[1:] == seg_of_key[:-1]]
    if (steps != 1).any() or (key_pos[last_key] != pos).any():
        raise ValueError("the batch's position_ids do not follow its segments (keys of a segment must have "
                         "consecutive positions ending at each query's own); build batches with pack_pairs")
    groups, order = [], []
    for q_len, k_len in sorted(set(zip(q_lens.tolist(), k_lens.tolist()))):
        members = np.flatnonzero((q_lens == q_len) & (k_lens == k_len))
        q_index = (cu_q[members, None] + np.arange(q_len)).reshape(-1)
        k_index = kv_index[(cu_k[members, None] + np.arange(k_len)).reshape(-1)]
        groups.append(SegmentGroup(q_len, k_len, torch.from_numpy(q_index), torch.from_numpy(k_index)))
        order.append(q_index)
    output_order = np.empty(R * T, dtype=np.int64)
    output_order[np.concatenate(order)] = np.arange(R * T)
    identity = kv_index.size == R * T and (kv_index == np.arange(R * T)).all()
    i32 = lambda a: torch.from_numpy(a.astype(np.int32))  # noqa: E731
    return SegmentPlan(
        num_rows=R, row_length=T, cu_seqlens_q=i32(cu_q), cu_seqlens_k=i32(cu_k), max_seqlen_q=int(q_lens.max()),
        max_seqlen_k=int(k_lens.max()), kv_index=None if identity else torch.from_numpy(kv_index),
        first_key=torch.from_numpy(first_key), last_key=torch.from_numpy(last_key), groups=tuple(groups),
        output_order=torch.from_numpy(output_order), q_lengths=tuple(q_lens.tolist()),
        k_lengths=tuple(k_lens.tolist()))


def _plan_to(plan: SegmentPlan, device) -> SegmentPlan:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return replace(plan, cu_seqlens_q=move(plan.cu_seqlens_q), cu_seqlens_k=move(plan.cu_seqlens_k),
                   kv_index=move(plan.kv_index), first_key=move(plan.first_key), last_key=move(plan.last_key),
                   output_order=move(plan.output_order),
                   groups=tuple(replace(g, q_index=move(g.q_index), k_index=move(g.k_index)) for g in plan.groups))


def segment_plan(batch: PackedBatch, device=None) -> SegmentPlan:
    """The batch's :class:`SegmentPlan` on `device` (default: the batch's), built once on the host and cached
    on the batch object per device: layers and repeated forwards (policy, reference) reuse it."""
    device = torch.device(device if device is not None else batch.input_ids.device)
    cache = batch.__dict__.setdefault("_segment_plans", {})
    if device not in cache:
        cache[device] = _build_plan(batch) if device.type == "cpu" else _plan_to(segment_plan(batch, "cpu"), device)
    return cache[device]


def flash_attn_varlen_kwargs(batch: PackedBatch, device=None) -> dict:
    """Arguments of one flash-attn varlen call over the batch's flattened R*T tokens, either layout.

    {"cu_seqlens_q", "cu_seqlens_k" ([S+1] int32), "max_seqlen_q", "max_seqlen_k" (int), "kv_index"}: gather
    the flattened keys and values with ``index_select(0, kv_index)`` first (None: use them as they are), then
    call ``flash_attn_varlen_func(q, k, v, **rest, causal=True)`` (causal aligned to the bottom right).
    """
    plan = segment_plan(batch, device)
    return {"cu_seqlens_q": plan.cu_seqlens_q, "cu_seqlens_k": plan.cu_seqlens_k, "max_seqlen_q": plan.max_seqlen_q,
            "max_seqlen_k": plan.max_seqlen_k, "kv_index": plan.kv_index}


def attention_work(plan: SegmentPlan, sliding_window: int | None = None) -> dict[str, int]:
    """Query-key score entries of one head of one layer (multiply by 4 x head_dim x heads for FLOPs):

    * "dense_mask": R x T^2, what SDPA / eager compute with a [R, 1, T, T] mask;
    * "segments": the entries the plan allows (causal, bottom-right, windowed), what a varlen kernel computes
      (up to its tile rounding);
    * "segment_sdpa": what per-segment SDPA computes: causal segments with q_len == k_len skip the upper
      triangle (is_causal), segments with a bottom-right mask compute q_len x k_len.
    """
    visible = computed = 0
    for q_len, k_len in zip(plan.q_lengths, plan.k_lengths):
        seen = np.arange(k_len - q_len + 1, k_len + 1)
        if sliding_window is not None:
            seen = np.minimum(seen, sliding_window)
        visible += int(seen.sum())
        computed += int(seen.sum()) if q_len == k_len else q_len * k_len
    return {"dense_mask": plan.num_rows * plan.row_length ** 2, "segments": visible, "segment_sdpa": computed}


# --------------------------------------------------------------------------------------------------
# attention over a plan: flattened q [N, Hq, D], k / v [N, Hkv, D] -> [N, Hq, D]
# --------------------------------------------------------------------------------------------------

def _causal_window_mask(q_len: int, k_len: int, window: int | None, device) -> torch.Tensor:
    """[q_len, k_len] bool: causal aligned to the bottom right, keys within `window` positions."""
    last = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    keys = torch.arange(k_len, device=device)[None, :]
    allowed = keys <= last
    return allowed & (keys > last - window) if window is not None else allowed


def _attend(q, k, v, *, scale, window, softcap, dropout) -> torch.Tensor:
    """Attention of equal-length segments: q [n, Hq, q_len, D], k / v [n, Hkv, k_len, D] -> [n, Hq, q_len, D]."""
    q_len, k_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if softcap is None:
        if q_len == k_len and (window is None or window >= k_len):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout,
                                                  enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_window_mask(q_len, k_len, window, q.device),
                                              scale=scale, dropout_p=dropout, enable_gqa=gqa)
    # softcapped scores (Gemma 2): SDPA has no score transform, so the segment is computed as eager does
    if gqa:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~_causal_window_mask(q_len, k_len, window, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v)


def segment_sdpa(q, k, v, plan: SegmentPlan, *, scale=None, window=None, softcap=None, dropout=0.0) -> torch.Tensor:
    """Exact attention per query segment, one SDPA call per (q_len, k_len) group."""
    Hq, Hkv, D, Dv = q.shape[1], k.shape[1], q.shape[2], v.shape[2]
    outs = []
    for g in plan.groups:
        n = g.q_index.numel() // g.q_len
        qg = q.index_select(0, g.q_index).view(n, g.q_len, Hq, D).transpose(1, 2)
        kg = k.index_select(0, g.k_index).view(n, g.k_len, Hkv, D).transpose(1, 2)
        vg = v.index_select(0, g.k_index).view(n, g.k_len, Hkv, Dv).transpose(1, 2)
        out = _attend(qg, kg, vg, scale=scale, window=window, softcap=softcap, dropout=dropout)
        outs.append(out.transpose(1, 2).reshape(n * g.q_len, Hq, Dv))
    return torch.cat(outs).index_select(0, plan.output_order)


def _flash_attn_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window, softcap, dropout):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scale,
                                  causal=True, window_size=window, softcap=0.0 if softcap is None else softcap)


def _torch_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window, softcap, dropout):
    from torch.nn.attention.varlen import varlen_attn

    if softcap is not None:
        raise ValueError(f"attention logit softcapping (softcap={softcap}) needs flash-attn's flash_attn_varlen_func: "
                         "torch.nn.attention.varlen.varlen_attn has none; install flash-attn or use "
                         "attn_implementation='eager'")
    if dropout:
        raise ValueError(f"attention dropout ({dropout}) is not supported by torch.nn.attention.varlen.varlen_attn; "
                         "install flash-attn or set the model's attention_dropout to 0")
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window,
                       enable_gqa=q.shape[1] != k.shape[1])


def varlen_kernel(device: torch.device) -> Callable | None:
    """The varlen kernel for `device`, with flash-attn's calling convention (causal aligned to the bottom right,
    window (left, 0)): flash-attn's flash_attn_varlen_func, else torch.nn.attention.varlen.varlen_attn, on CUDA;
    None elsewhere."""
    return _cuda_varlen_kernel() if device.type == "cuda" else None


@lru_cache(maxsize=1)
def _cuda_varlen_kernel() -> Callable | None:
    """Looked up once (a failed import is not cached by Python, and this runs per layer)."""
    try:
        import flash_attn  # noqa: F401
        return _flash_attn_kernel
    except ImportError:
        pass
    try:
        import torch.nn.attention.varlen  # noqa: F401
        return _torch_varlen_kernel
    except ImportError:
        return None


def segment_varlen(q, k, v, plan: SegmentPlan, *, scale=None, window=None, softcap=None, dropout=0.0) -> torch.Tensor:
    """One varlen call over the plan (keys and values gathered once); per-segment SDPA where no kernel exists."""
    kernel = varlen_kernel(q.device)
    if kernel is None:
        return segment_sdpa(q, k, v, plan, scale=scale, window=window, softcap=softcap, dropout=dropout)
    if plan.kv_index is not None:
        k, v = k.index_select(0, plan.kv_index), v.index_select(0, plan.kv_index)
    return kernel(q, k, v, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_seqlen_q, plan.max_seqlen_k,
                  scale=scale, window=(-1 if window is None else window - 1, 0), softcap=softcap, dropout=dropout)


def _flex_block_mask(plan: SegmentPlan, window: int | None, device, block_size: int = 128):
    """FlexAttention BlockMask [1, 1, R*T, total_k] from the plan's key ranges: per query block, the key blocks
    between its first query's first key and its last query's last key; mask_mod keeps [first_key, last_key]."""
    from torch.nn.attention.flex_attention import BlockMask

    last = plan.last_key
    first = plan.first_key if window is None else torch.maximum(plan.first_key, last - (window - 1))
    n_q, n_k = last.numel(), sum(plan.k_lengths)
    q_blocks, k_blocks = -(-n_q // block_size), -(-n_k // block_size)
    starts = torch.arange(q_blocks, device=device) * block_size
    lo = first[starts] // block_size
    hi = last[torch.clamp(starts + block_size - 1, max=n_q - 1)] // block_size
    kv_indices = (lo[:, None] + torch.arange(k_blocks, device=device)).clamp(max=k_blocks - 1).to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= first[q_idx]) & (kv_idx <= last[q_idx])

    return BlockMask.from_kv_blocks((hi - lo + 1).to(torch.int32)[None, None], kv_indices[None, None],
                                    BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(n_q, n_k))


@lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def segment_flex(q, k, v, plan: SegmentPlan, *, scale=None, window=None, softcap=None, dropout=0.0) -> torch.Tensor:
    """FlexAttention over the gathered keys with a block mask from the plan (softcap as a score_mod)."""
    from torch.nn.attention.flex_attention import flex_attention as eager_flex_attention

    if dropout:
        raise ValueError(f"attention dropout ({dropout}) is not supported by flex_attention")
    if plan.kv_index is not None:
        k, v = k.index_select(0, plan.kv_index), v.index_select(0, plan.kv_index)
    score_mod = None if softcap is None else (lambda s, b, h, q_idx, kv_idx: softcap * torch.tanh(s / softcap))
    # uncompiled, flex_attention materialises every score (CPU: forward only)
    flex_attention = eager_flex_attention if q.device.type == "cpu" else _compiled_flex_attention()
    out = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                         score_mod=score_mod, block_mask=_flex_block_mask(plan, window, q.device), scale=scale,
                         enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


# --------------------------------------------------------------------------------------------------
# transformers wiring
# --------------------------------------------------------------------------------------------------

_FAMILIES = {"sdpa": segment_sdpa, "varlen": segment_varlen, "flex": segment_flex}
PACKED_PREFIX = "fastdpo|"  # packed attention of implementation X is registered as "fastdpo|X"


def _family(attn_implementation: str) -> str:
    """Kernel family of a transformers attention implementation: sdpa, varlen (flash-attention:
    flash_attention_2/3/4, hub flash kernels) or flex; ValueError naming any other (eager takes the dense mask)."""
    if attn_implementation == "sdpa":
        return "sdpa"
    if attn_implementation == "flex_attention":
        return "flex"
    if "flash" in attn_implementation and not attn_implementation.startswith("paged|"):
        return "varlen"
    raise ValueError(f"attn_implementation={attn_implementation!r} is not supported for packed batches; use "
                     "'sdpa', 'eager', 'flex_attention' or a flash-attention implementation")


def packed_implementation(attn_implementation: str) -> str:
    """The name of the packed attention for a model's implementation ("sdpa" -> "fastdpo|sdpa"), registered with
    transformers on first use; ValueError naming an implementation it cannot serve."""
    if attn_implementation.startswith(PACKED_PREFIX):
        return attn_implementation
    _family(attn_implementation)
    name = PACKED_PREFIX + attn_implementation
    register_packed_attention(name)
    return name


def packed_attention_forward(module, query, key, value, attention_mask, *, family: str, unpacked: str,
                             fastdpo_segments: SegmentPlan | None = None, **kwargs):
    """transformers attention function: query [R, Hq, T, D], key / value [R, Hkv, T, D] -> ([R, T, Hq, D], None).

    With the ``fastdpo_segments`` keyword (a SegmentPlan, passed by ``fastdpo.model`` to the model call, so it
    also reaches recomputation under gradient checkpointing): attention over the plan in the kernel `family`;
    the attention mask is only a placeholder. Without it (generation, evaluation): the model's own
    implementation `unpacked`, unchanged.
    """
    plan = fastdpo_segments
    if plan is None:
        from transformers import AttentionInterface

        return AttentionInterface()[unpacked](module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("s_aux") is not None:
        raise ValueError("packed attention does not support attention sinks (s_aux); use attn_implementation='eager'")
    R, Hq, T, D = query.shape
    if (R, T) != (plan.num_rows, plan.row_length):
        raise ValueError(f"attention inputs of {R} rows x {T} tokens do not match the segment plan's "
                         f"{plan.num_rows} x {plan.row_length}")
    flat = lambda x: x.transpose(1, 2).reshape(R * T, x.shape[1], x.shape[3])  # noqa: E731
    out = _FAMILIES[family](flat(query), flat(key), flat(value), plan, scale=kwargs.get("scaling"),
                            window=kwargs.get("sliding_window"), softcap=kwargs.get("softcap"),
                            dropout=kwargs.get("dropout", 0.0))
    return out.view(R, T, Hq, value.shape[-1]), None


def mask_placeholder(plan: SegmentPlan, device) -> torch.Tensor:
    """[R, 1, T, T] bool of one stored element (stride 0): transformers passes a 4-D mask to the attention as
    it is, so no mask is built; the packed attention reads the plan instead."""
    return torch.ones((), dtype=torch.bool, device=device).expand(plan.num_rows, 1, plan.row_length, plan.row_length)


def register_packed_attention(name: str) -> None:
    """Register "fastdpo|X" with transformers' AttentionInterface (packed_attention_forward in X's family, X
    itself without a plan) and, where X has one, X's mask function with AttentionMaskInterface, so that
    unpacked calls get X's masks (without it transformers would pass no mask, silently)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if name in AttentionInterface._global_mapping:
        return
    unpacked = name[len(PACKED_PREFIX):]
    if unpacked not in AttentionInterface():
        raise ValueError(f"attn_implementation={unpacked!r} is not registered with transformers")
    AttentionInterface.register(name, partial(packed_attention_forward, family=_family(unpacked), unpacked=unpacked))
    if unpacked in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[unpacked])
