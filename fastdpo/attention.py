"""Attention descriptions of a packed batch, one per attention implementation.

``fastdpo.packing`` lays the tokens out (ids, positions, labels, segment and branch ids); this module turns
that layout into what an attention implementation needs:

* :func:`bool_mask`: boolean ``[R, 1, T, T]``, True = attend (SDPA). Transformers (5.x) passes a 4-D mask
  through untouched (``masking_utils._preprocess_mask_arguments``) and uses ``position_ids`` only for the
  rotary embedding in that case.
* :func:`eager_mask`: the same mask as an additive float mask. Transformers' eager attention *adds* the mask
  to the scores, so a boolean mask there would be silently wrong.
* :func:`flex_block_mask`: a FlexAttention ``BlockMask`` built from :func:`make_mask_mod`.
* :func:`flash_attn_varlen_kwargs`: ``cu_seqlens``/``max_seqlen`` for flash-attn varlen over the flattened
  rows (non-shared layout only: the shared layout is not a union of causal segments).

Rule (see ``fastdpo.packing`` for the layouts): kv is visible to q iff q == kv, or they are in the same
non-padding segment, kv <= q, and kv is prompt context or on q's branch. Padding tokens attend only to
themselves: no fully masked query rows, hence no NaNs in SDPA/eager.
"""
from __future__ import annotations

from typing import Callable

import torch

from .packing import BRANCH_CHOSEN, BRANCH_CONTEXT, BRANCH_REJECTED, PackedBatch

__all__ = ["bool_mask", "eager_mask", "make_mask_mod", "flex_attention_available", "flex_block_mask",
           "flash_attn_varlen_kwargs"]


def make_mask_mod(batch_or_segment_ids, branch_ids: torch.Tensor | None = None, *,
                  sliding_window: int | None = None, position_ids: torch.Tensor | None = None) -> Callable:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for a packed batch (or its segment/branch ids).

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
    """[R, 1, T, T] boolean mask, True = attend, on the batch's device.

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


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


def flex_block_mask(batch: PackedBatch, *, device=None, block_size: int = 128, compile: bool = False,
                    sliding_window: int | None = None):
    """FlexAttention BlockMask of shape [R, 1, T, T] for the batch (for attn_implementation="flex_attention").
    Intended for GPU; raises RuntimeError when torch.nn.attention.flex_attention is not importable."""
    if not flex_attention_available():
        raise RuntimeError("torch.nn.attention.flex_attention is not available in this torch build")
    from torch.nn.attention.flex_attention import create_block_mask

    device = device if device is not None else batch.input_ids.device
    b = batch.to(device)
    R, T = b.input_ids.shape
    return create_block_mask(make_mask_mod(b, sliding_window=sliding_window), R, None, T, T, device=device,
                             BLOCK_SIZE=block_size, _compile=compile)


def flash_attn_varlen_kwargs(batch: PackedBatch, *, hf_names: bool = False) -> dict:
    """Arguments for flash-attn varlen over the flattened [R*T] tokens of a non-shared batch.

    ``hf_names=False``: {"cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"}
    (``flash_attn_varlen_func``); ``hf_names=True``: {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
    "max_length_k"} (transformers' FlashAttentionKwargs). Padding tails are their own segments.
    """
    if batch.shared_prompt:
        raise ValueError(
            "flash-attn varlen cannot express the shared-prompt layout (the rejected response must skip the "
            "chosen one); use pack_pairs(shared_prompt=False), or sdpa / eager / flex_attention"
        )
    cu = batch.cu_seqlens.to(device=batch.input_ids.device, dtype=torch.int32)
    if hf_names:
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": batch.max_seqlen,
                "max_length_k": batch.max_seqlen}
    return {"cu_seqlens_q": cu, "cu_seqlens_k": cu, "max_seqlen_q": batch.max_seqlen,
            "max_seqlen_k": batch.max_seqlen}
