"""Vocabulary-parallel LM head: the head weight sharded along V across a process group (Megatron-style).

    weight = distribute_tensor(full_weight, mesh, [Shard(0)])     # or parallelize_module(..., ColwiseParallel())
    out = fastdpo.loss(hidden=hidden, weight=weight, ...)        # hidden replicated on every rank

Every rank holds the same hidden states [N, D] and a contiguous slice [V_r, D] of the weight (a DTensor with
`Shard(0)` on a 1-D device mesh, or the local shard plus `process_group=`). Per scored token each rank computes
its shard's partials with GEMMs on its shard and row work in fp32:

    max m_r,  sum-exp s_r = sum_v exp(z_v - m_r),  z_t - m_r (rank owning the target, else 0),  sum_v z_v

plus a fingerprint of the token (row sum of its hidden state, and its target) to check that the ranks really
hold the same tokens. One all_gather brings the [W, 5, M] partials to every rank and each rank merges them in
rank order, so the result is bitwise identical on every rank:

    m = max_r m_r,  S = sum_r s_r exp(m_r - m),  row_logp = (z_t - m_owner) + (m_owner - m) - log S,
    lse = m + log S

(the contract's cancellation-free row_logp: no `z_t - lse` difference of two large numbers). Backward is
local: each rank forms U = (onehot(t) - softmax(z)) dz/dx on its shard with the global softmax stats (max,
log-sum-exp past it; stored mode: from its forward's exp(z - m_r), scaled once the merge is known), gets its shard's
weight gradient U^T (g H) with no communication, and its share g (U W_r) of the hidden gradient, which is
summed over ranks deterministically: a reduce-scatter written as all_to_all (rank r receives block r of the
rows from every rank and adds them in rank order) followed by an all_gather of the summed blocks. No float
atomics, no all_reduce (whose summation order is the collective library's choice).

Communication per call, M scored tokens, W ranks, D hidden size: forward, an all_gather of 5 fp32 per token
(each rank receives 20 M (W - 1) bytes) and of 3 int64 per rank (layout check); backward, when hidden needs a
gradient, the all_to_all and the all_gather each move 4 M D (W - 1) / W bytes in and out of every rank
(fp32). Never O(M V).

Head modes (fastdpo.head.make_head decides, on the local shard [V_r, D]): "stored" keeps U [M, V_r] (input
dtype) from the forward's one GEMM, 4 V_r D FLOPs of backward per token (6 in all); "recompute" keeps only the
two softmax stats per row and recomputes the logits chunk in backward (6 V_r D); "auto" picks stored when
M x V_r x itemsize fits `head_memory_budget`. Logits are fp32 GEMM outputs for 16-bit inputs, as in fastdpo.head.
"fused" (the Triton kernels' registers-only head) is refused: those kernels return a per-row lse, not the
per-shard max and sum-exp that a cancellation-free merge needs (row_logp from lse_r - lse would lose ~1e-3
absolute at logits around 1e4 in fp32).
"""
import sys

import torch
import torch.distributed as dist

from .head import FusedHead, Products, make_head
from .ops import resolve_backend
from .torch_ops import Transform, math_dtype, matmul_precision
from .validate import require

MAX, SUM_EXP, TARGET, LOGIT_SUM, FINGERPRINT = range(5)  # channels of the gathered partials


def is_vocab_sharded(weight):
    """True for a DTensor weight: the vocabulary-parallel head serves it (and validates its layout).

    No DTensor exists before torch.distributed.tensor is imported, so that (2 s) import is never forced here.
    """
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(weight, dtensor.DTensor)


def _local_shard(name, tensor, mesh):
    """The local shard of a DTensor `tensor` with placements (Shard(0),) on `mesh` (differentiable)."""
    from torch.distributed.tensor import DTensor, Shard

    require(isinstance(tensor, DTensor) and tuple(tensor.placements) == (Shard(0),),
             f"{name} must be a DTensor sharded along the vocabulary, placements (Shard(0),) on the weight's "
             f"1-D device mesh, got {getattr(tensor, 'placements', type(tensor).__name__)}")
    require(tensor.device_mesh == mesh, f"{name} must be sharded on the weight's device mesh {mesh}, got a DTensor "
                                        f"on {tensor.device_mesh}")
    return tensor.to_local()


def _unshard_inputs(hidden, weight, bias):
    """(hidden, local weight, local bias, process group, vocabulary offset) of DTensor inputs."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = weight.device_mesh
    require(mesh.ndim == 1, f"weight must be sharded on a 1-D device mesh, got a {mesh.ndim}-D mesh")
    local_weight = _local_shard("weight", weight, mesh)
    local_bias = None if bias is None else _local_shard("bias", bias, mesh)
    if isinstance(hidden, DTensor):
        require(all(isinstance(p, Replicate) for p in hidden.placements),
                 f"hidden must be replicated on every rank (plain tensor or DTensor with Replicate placements), "
                 f"got placements {hidden.placements}")
        hidden = hidden.to_local()
    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
    return hidden, local_weight, local_bias, mesh.get_group(), offset[0]


class _Shard:
    """This rank's slice [begin, begin + V_r) of the LM head, with the logit transforms.

    x = h W_r^T + b_r by torch matmul in the input dtype; z = softcap(logit_scale * x) / temperature in fp32
    (fp64 for fp64 inputs). Row work in chunks of `chunk_rows` rows.
    """

    def __init__(self, weight, bias, begin, transform, chunk_rows):
        self.weight, self.bias, self.begin, self.transform = weight, bias, begin, transform
        self.math_dtype, self.chunk_rows = math_dtype(weight), chunk_rows

    def logits(self, h):
        """h [C, D] (input dtype) -> z [C, V_r] in the math dtype (fp32 GEMM output for 16-bit inputs, as the
        single-device head: the row math never sees logits rounded to bf16)."""
        x = torch.empty(h.shape[0], self.weight.shape[0], device=h.device, dtype=self.math_dtype)
        Products(self.weight).logits(h, self.weight, x)
        return self.transform.apply_(x if self.bias is None else x.add_(self.bias))

    def local_targets(self, targets):
        """(rows whose target lies in this shard, the target's column in the shard)."""
        column = targets - self.begin
        inside = torch.nonzero((column >= 0) & (column < self.weight.shape[0])).squeeze(1)
        return inside, column[inside]

    def partials(self, h, targets, kept=None):
        """h [C, D], targets [C] -> [4, C] math dtype: max, sum-exp, z_t - max (0 if t is elsewhere), sum z.

        With kept [C, V_r] (stored mode) it also writes exp(z - max) * dz/dx there (input dtype), the local half of
        U that `_finish_grad_logits_` scales once the global softmax stats are known, and returns dz/dx at each
        row's target (as [C]; only the rows whose target is in this shard matter)."""
        z = self.logits(h)
        slope = self.transform.slope(z) if kept is not None else None  # taken before z is overwritten
        out = torch.zeros(4, h.shape[0], dtype=z.dtype, device=z.device)
        row_max = z.amax(dim=1)
        shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        inside, column = self.local_targets(targets)
        out[TARGET, inside] = z[inside, column] - shift[inside]
        out[LOGIT_SUM] = z.sum(dim=1)
        out[MAX] = row_max
        out[SUM_EXP] = z.sub_(shift[:, None]).exp_().sum(dim=1)
        if kept is None:
            return out, None
        target_slope = torch.ones_like(row_max) if slope is None else torch.full_like(row_max, slope) \
            if isinstance(slope, float) else torch.zeros_like(row_max).index_put_((inside,), slope[inside, column])
        kept.copy_(z if slope is None else z.mul_(slope))
        return out, target_slope

    def finish_grad_logits_(self, kept, targets, local_max, stats, target_slope):
        """kept [M, V_r] = exp(z - local shift) * dz/dx -> U = (onehot(t) - softmax(z)) * dz/dx in place, with the
        global stats [2, M] = (shift, log_sum_exp): softmax = exp(z - local) * exp((local - shift) - log_sum_exp)."""
        local_shift = torch.where(torch.isinf(local_max), torch.zeros_like(local_max), local_max)
        kept.mul_(((local_shift - stats[0]) - stats[1]).exp_().neg_()[:, None])
        inside, column = self.local_targets(targets)
        kept.index_put_((inside, column), target_slope[inside].to(kept.dtype), accumulate=True)
        return kept

    def grad_logits(self, h, targets, stats):
        """U = (onehot(t) - softmax(z)) dz/dx [C, V_r] in the input dtype, softmax = exp((z - shift) - log_sum_exp)
        with the global stats [2, C] (no z - lse cancellation at large logits)."""
        z = self.logits(h)
        slope = self.transform.slope(z)
        u = z.sub_(stats[0][:, None]).sub_(stats[1][:, None]).exp_().neg_()
        inside, column = self.local_targets(targets)
        u[inside, column] += 1.0
        return (u if slope is None else u.mul_(slope)).to(self.weight.dtype)


def _no_autocast(device):
    return torch.autocast(device.type, enabled=False)


def _all_gather(tensor, group):
    """[W, *tensor.shape]: every rank's tensor, in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def _shard_layout(targets, local_vocab, vocab_offset, group):
    """Check (on every rank alike, so that all raise together) that the shards tile the vocabulary, every
    rank scores the same number of tokens and the targets [M] lie in the vocabulary.

    Returns (begins [W], ends [W]) int64 of every rank's vocabulary slice, in rank order.
    """
    low, high = (int(targets.min()), int(targets.max())) if targets.numel() else (0, 0)
    meta = torch.tensor([targets.numel(), local_vocab, -1 if vocab_offset is None else vocab_offset, low, high])
    meta = _all_gather(meta.to(targets.device), group).cpu()
    rows, sizes, begins = meta[:, 0], meta[:, 1], meta[:, 2]
    require(bool((rows == rows[0]).all()),
             f"every rank must score the same tokens (hidden and labels replicated), got {rows.tolist()} scored "
             f"tokens per rank")
    require(bool((sizes > 0).all()), f"every rank's weight shard must hold at least one vocabulary row (a "
             f"vocabulary of {int(sizes.sum())} rows cannot be sharded over {sizes.numel()} ranks that way), got "
             f"shard sizes {sizes.tolist()}")
    require(bool((begins < 0).all() or (begins >= 0).all()), "vocab_offset must be given on every rank or on none")
    if bool((begins < 0).all()):  # equal or unequal contiguous shards in rank order
        begins = torch.cumsum(sizes, 0) - sizes
    order = torch.argsort(begins)
    tiled = bool((begins[order][0] == 0) and (begins[order][1:] == (begins + sizes)[order][:-1]).all())
    require(tiled, f"the weight shards must tile the vocabulary without gaps or overlaps, got "
             f"[begin, end) = {list(zip(begins.tolist(), (begins + sizes).tolist()))}")
    vocab_size = int(sizes.sum())
    require(bool((meta[:, 3] >= 0).all() and (meta[:, 4] < vocab_size).all()),
             f"targets of scored tokens must lie in [0, {vocab_size}), got [{int(meta[:, 3].min())}, "
             f"{int(meta[:, 4].max())}]")
    return begins, begins + sizes


def _merge(gathered, targets, begins, ends):
    """Merge [W, 5, M] partials in rank order -> (row_logp [M], stats [2, M] = (shift, log_sum_exp),
    logit_sum [M]); same bits on every rank. lse = shift + log_sum_exp."""
    require(bool((gathered[:, FINGERPRINT] == gathered[0, FINGERPRINT]).all()),
             "hidden states and labels must be identical on every rank of the process group (the vocabulary-"
             "parallel head needs replicated tokens; data-parallel ranks must not share a sharded head)")
    row_max = gathered[:, MAX].amax(dim=0)
    shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    sum_exp, logit_sum = torch.zeros_like(row_max), torch.zeros_like(row_max)
    for part in gathered:  # fixed rank order
        sum_exp += part[SUM_EXP] * (part[MAX] - shift).exp()
        logit_sum += part[LOGIT_SUM]
    owner = ((targets[:, None] >= begins) & (targets[:, None] < ends)).long().argmax(dim=1)
    tokens = torch.arange(targets.numel(), device=targets.device)
    owner_max = gathered[owner, MAX, tokens]
    target_minus_max = gathered[owner, TARGET, tokens] + (owner_max - shift)
    log_sum_exp = sum_exp.log()
    return target_minus_max - log_sum_exp, torch.stack([shift, log_sum_exp]), logit_sum


def _reduce_over_ranks(partial, group):
    """Sum [M, D] over the ranks in rank order: all_to_all reduce-scatter, then all_gather. Same bits everywhere."""
    world = dist.get_world_size(group)
    block = -(-partial.shape[0] // world)
    padded = partial.new_zeros(world * block, partial.shape[1])
    padded[:partial.shape[0]] = partial
    received = torch.empty_like(padded)
    dist.all_to_all_single(received, padded, group=group)
    own_block = received[:block].clone()
    for source in range(1, world):  # fixed rank order
        own_block += received[source * block:(source + 1) * block]
    return _all_gather(own_block, group).reshape(world * block, partial.shape[1])[:partial.shape[0]]


def _forward(shard, hidden_rows, targets, group, layout, keep_grad_logits):
    """Merged (row_logp [M], stats [2, M], logit_sum [M]) and, if asked, U [M, V_r] (input dtype) from the same
    logits GEMM (stored mode: 2 V_r D FLOPs per token in the forward, the backward's two GEMMs make 6)."""
    M = hidden_rows.shape[0]
    kept = hidden_rows.new_empty(M, shard.weight.shape[0]) if keep_grad_logits else None
    parts, slopes = [], []
    for begin in range(0, M, shard.chunk_rows):
        end = min(begin + shard.chunk_rows, M)
        part, slope = shard.partials(hidden_rows[begin:end], targets[begin:end],
                                     None if kept is None else kept[begin:end])
        parts.append(part)
        slopes.append(slope)
    fingerprint = hidden_rows.to(shard.math_dtype).sum(dim=1) + targets.to(shard.math_dtype)
    partials = torch.cat([torch.cat(parts, dim=1) if parts else fingerprint.new_zeros(4, 0), fingerprint[None]])
    row_logp, stats, logit_sum = _merge(_all_gather(partials, group), targets, *layout)
    if kept is not None:
        shard.finish_grad_logits_(kept, targets, partials[MAX], stats, torch.cat(slopes) if slopes else stats[0])
    return (row_logp, stats, logit_sum), kept


class _VocabParallelLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, seq_of_rows, num_sequences, shard, group, layout,
                stored, fp32_precision, impl):
        with _no_autocast(hidden.device), matmul_precision(fp32_precision, hidden.device):
            hidden_rows = hidden.index_select(0, rows)
            (row_logp, stats, logit_sum), grad_logits = _forward(shard, hidden_rows, targets, group, layout, stored)
        sums = impl.segment_sum(torch.stack([row_logp, logit_sum]), seq_of_rows, num_sequences)
        ctx.save_for_backward(hidden, rows, targets, seq_of_rows, stats, grad_logits)
        ctx.shard, ctx.group, ctx.fp32_precision = shard, group, fp32_precision
        ctx.mark_non_differentiable(sums[1])
        return sums[0], sums[1]

    @staticmethod
    def backward(ctx, grad_logps, _):
        hidden, rows, targets, seq_of_rows, stats, grad_logits = ctx.saved_tensors
        shard, group = ctx.shard, ctx.group
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_rows = grad_logps.to(stats.dtype)[seq_of_rows]
        hidden_rows = hidden.index_select(0, rows)
        partial_hidden = torch.zeros(hidden_rows.shape, dtype=shard.math_dtype, device=hidden.device) \
            if needs_hidden else None
        grad_weight = torch.zeros(shard.weight.shape, dtype=shard.math_dtype, device=hidden.device) \
            if needs_weight else None
        grad_bias = torch.zeros(shard.weight.shape[0], dtype=shard.math_dtype, device=hidden.device) \
            if needs_bias else None
        step = max(1, rows.numel()) if grad_logits is not None else shard.chunk_rows  # stored: one GEMM each
        with _no_autocast(hidden.device), matmul_precision(ctx.fp32_precision, hidden.device):
            for begin in range(0, rows.numel(), step):
                h, end = hidden_rows[begin:begin + step], begin + step
                u = grad_logits[begin:end] if grad_logits is not None else \
                    shard.grad_logits(h, targets[begin:end], stats[:, begin:end])
                g = grad_rows[begin:end, None]
                if needs_hidden:
                    partial_hidden[begin:end] = (u @ shard.weight).to(shard.math_dtype) * g
                if needs_weight:
                    grad_weight += u.t() @ (h.to(shard.math_dtype) * g).to(h.dtype)
                if needs_bias:
                    grad_bias += u.t() @ g[:, 0].to(u.dtype)
        grad_hidden = None
        if needs_hidden:
            grad_hidden = torch.zeros_like(hidden)
            grad_hidden[rows] = _reduce_over_ranks(partial_hidden, group).to(hidden.dtype)
        cast = lambda grad: None if grad is None else grad.to(shard.weight.dtype)  # noqa: E731
        return (grad_hidden, cast(grad_weight), cast(grad_bias)) + (None,) * 10


def vocab_parallel_sequence_logps(hidden, weight, bias, targets, seq_index, num_sequences, *,
                                  process_group=None, vocab_offset=None, backend="auto", logit_scale=1.0,
                                  softcap=None, temperature=1.0, head_mode="auto", head_memory_budget=None,
                                  fp32_precision="ieee", rows=None):
    """Per-sequence log-prob sums through a vocabulary-sharded LM head -> (logps [S], logit_sums [S]) fp32.

    hidden [N, D] (identical on every rank), targets [N] int64 (-1 = none, else in [0, V)), seq_index [N]
    int64 (-1 = none). Either `weight` [V, D] (and `bias` [V]) are DTensors with placements (Shard(0),) on
    a 1-D device mesh, or `weight` [V_r, D] / `bias` [V_r] are this rank's shard and `process_group` is
    given; `vocab_offset` (this shard's first vocabulary row) defaults to contiguous shards in rank order.
    Results are bitwise identical on every rank. `backend` picks the segment-sum launcher; `rows` is the
    [M] index of tokens with a target (built here when None).
    """
    if is_vocab_sharded(weight):
        require(process_group is None and vocab_offset is None,
                 "process_group and vocab_offset come from the DTensor weight's mesh; do not pass them with it")
        hidden, weight, bias, process_group, vocab_offset = _unshard_inputs(hidden, weight, bias)
    require(process_group is not None, "a vocabulary-parallel head needs a DTensor weight or process_group=")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (e.g. mesh.get_group() or "
                        f"dist.new_group(...)), got {type(process_group).__name__} {process_group!r:.40}")
    require(weight.dim() == 2 and hidden.dim() == 2 and hidden.shape[1] == weight.shape[1],
             f"hidden must be [N, D] and the weight shard [V_r, D], got {tuple(hidden.shape)} and "
             f"{tuple(weight.shape)}")
    require(hidden.dtype == weight.dtype, f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    require(bias is None or (bias.shape == weight.shape[:1] and bias.dtype == weight.dtype),
             f"bias shard must have shape ({weight.shape[0]},) and dtype {weight.dtype}")
    require(softcap is None or softcap > 0, f"softcap must be None or > 0, got {softcap}")
    require(temperature > 0, f"temperature must be > 0, got {temperature}")
    if rows is None:
        rows = torch.nonzero(seq_index >= 0).squeeze(1)
    row_targets, seq_of_rows = targets[rows].contiguous(), seq_index[rows].contiguous()
    impl = resolve_backend(backend, hidden.device)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    begins, ends = _shard_layout(row_targets, weight.shape[0], vocab_offset, process_group)  # collective: first
    head = make_head(impl, head_mode=head_mode, head_memory_budget=head_memory_budget, weight=weight,
                     num_rows=rows.numel(), transforms={}, fp32_precision=fp32_precision, needs_grad=needs_grad)
    require(not isinstance(head, FusedHead), "head_mode='fused' is not available with a vocabulary-sharded weight "
             "(the fused kernels do not return the per-shard max and sum-exp the exact merge needs); use "
             "'stored', 'recompute' or 'auto'")
    layout = (begins.to(hidden.device), ends.to(hidden.device))
    shard = _Shard(weight, bias, int(begins[dist.get_rank(process_group)]),
                   Transform(logit_scale, softcap, temperature),
                   head.reference_rows if head.store else head.chunk_rows)  # rows of fp32 logits per chunk
    if needs_grad:
        return _VocabParallelLogps.apply(hidden, weight, bias, rows, row_targets, seq_of_rows, num_sequences, shard,
                                         process_group, layout, head.store, fp32_precision, impl)
    with torch.no_grad(), _no_autocast(hidden.device), matmul_precision(fp32_precision, hidden.device):
        (row_logp, _, logit_sum), _ = _forward(shard, hidden.index_select(0, rows), row_targets, process_group,
                                               layout, keep_grad_logits=False)  # reference: nothing saved
    sums = impl.segment_sum(torch.stack([row_logp, logit_sum]), seq_of_rows, num_sequences)
    return sums[0], sums[1]
