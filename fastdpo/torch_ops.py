"""PyTorch twin of the Triton launchers in `fastdpo.kernels`: same signatures, same semantics.

It serves CPU users and is the reference the kernels are checked against. Work is chunked over rows so
that no fp32 [N, V] tensor is ever built: peak extra memory is O(CHUNK_ELEMENTS) + O(N) (+ an fp32
weight-gradient accumulator for the fused head). Only rows with a target are touched; rows whose
upstream gradient is exactly 0 are skipped in backward (a NaN gradient is not 0: it propagates).
Math is fp32 (fp64 for fp64 inputs, so that `torch.autograd.gradcheck` can check it).

Notation: x = a raw logit, z = softcap(logit_scale * x) / temperature with softcap(y) = c * tanh(y / c)
(softcap=None: no tanh). Per row, with m = max_v z:
  row_logp = (z_t - m) - log sum_v exp(z_v - m)   (never z_t - lse, which cancels at large logits)
  lse = m + log sum_v exp(z_v - m),  logit_sum = sum_v z_v.
"""
import contextlib

import torch

CHUNK_ELEMENTS = 1 << 22  # fp32 elements of one [rows, V] working tile copied out of the logits (16 MiB)
IN_PLACE_CHUNK_ELEMENTS = 1 << 24  # rows worked on in place with softcap, whose dz/dx is a block-sized temporary
#                                    (without softcap the in-place pass is one block: see _row_blocks)
STATS_BLOCK_ELEMENTS = 1 << 20  # vocabulary blocks of the exp sums and the entropy's temporaries (4 MiB fp32)
FP32_PRECISIONS = ("ieee", "tf32")
VOCAB_MAJOR_LOGITS = True  # the row functions take logits of any strides (fastdpo.head lays them out for speed)


def check_fp32_precision(fp32_precision):
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")


@contextlib.contextmanager
def matmul_precision(fp32_precision, device):
    """fp32 matrix products inside the block: exact ("ieee") or TF32 tensor cores allowed ("tf32", CUDA only),
    and on CUDA no reduced-precision reductions in bf16/fp16 GEMMs (allow_bf16/fp16_reduced_precision_reduction
    = False: split-K partials are summed in fp32, whatever torch's default says).

    Set explicitly (and restored after), never inherited from torch.backends.*. On CPU products are always
    exact: TF32 is a permission, not a request.
    """
    check_fp32_precision(fp32_precision)
    if device.type == "cuda":
        flags = torch.backends.cuda.matmul
        wanted = dict(fp32_precision=fp32_precision, allow_bf16_reduced_precision_reduction=False,
                      allow_fp16_reduced_precision_reduction=False)
    else:
        flags, wanted = torch.backends.mkldnn.matmul, dict(fp32_precision="ieee")
    saved = {name: getattr(flags, name) for name in wanted}
    for name, value in wanted.items():
        setattr(flags, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(flags, name, value)


def math_dtype(tensor):
    """fp32, or fp64 for fp64 tensors: the dtype of all row math and of the per-row outputs."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


class Transform:
    """x -> z = softcap(logit_scale * x) / temperature on fp32 (fp64) tiles, and its derivative dz/dx."""

    def __init__(self, logit_scale=1.0, softcap=None, temperature=1.0):
        self.logit_scale, self.softcap, self.temperature = logit_scale, softcap, temperature

    def apply_(self, x):
        """In place: raw logits x -> final logits z."""
        if self.logit_scale != 1.0:
            x.mul_(self.logit_scale)
        if self.softcap is not None:
            x.div_(self.softcap).tanh_().mul_(self.softcap)
        if self.temperature != 1.0:
            x.div_(self.temperature)
        return x

    def slope(self, z):
        """dz/dx from the final logits z: None (identity), a float, or a fresh tensor shaped like z."""
        scale = self.logit_scale / self.temperature
        if self.softcap is None:
            return None if scale == 1.0 else scale
        tanh = z * (self.temperature / self.softcap)
        return tanh.square_().neg_().add_(1.0).mul_(scale)


def _shift(row_max):
    """The row max as a softmax shift, 0 where it is infinite (a row of -inf stays exact)."""
    return torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)


def _vocab_blocks(rows, vocab_size):
    """Column slices of a [rows, V] tile of about STATS_BLOCK_ELEMENTS elements each: contiguous in a
    vocabulary-major buffer, long runs in a row-major one; small temporaries either way."""
    width = max(1, STATS_BLOCK_ELEMENTS // max(1, rows))
    return [slice(begin, min(begin + width, vocab_size)) for begin in range(0, vocab_size, width)]


def _exp_sums_(c, token_stats):
    """In place: c [C, V] (z - shift) -> e = exp(c); returns (sum_v e_v, sum_v e_v c_v or None) [C], summed block
    by block (_vocab_blocks). The second (the entropy's, with token_stats) is formed from a copy of each block
    of c (-inf -> the lowest finite value, so that 0 * c is 0)."""
    sum_exp = torch.zeros(c.shape[0], device=c.device, dtype=c.dtype)
    sum_ec = torch.zeros_like(sum_exp) if token_stats else None
    for block in _vocab_blocks(*c.shape):  # the same blocks and order with or without token_stats: same bits
        centred = c[:, block].clamp(min=torch.finfo(c.dtype).min) if token_stats else None
        e = c[:, block].exp_()
        sum_exp += e.sum(dim=1)
        if token_stats:
            sum_ec += (e * centred).sum(dim=1)
    return sum_exp, sum_ec


def _first_max_hits(z, targets, target_logit, row_max):
    """argmax_v z_v == target per row of z [C, V] (the first maximum, as torch.argmax), without an argmax pass
    (a strided reduction on a vocabulary-major buffer): the target must hold the row maximum and, in the rare
    rows where another entry ties with it (the row's maximum without the target's entry is the same), be the
    first of them; rows with a NaN (torch.argmax picks the first NaN) take the argmax too, CHUNK_ELEMENTS at a
    time. z is left as it was."""
    hit = target_logit == row_max
    column = targets[:, None]
    others_max = z.scatter_(1, column, float("-inf")).amax(dim=1)
    z.scatter_(1, column, target_logit[:, None])
    exact = torch.nonzero((hit & (others_max == row_max)) | row_max.isnan()).squeeze(1)
    for rows in exact.split(max(1, CHUNK_ELEMENTS // z.shape[1])):
        hit[rows] = z[rows].argmax(dim=1) == targets[rows]
    return hit


def _reduce_(z, targets, transform, write_grad, token_stats):
    """z [C, V] final logits (math dtype; overwritten: exp(z - shift), or U with write_grad), targets [C] in
    [0, V) -> [row_logp, shift, log_sum_exp, logit_sum (+ entropy, top-1 hit with token_stats)], each [C], with
    one exp pass.

    write_grad leaves U = (onehot(targets) - softmax(z)) * dz/dx in z. The entropy -sum_v p_v log p_v =
    log S - (sum_v e_v c_v) / S with c = z - shift, e = exp(c), S = sum_v e_v."""
    slope = transform.slope(z) if write_grad else None  # taken before z is overwritten
    logit_sum, target_logit = z.sum(dim=1), z.gather(1, targets[:, None]).squeeze(1)
    row_max = z.amax(dim=1)
    top1 = _first_max_hits(z, targets, target_logit, row_max) if token_stats else None
    shift = _shift(row_max)
    sum_exp, sum_ec = _exp_sums_(z.sub_(shift[:, None]), token_stats)
    log_sum_exp = sum_exp.log()
    outs = [(target_logit - shift) - log_sum_exp, shift, log_sum_exp, logit_sum]
    if token_stats:
        outs += [log_sum_exp - sum_ec / sum_exp, top1.to(z.dtype)]
    if write_grad:
        z.div_(-sum_exp[:, None]).scatter_add_(1, targets[:, None], torch.ones_like(sum_exp[:, None]))
        if slope is not None:
            z.mul_(slope)
    return outs


def _dlogp_dx_(z, stats, targets, grad, transform):
    """In place: final logits z [C, V] -> grad[:, None] * (onehot(targets) - softmax(z)) * dz/dx, the softmax
    as exp((z - shift) - log_sum_exp) from stats [2, C] (no z - lse cancellation at large logits)."""
    slope = transform.slope(z)  # taken before z is overwritten
    z.sub_(stats[0][:, None]).sub_(stats[1][:, None]).exp_().mul_(-grad[:, None])
    z.scatter_add_(1, targets[:, None], grad[:, None])
    return z if slope is None else z.mul_(slope)


def _row_blocks(targets, vocab_size, in_place, transform):
    """Row blocks: slices (views) when every row has a target, else index tensors of the rows with a target
    (copies, CHUNK_ELEMENTS elements each). Slices worked on in place form one block of every row: every op
    there works on the buffer itself or makes [rows] vectors and bounded temporaries, and on a vocabulary-major
    buffer a row subset is a strided view, several times slower; except that softcap's dz/dx is a block-sized
    temporary (IN_PLACE_CHUNK_ELEMENTS then). Copied slices: CHUNK_ELEMENTS."""
    N = targets.shape[0]
    if not bool((targets >= 0).all()):
        return torch.nonzero(targets >= 0).squeeze(1).split(max(1, CHUNK_ELEMENTS // vocab_size))
    if in_place and transform.softcap is None:
        return [slice(0, N)]
    rows_per_chunk = max(1, (IN_PLACE_CHUNK_ELEMENTS if in_place else CHUNK_ELEMENTS) // vocab_size)
    return [slice(begin, min(begin + rows_per_chunk, N)) for begin in range(0, N, rows_per_chunk)]


def _write_rows(out, rows, values):
    """out[rows] = values: a slice converts the dtype in the copy itself (no block-sized temporary); index rows
    (blocks of CHUNK_ELEMENTS) need the dtype first."""
    out[rows] = values if isinstance(rows, slice) else values.to(out.dtype)


def _math_rows(logits, rows, dtype, in_place):
    """(the rows of logits as a math-dtype tile, whether it is a view): a view when in_place allows it (a slice
    of math-dtype logits), else a copy."""
    if in_place and isinstance(rows, slice) and logits.dtype == dtype:
        return logits[rows], True
    if isinstance(rows, slice):
        return logits[rows].to(dtype, copy=True), False
    return logits.index_select(0, rows).to(dtype), False


# ----------------------------------------------------------------------------- materialised logits

def row_logps_forward(logits, targets, *, logit_scale=1.0, softcap=None, temperature=1.0, write_grad=False,
                      grad_out=None, token_stats=False, overwrite=False):
    """logits [N, V] (raw x), targets [N] int64 (-1 = no target) -> (row_logp [N], stats [2, N], logit_sum [N])
    in the math dtype, plus (entropy [N], top1 [N] bool) with token_stats=True.

    stats = (shift, log_sum_exp): the row max of z (0 for a row of -inf) and log sum_v exp(z_v - shift), so
    lse = shift + log_sum_exp; row_backward takes the softmax from both without cancellation. Rows without a
    target give 0 everywhere. write_grad=True writes U = (onehot(t) - softmax(z)) * dz/dx into grad_out [N, V]
    (any float dtype; default: `logits` itself), 0 on rows without a target. overwrite=True lets the
    function use `logits` as scratch (its values are lost).
    """
    N, V = logits.shape
    dtype, transform = math_dtype(logits), Transform(logit_scale, softcap, temperature)
    grad = logits if grad_out is None else grad_out
    outs = torch.zeros(6 if token_stats else 4, N, device=logits.device, dtype=dtype)
    in_place = overwrite or (write_grad and grad_out is None)
    for rows in _row_blocks(targets, V, in_place and logits.dtype == dtype, transform):
        z, is_view = _math_rows(logits, rows, dtype, in_place)
        z = transform.apply_(z)
        outs[:, rows] = torch.stack(_reduce_(z, targets[rows], transform, write_grad, token_stats))
        if write_grad and not (is_view and grad is logits):
            _write_rows(grad, rows, z)
    if write_grad and not bool((targets >= 0).all()):
        grad[targets < 0] = 0
    row_logp, stats, logit_sum = outs[0], outs[1:3], outs[3]
    return (row_logp, stats, logit_sum, outs[4], outs[5].bool()) if token_stats else (row_logp, stats, logit_sum)


def row_logps_backward(logits, targets, stats, grad_rows, *, out=None, logit_scale=1.0, softcap=None,
                       temperature=1.0, overwrite=False):
    """grad [N, V] (out's dtype, default the logits dtype) = grad_rows[:, None] * (onehot(targets) - softmax(z))
    * dz/dx, with stats [2, N] from row_logps_forward. Rows with target -1 or grad_rows exactly 0 get 0.
    `out` may be `logits` itself (each row is read before it is overwritten); overwrite=True lets the function
    use `logits` as scratch.
    """
    N, V = logits.shape
    dtype, transform = math_dtype(logits), Transform(logit_scale, softcap, temperature)
    active = (targets >= 0) & (grad_rows != 0)
    grad = torch.empty_like(logits) if out is None else out
    in_place = overwrite or out is logits
    for rows in _row_blocks(torch.where(active, targets, -1), V, in_place and logits.dtype == dtype,
                            transform):
        z, is_view = _math_rows(logits, rows, dtype, in_place)
        row_grad = _dlogp_dx_(transform.apply_(z), stats[:, rows].to(dtype), targets[rows],
                              grad_rows[rows].to(dtype), transform)
        if not (is_view and grad is logits):
            _write_rows(grad, rows, row_grad)
    if not bool(active.all()):
        grad[~active] = 0
    return grad


def segment_sum(values, seq_index, num_sequences):
    """values [C, N] fp32, seq_index [N] int64 in [-1, S) (-1 = none) -> [C, S] per-sequence sums (values' dtype).

    Accumulated in fp64: index_add_ adds a sequence's tokens one after another, which in fp32 loses ~4e-4
    relative over a 1000-token response (the Triton segment_sum sums lane-wise, then as a tree).
    """
    discard = num_sequences  # tokens without a sequence go to one extra slot, dropped: no data-dependent shapes
    out = torch.zeros(values.shape[0], num_sequences + 1, device=values.device, dtype=torch.float64)
    out.index_add_(1, torch.where(seq_index >= 0, seq_index, discard), values.double())
    return out[:, :num_sequences].to(values.dtype).contiguous()


# ----------------------------------------------------------------------------- fused LM head
# Tiles of [TILE_VOCAB, TILE_ROWS] logits (2 MiB fp32; stored vocabulary-major, as W_tile @ h^T is the
# faster matmul on CPU) stay in the L2 cache between the matmul that makes them and the element-wise passes
# that consume them; a log-sum-exp runs online across vocabulary tiles.

TILE_ROWS, TILE_VOCAB = 256, 2048


class _Head:
    """The LM head with its logit transforms, tile by tile: z = softcap(scale * (h W^T + b)) / temperature."""

    def __init__(self, weight, bias, transform):
        self.dtype = math_dtype(weight)
        self.weight, self.bias, self.transform = weight, bias, transform
        self.vocab_tiles = [(v, min(v + TILE_VOCAB, weight.shape[0])) for v in range(0, weight.shape[0], TILE_VOCAB)]

    def weight_tile(self, begin, end):
        """weight[begin:end] in the math dtype (16-bit weights are upcast one tile at a time, never whole)."""
        return self.weight[begin:end].to(self.dtype)

    def logits(self, h, begin, end):
        """h [C, D] in the math dtype -> transposed logits tile [end - begin, C] (fresh, free to overwrite)."""
        w, ht = self.weight_tile(begin, end), h.t()
        x = w @ ht if self.bias is None else torch.addmm(self.bias[begin:end, None].to(self.dtype), w, ht)
        return self.transform.apply_(x)


def _targets_in_tile(targets, begin, end):
    """(rows, vocabulary offsets within the tile) of the targets that fall in vocabulary [begin, end)."""
    inside = torch.nonzero((targets >= begin) & (targets < end)).squeeze(1)
    return inside, targets[inside] - begin


def linear_logps_forward(hidden, weight, bias, rows, targets, *, logit_scale=1.0, softcap=None,
                         temperature=1.0, fp32_precision="ieee", token_stats=False):
    """hidden [N, D], weight [V, D], bias [V] | None, rows [M] int64, targets [M] int64 in [0, V)
    -> (row_logp [M], stats [2, M], logit_sum [M]) fp32, for z = softcap(scale * (h W^T + b)) / temperature;
    stats = (shift, log_sum_exp) as in row_logps_forward. token_stats=True (the twin only: the Triton kernel has
    no such output) adds (entropy [M], top1 [M] bool) as row_logps_forward's, accumulated online across the
    vocabulary tiles: sum_v e_v c_v (c = z - shift, e = exp(c)) is rescaled with the sum-exp at each new max.
    """
    head = _Head(weight, bias, Transform(logit_scale, softcap, temperature))
    M = rows.numel()
    outs = torch.zeros(6 if token_stats else 4, M, device=hidden.device, dtype=head.dtype)
    with matmul_precision(fp32_precision, hidden.device):
        for part in torch.arange(M, device=hidden.device).split(TILE_ROWS):
            h, tgt = hidden.index_select(0, rows[part]).to(head.dtype), targets[part]
            row_max = torch.full((part.numel(),), float("-inf"), device=hidden.device, dtype=head.dtype)
            sum_exp, z_sum, z_target, sum_ec, best = (torch.zeros_like(row_max) for _ in range(5))
            best_index = torch.zeros_like(tgt)
            for begin, end in head.vocab_tiles:
                z = head.logits(h, begin, end)
                inside, offsets = _targets_in_tile(tgt, begin, end)
                z_target[inside] = z[offsets, inside]
                z_sum += z.sum(dim=0)
                if token_stats:  # the first maximum (or the first NaN, as torch.argmax) wins: a later tile must be larger
                    tile_best, tile_index = z.max(dim=0)
                    better = (tile_best > best) | (tile_best.isnan() & ~best.isnan()) | (begin == 0)
                    best, best_index = torch.where(better, tile_best, best), torch.where(better, tile_index + begin,
                                                                                         best_index)
                new_max = torch.maximum(row_max, z.amax(dim=0))
                old_shift, shift = _shift(row_max), _shift(new_max)
                rescale = (row_max - shift).exp_()
                tile_sum_exp, tile_sum_ec = _exp_sums_(z.sub_(shift).t(), token_stats)
                if token_stats:
                    sum_ec = rescale * (sum_ec + (old_shift - shift) * sum_exp) + tile_sum_ec
                sum_exp = sum_exp * rescale + tile_sum_exp
                row_max = new_max
            shift, log_sum_exp = _shift(row_max), sum_exp.log()
            outs[:4, part] = torch.stack([(z_target - shift) - log_sum_exp, shift, log_sum_exp, z_sum])
            if token_stats:
                outs[4:, part] = torch.stack([log_sum_exp - sum_ec / sum_exp, (best_index == tgt).to(head.dtype)])
    row_logp, stats, logit_sum = outs[0], outs[1:3], outs[3]
    return (row_logp, stats, logit_sum, outs[4], outs[5].bool()) if token_stats else (row_logp, stats, logit_sum)


def linear_logps_backward(hidden, weight, bias, rows, targets, stats, grad_rows, *, logit_scale=1.0,
                          softcap=None, temperature=1.0, needs_hidden_grad=True, needs_weight_grad=True,
                          needs_bias_grad=True, fp32_precision="ieee"):
    """Gradients of sum_m grad_rows[m] * row_logp[m] w.r.t. hidden, weight and bias.

    Returns (grad_hidden [N, D] | None, grad_weight [V, D] | None, grad_bias [V] | None) in the input
    dtypes, accumulated in fp32; rows of hidden not in `rows` get 0. Logits tiles are recomputed.
    """
    head = _Head(weight, bias, Transform(logit_scale, softcap, temperature))
    grad_hidden = torch.zeros_like(hidden) if needs_hidden_grad else None
    grad_weight = torch.zeros_like(weight, dtype=head.dtype) if needs_weight_grad else None
    grad_bias = torch.zeros_like(bias, dtype=head.dtype) if needs_bias_grad and bias is not None else None
    with matmul_precision(fp32_precision, hidden.device):
        for part in torch.nonzero(grad_rows != 0).squeeze(1).split(TILE_ROWS):
            h, tgt = hidden.index_select(0, rows[part]).to(head.dtype), targets[part]
            g, (shift, log_sum_exp) = grad_rows[part].to(head.dtype), stats[:, part].to(head.dtype)
            grad_h = torch.zeros_like(h)
            for begin, end in head.vocab_tiles:
                z = head.logits(h, begin, end)
                slope = head.transform.slope(z)
                grad_z = z.sub_(shift).sub_(log_sum_exp).exp_().mul_(-g)  # g * (onehot - softmax), onehot below
                inside, offsets = _targets_in_tile(tgt, begin, end)
                grad_z[offsets, inside] += g[inside]
                if slope is not None:
                    grad_z.mul_(slope)
                if grad_hidden is not None:
                    grad_h.addmm_(grad_z.t(), head.weight_tile(begin, end))
                if grad_weight is not None:
                    grad_weight[begin:end].addmm_(grad_z, h)
                if grad_bias is not None:
                    grad_bias[begin:end] += grad_z.sum(dim=1)
            if grad_hidden is not None:
                grad_hidden[rows[part]] = grad_h.to(hidden.dtype)
    cast = lambda grad, like: None if grad is None else grad.to(like.dtype)
    return grad_hidden, cast(grad_weight, weight), cast(grad_bias, bias)
