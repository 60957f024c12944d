"""The LM head of the fused form: hidden [N, D], weight [V, D], bias [V] | None -> per-row log-probs.

Four head modes (FLOPs per scored token, V = vocabulary, D = hidden size):

  "stored"     forward X_c = H_c @ W^T (+ b) per chunk of scored rows (2VD), then the backend's row
               function reduces X and overwrites it in place with U = d row_logp / dX (write_grad). Backward
               needs no recompute: grad_hidden = g * (U @ W), grad_weight = U^T @ (g * H), grad_bias = U^T g.
               Policy forward + backward 6VD (frozen head: 4VD). Keeps U: M x V in the input dtype.
  "recompute"  forward keeps only the per-row log-sum-exp; backward recomputes X_c, forms g * U in place
               (row_logps_backward) and runs the same two GEMMs: 8VD (frozen head: 6VD). Keeps one
               [chunk, V] working buffer.
  "fused"      the backend's linear_logps_forward / backward (Triton fused kernels, or the PyTorch twin's
               tiles): logits never in memory.
  "auto"       "stored" when M x V x itemsize fits head_memory_budget, else "recompute".

Without grad (the reference model) every mode but "fused" runs the forward GEMM per chunk only: 2VD, nothing
kept. Matrix products are plain torch matmuls (cuBLAS on CUDA) in the input dtype with fp32 accumulation;
grad_weight accumulates in fp32 across chunks in a fixed order, grad_bias likewise: no atomics, bitwise
deterministic on a given device.
"""
import torch

from .torch_ops import check_fp32_precision, math_dtype, matmul_precision

HEAD_MODES = ("auto", "stored", "recompute", "fused")
CPU_HEAD_MEMORY_BUDGET = 256 << 20  # bytes
CUDA_FREE_MEMORY_FRACTION = 0.25  # of the free device memory at call time (torch.cuda.mem_get_info)


def default_head_memory_budget(device):
    """Bytes the head may keep for logits: 256 MiB on CPU, a quarter of the free memory on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_MEMORY_FRACTION)
    return CPU_HEAD_MEMORY_BUDGET


def make_head(impl, *, head_mode, head_memory_budget, weight, num_rows, transforms, fp32_precision, needs_grad):
    """The head object for `head_mode` ("auto" resolved for num_rows scored rows and weight [V, D]).

    head_memory_budget (bytes, None = default_head_memory_budget) decides "auto" and sizes the chunks of
    "stored" / "recompute"; a "stored" head that does not fit an explicitly given budget is refused.
    """
    if head_mode not in HEAD_MODES:
        raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
    if head_memory_budget is not None and (isinstance(head_memory_budget, bool)
                                           or not isinstance(head_memory_budget, int) or head_memory_budget <= 0):
        raise ValueError(f"head_memory_budget must be None or a positive int (bytes), got {head_memory_budget!r}")
    check_fp32_precision(fp32_precision)
    if head_mode == "fused":
        return FusedHead(impl, transforms, fp32_precision)
    budget = default_head_memory_budget(weight.device) if head_memory_budget is None else head_memory_budget
    stored_bytes = num_rows * weight.shape[0] * weight.element_size()
    if head_mode == "stored" and head_memory_budget is not None and needs_grad and stored_bytes > budget:
        raise ValueError(f"head_mode='stored' keeps {stored_bytes} bytes of logits, more than "
                         f"head_memory_budget={head_memory_budget}; raise the budget or use 'recompute'/'auto'")
    store = head_mode == "stored" or (head_mode == "auto" and stored_bytes <= budget)
    chunk_rows = max(1, budget // (weight.shape[0] * weight.element_size()))
    return GemmHead(impl, transforms, fp32_precision, store=store, chunk_rows=chunk_rows)


class FusedHead:
    """head_mode="fused": the backend's fused kernels (Triton) or tiles (twin); the logits never exist."""

    def __init__(self, impl, transforms, fp32_precision):
        self.impl, self.transforms, self.fp32_precision = impl, transforms, fp32_precision

    def forward(self, hidden, weight, bias, rows, targets, *, keep):
        """-> (row_logp [M], logit_sum [M], tensors for backward)."""
        row_logp, lse, logit_sum = self.impl.linear_logps_forward(
            hidden, weight, bias, rows, targets, fp32_precision=self.fp32_precision, **self.transforms)
        return row_logp, logit_sum, (lse,)

    def backward(self, hidden, weight, bias, rows, targets, saved, grad_rows, needs):
        """needs = (hidden, weight, bias) flags -> (grad_hidden, grad_weight, grad_bias), None where not needed."""
        (lse,) = saved
        return self.impl.linear_logps_backward(
            hidden, weight, bias, rows, targets, lse, grad_rows, needs_hidden_grad=needs[0],
            needs_weight_grad=needs[1], needs_bias_grad=needs[2], fp32_precision=self.fp32_precision,
            **self.transforms)


class GemmHead:
    """head_mode "stored" / "recompute": GEMMs by torch, row work by the backend's row functions."""

    def __init__(self, impl, transforms, fp32_precision, *, store, chunk_rows):
        self.impl, self.transforms, self.fp32_precision = impl, transforms, fp32_precision
        self.store, self.chunk_rows = store, chunk_rows

    def _chunks(self, num_rows):
        """Slices of the scored rows, chunk_rows at a time (plain ints: no host sync)."""
        return [slice(begin, min(begin + self.chunk_rows, num_rows)) for begin in range(0, num_rows, self.chunk_rows)]

    def _logits(self, hidden, weight, bias, rows, out):
        """X = hidden[rows] @ W^T (+ b) written into out [C, V] (input dtype, fp32 accumulation)."""
        h = hidden.index_select(0, rows)
        if bias is None:
            return torch.mm(h, weight.t(), out=out)
        return torch.addmm(bias, h, weight.t(), out=out)

    def forward(self, hidden, weight, bias, rows, targets, *, keep):
        """-> (row_logp [M], logit_sum [M], tensors for backward: (U,) stored, (lse,) recompute, () if not keep)."""
        M, V = rows.numel(), weight.shape[0]
        store = self.store and keep
        buffer = hidden.new_empty(M if store else min(M, self.chunk_rows), V)
        row_logp, logit_sum, lse = (torch.empty(M, device=hidden.device, dtype=math_dtype(hidden)) for _ in range(3))
        with matmul_precision(self.fp32_precision, hidden.device):
            for part in self._chunks(M):
                out = buffer[part] if store else buffer[:part.stop - part.start]
                logits = self._logits(hidden, weight, bias, rows[part], out)
                row_logp[part], lse[part], logit_sum[part] = self.impl.row_logps_forward(
                    logits, targets[part], write_grad=store, **self.transforms)
        saved = ((buffer,) if store else (lse,)) if keep else ()
        return row_logp, logit_sum, saved

    def backward(self, hidden, weight, bias, rows, targets, saved, grad_rows, needs):
        """needs = (hidden, weight, bias) flags -> (grad_hidden, grad_weight, grad_bias), None where not needed.

        Per chunk c, dX_c = g_c * U_c: grad_hidden[rows_c] = dX_c @ W, grad_weight += dX_c^T @ H_c,
        grad_bias += the column sums of dX_c. Stored mode moves g onto the smaller operands instead of U.
        """
        M, (V, D) = rows.numel(), weight.shape
        grad_hidden = torch.zeros_like(hidden) if needs[0] else None
        grad_weight = grad_bias = None
        buffer = None if self.store else hidden.new_empty(min(M, self.chunk_rows), V)
        with matmul_precision(self.fp32_precision, hidden.device):
            for part in self._chunks(M):
                h, g = hidden.index_select(0, rows[part]), grad_rows[part]
                if self.store:
                    u, h_for_weight = saved[0][part], (h.to(g.dtype) * g[:, None]).to(h.dtype)
                else:
                    logits = self._logits(hidden, weight, bias, rows[part], buffer[:part.stop - part.start])
                    u = self.impl.row_logps_backward(logits, targets[part], saved[0][part], g, out=logits,
                                                     **self.transforms)
                    h_for_weight = h
                if grad_hidden is not None:
                    grad_h = u @ weight
                    if self.store:
                        grad_h = (grad_h.to(g.dtype) * g[:, None]).to(h.dtype)
                    grad_hidden.index_copy_(0, rows[part], grad_h)
                if needs[1]:
                    grad_weight = _accumulate(grad_weight, u.t() @ h_for_weight, g.dtype)
                if needs[2] and bias is not None:
                    bias_part = u.t() @ g.to(u.dtype) if self.store else u.sum(dim=0, dtype=g.dtype)
                    grad_bias = _accumulate(grad_bias, bias_part, g.dtype)
        grad_weight = _finish(grad_weight, needs[1], (V, D), weight)
        grad_bias = _finish(grad_bias, needs[2] and bias is not None, (V,), weight)
        return grad_hidden, grad_weight, grad_bias


def _accumulate(total, part, dtype):
    """total + part in dtype (fp32; fp64 for fp64 inputs), total None for the first chunk; fixed order."""
    return part.to(dtype) if total is None else total.add_(part)


def _finish(total, needed, shape, like):
    """The accumulated gradient in like's dtype (zeros when no chunk contributed), None when not needed."""
    if not needed:
        return None
    return like.new_zeros(shape) if total is None else total.to(like.dtype)
