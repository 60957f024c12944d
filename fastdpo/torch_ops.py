"""PyTorch twin of the Triton launchers in `fastdpo.kernels`: same signatures, same semantics.

It serves CPU users and is the reference the kernels are checked against. Work is chunked over rows so
that no fp32 [N, V] tensor is ever built: peak extra memory is O(CHUNK_ELEMENTS) + O(N) (+ an fp32
weight-gradient accumulator for the fused head). Only rows with a target are touched; rows whose
upstream gradient is exactly 0 are skipped in backward. Math is fp32 (fp64 for fp64 inputs, so that
`torch.autograd.gradcheck` can check it).
"""
import torch

CHUNK_ELEMENTS = 1 << 22  # fp32 elements of one [rows, V] working tile (16 MiB)


def _math_dtype(tensor):
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _chunks(index, vocab_size):
    rows_per_chunk = max(1, CHUNK_ELEMENTS // vocab_size)
    return index.split(rows_per_chunk)


def _log_sum_exp_(z):
    """Row-wise logsumexp of fp32 z [C, V]; overwrites z with exp(z - rowmax)."""
    row_max = z.amax(dim=1, keepdim=True)
    shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    return (shift + z.sub_(shift).exp_().sum(dim=1, keepdim=True).log_()).squeeze(1)


def _onehot_minus_softmax_(z, lse, targets, grad):
    """In place: z [C, V] fp32 logits -> grad[:, None] * (onehot(targets) - softmax(z))."""
    z.sub_(lse[:, None]).exp_().mul_(-grad[:, None])
    return z.scatter_add_(1, targets[:, None], grad[:, None])


# ----------------------------------------------------------------------------- materialised logits

def row_logps_forward(logits, targets):
    """logits [N, V], targets [N] int64 (-1 = no target) -> (target_logit, lse, logit_sum) [N] fp32."""
    N, V = logits.shape
    dtype = _math_dtype(logits)
    target_logit, lse, logit_sum = (torch.zeros(N, device=logits.device, dtype=dtype) for _ in range(3))
    for rows in _chunks(torch.nonzero(targets >= 0).squeeze(1), V):
        z = logits.index_select(0, rows).to(dtype)
        target_logit[rows] = z.gather(1, targets[rows, None]).squeeze(1)
        logit_sum[rows] = z.sum(dim=1)
        lse[rows] = _log_sum_exp_(z)
    return target_logit, lse, logit_sum


def row_logps_backward(logits, targets, lse, grad_rows, out=None):
    """grad_logits [N, V] (logits dtype) = grad_rows * (onehot(targets) - softmax(logits)); 0 elsewhere.

    `out` may be `logits` itself: each row is read before it is overwritten.
    """
    N, V = logits.shape
    active = (targets >= 0) & (grad_rows != 0)
    grad = torch.empty_like(logits) if out is None else out
    for rows in _chunks(torch.nonzero(active).squeeze(1), V):
        z = logits.index_select(0, rows).to(lse.dtype)
        grad[rows] = _onehot_minus_softmax_(z, lse[rows], targets[rows], grad_rows[rows]).to(grad.dtype)
    grad[~active] = 0
    return grad


def segment_sum(values, seq_index, num_sequences):
    """values [C, N] fp32, seq_index [N] int64 in [-1, S) (-1 = none) -> [C, S] fp32 per-sequence sums."""
    keep = seq_index >= 0
    out = torch.zeros(values.shape[0], num_sequences, device=values.device, dtype=values.dtype)
    return out.index_add_(1, seq_index[keep], values[:, keep])


# ----------------------------------------------------------------------------- fused LM head
# Tiles of [TILE_VOCAB, TILE_ROWS] logits (2 MiB fp32; stored vocabulary-major, as W_tile @ h^T is the
# faster matmul on CPU) stay in the L2 cache between the matmul that makes them and the element-wise passes
# that consume them; a log-sum-exp runs online across vocabulary tiles.

TILE_ROWS, TILE_VOCAB = 256, 2048


class _Head:
    """The LM head with its logit transforms, tile by tile: z = softcap(scale * (h W^T + b)) / temperature."""

    def __init__(self, weight, bias, logit_scale, softcap, temperature):
        self.dtype = _math_dtype(weight)
        self.weight = weight.to(self.dtype)
        self.bias = None if bias is None else bias.to(self.dtype)
        self.logit_scale, self.softcap, self.temperature = logit_scale, softcap, temperature
        self.vocab_tiles = [(v, min(v + TILE_VOCAB, weight.shape[0])) for v in range(0, weight.shape[0], TILE_VOCAB)]

    def logits(self, h, begin, end):
        """h [C, D] in the math dtype -> transposed logits tile [end - begin, C] (fresh, free to overwrite)."""
        w, ht = self.weight[begin:end], h.t()
        z = w @ ht if self.bias is None else torch.addmm(self.bias[begin:end, None], w, ht)
        if self.logit_scale != 1.0:
            z.mul_(self.logit_scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        if self.temperature != 1.0:
            z.div_(self.temperature)
        return z

    def chain_(self, grad_z, z):
        """In place: gradient w.r.t. the final logits tile z -> gradient w.r.t. h W^T + b."""
        if self.softcap is not None:
            tanh = z * (self.temperature / self.softcap)
            grad_z.mul_(tanh.square_().neg_().add_(1.0))
        scale = self.logit_scale / self.temperature
        return grad_z.mul_(scale) if scale != 1.0 else grad_z


def _targets_in_tile(targets, begin, end):
    """(rows, vocabulary offsets within the tile) of the targets that fall in vocabulary [begin, end)."""
    inside = torch.nonzero((targets >= begin) & (targets < end)).squeeze(1)
    return inside, targets[inside] - begin


def linear_logps_forward(hidden, weight, bias, rows, targets, *, logit_scale=1.0, softcap=None,
                         temperature=1.0):
    """hidden [N, D], weight [V, D], bias [V] | None, rows [M] int64, targets [M] int64 in [0, V)
    -> (target_logit, lse, logit_sum), each [M] fp32, for z = softcap(scale * (h W^T + b)) / temperature.
    """
    head = _Head(weight, bias, logit_scale, softcap, temperature)
    M = rows.numel()
    target_logit, lse, logit_sum = (torch.zeros(M, device=hidden.device, dtype=head.dtype) for _ in range(3))
    for part in torch.arange(M, device=hidden.device).split(TILE_ROWS):
        h, tgt = hidden.index_select(0, rows[part]).to(head.dtype), targets[part]
        row_max = torch.full_like(lse[part], float("-inf"))
        sum_exp, z_sum, z_target = torch.zeros_like(row_max), torch.zeros_like(row_max), torch.zeros_like(row_max)
        for begin, end in head.vocab_tiles:
            z = head.logits(h, begin, end)
            inside, offsets = _targets_in_tile(tgt, begin, end)
            z_target[inside] = z[offsets, inside]
            z_sum += z.sum(dim=0)
            new_max = torch.maximum(row_max, z.amax(dim=0))
            shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            sum_exp = sum_exp * (row_max - shift).exp_() + z.sub_(shift).exp_().sum(dim=0)
            row_max = new_max
        shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        target_logit[part], logit_sum[part], lse[part] = z_target, z_sum, shift + sum_exp.log()
    return target_logit, lse, logit_sum


def linear_logps_backward(hidden, weight, bias, rows, targets, lse, grad_rows, *, logit_scale=1.0,
                          softcap=None, temperature=1.0, needs_hidden_grad=True, needs_weight_grad=True,
                          needs_bias_grad=True):
    """Gradients of sum_m grad_rows[m] * (z[m, targets[m]] - lse[m]) w.r.t. hidden, weight and bias.

    Returns (grad_hidden [N, D] | None, grad_weight [V, D] | None, grad_bias [V] | None) in the input
    dtypes, accumulated in fp32; rows of hidden not in `rows` get 0. Logits tiles are recomputed.
    """
    head = _Head(weight, bias, logit_scale, softcap, temperature)
    grad_hidden = torch.zeros_like(hidden) if needs_hidden_grad else None
    grad_weight = torch.zeros_like(head.weight) if needs_weight_grad else None
    grad_bias = torch.zeros_like(head.bias) if needs_bias_grad and bias is not None else None
    for part in torch.nonzero(grad_rows != 0).squeeze(1).split(TILE_ROWS):
        h, tgt, g, row_lse = hidden.index_select(0, rows[part]).to(head.dtype), targets[part], grad_rows[part], lse[part]
        grad_h = torch.zeros_like(h)
        for begin, end in head.vocab_tiles:
            z = head.logits(h, begin, end)
            grad_z = z.clone() if softcap is not None else z  # soft-capping's chain rule needs z itself
            grad_z.sub_(row_lse).exp_().mul_(-g)  # g * (onehot - softmax), onehot below
            inside, offsets = _targets_in_tile(tgt, begin, end)
            grad_z[offsets, inside] += g[inside]
            head.chain_(grad_z, z)
            if grad_hidden is not None:
                grad_h.addmm_(grad_z.t(), head.weight[begin:end])
            if grad_weight is not None:
                grad_weight[begin:end].addmm_(grad_z, h)
            if grad_bias is not None:
                grad_bias[begin:end] += grad_z.sum(dim=1)
        if grad_hidden is not None:
            grad_hidden[rows[part]] = grad_h.to(hidden.dtype)
    cast = lambda grad, like: None if grad is None else grad.to(like.dtype)
    return grad_hidden, cast(grad_weight, weight), cast(grad_bias, bias)
