"""The LM head of the fused form: hidden [N, D], weight [V, D], bias [V] | None -> per-row log-probs.

Four head modes (FLOPs per scored token, V = vocabulary, D = hidden size):

  "stored"     forward X_c = H_c @ W^T (+ b) per chunk of scored rows (2VD) in fp32, then the backend's row
               function reduces X_c and writes U = d row_logp / dX (write_grad) into the kept [M, V] buffer in
               the input dtype. Backward needs no recompute: one GEMM per gradient over the whole U:
               grad_hidden = g * (U @ W), grad_weight = U^T @ (g * H), grad_bias = U^T g. Policy forward +
               backward 6VD (frozen head: 4VD).
  "recompute"  forward keeps only the per-row softmax stats; backward recomputes X_c in fp32, forms g * U
               (row_logps_backward) and runs the same two GEMMs per chunk: 8VD (frozen head: 6VD).
  "fused"      the backend's linear_logps_forward / backward (Triton fused kernels, or the PyTorch twin's
               tiles): logits never in memory.
  "auto"       "stored" when it fits head_memory_budget, else "recompute".

Without grad (the reference model) every mode but "fused" runs the forward GEMM per chunk only: 2VD, nothing
kept, chunks within the budget; on CPU with the PyTorch twin, the twin's tiled forward (the same 2VD with the
logits in L2-sized tiles: no [C, V] buffer to write, read back and fault in; 1.2-1.4x faster at 512-1024 rows
and V = 128256) unless the budget is smaller than one tile.

Precision: the row functions always see logits in the math dtype (fp32; fp64 for fp64 inputs): for 16-bit
inputs the logits GEMM accumulates in fp32 and writes fp32 (CUDA: torch.mm(..., out_dtype=torch.float32);
CPU, where torch 2.13 has no such kernel: the operands are upcast, one CPU_VOCAB_SLAB of weight rows at a time). U is kept in the input dtype. grad_hidden rows and, with one chunk, grad_weight / grad_bias come
out of one GEMM each in their final dtype; with several chunks the grad_weight partials are summed in an fp32
accumulator (fixed order) and cast once. Matrix products run under `matmul_precision` (exact fp32 or TF32 as
asked, and no reduced-precision bf16/fp16 reductions). No atomics: bitwise deterministic on a given device.

Memory (bytes beyond the inputs, s = input itemsize, f = 4 (8 for fp64), C = chunk rows): stored M V s
(+ C V f of fp32 logits for 16-bit inputs); recompute C V f (+ C V s for 16-bit inputs); reference C V f.
The budget is a fixed setting (head_memory_budget, default `default_head_memory_budget`), never the free
memory at call time, so the mode, the chunking and the bits are the same on every step.
"""
import numbers

import torch

from .torch_ops import check_fp32_precision, math_dtype, matmul_precision

HEAD_MODES = ("auto", "stored", "recompute", "fused")
CPU_HEAD_MEMORY_BUDGET = 1 << 30  # bytes
CUDA_HEAD_MEMORY_FRACTION = 1 / 8  # of the device's total memory (a property of the device: the same every step)
MIN_SCRATCH_ROWS = 64  # fp32 logits rows a 16-bit "stored" head needs beside U (fewer make the GEMMs too thin)
CPU_VOCAB_SLAB = 8192  # CPU, 16-bit inputs: the weight is upcast to fp32 this many vocabulary rows at a time


def default_head_memory_budget(device):
    """Bytes the head may hold for logits: 1 GiB on CPU, 1/8 of the device's total memory on CUDA (fixed per
    device, never the instantaneous free memory, which the caching allocator makes vary from step to step)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * CUDA_HEAD_MEMORY_FRACTION)
    return CPU_HEAD_MEMORY_BUDGET


def head_plan(*, head_mode, budget, num_rows, vocab_size, dtype):
    """(store, chunk_rows) of a GEMM head: whether U is kept, and the rows per chunk of fp32 logits."""
    itemsize, math_size = dtype.itemsize, 8 if dtype == torch.float64 else 4
    separate = itemsize != math_size  # 16-bit inputs: fp32 logits in a scratch beside U / dX
    kept = num_rows * vocab_size * itemsize
    store = head_mode == "stored" or (
        head_mode == "auto" and kept + separate * min(num_rows, MIN_SCRATCH_ROWS) * vocab_size * math_size <= budget)
    if store:
        if not separate:
            return True, max(1, num_rows)  # the GEMM writes U's buffer directly: one chunk
        return True, max(1, min(num_rows, max(MIN_SCRATCH_ROWS, (budget - kept) // (vocab_size * math_size))))
    row_bytes = vocab_size * (math_size + separate * itemsize)
    return False, max(1, budget // row_bytes)


def check_head_options(head_mode, head_memory_budget, fp32_precision, owner=""):
    """ValueError naming the option (prefixed by `owner`, e.g. "DPOConfig.") unless head_mode is a HEAD_MODES
    entry, head_memory_budget None or a positive int (bytes), fp32_precision "ieee" or "tf32"."""
    if head_mode not in HEAD_MODES:
        raise ValueError(f"{owner}head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
    if head_memory_budget is not None and (isinstance(head_memory_budget, bool)
                                           or not isinstance(head_memory_budget, numbers.Integral)
                                           or head_memory_budget <= 0):
        raise ValueError(f"{owner}head_memory_budget must be None or a positive int (bytes), "
                         f"got {head_memory_budget!r}")
    check_fp32_precision(fp32_precision)


def make_head(impl, *, head_mode, head_memory_budget, weight, num_rows, transforms, fp32_precision, needs_grad):
    """The head object for `head_mode` ("auto" resolved for num_rows scored rows and weight [V, D]).

    head_memory_budget (bytes, None = default_head_memory_budget) decides "auto" and sizes the chunks of
    "stored" / "recompute"; a "stored" head that does not fit an explicitly given budget is refused.
    """
    check_head_options(head_mode, head_memory_budget, fp32_precision)
    if head_mode == "fused":
        return FusedHead(impl, transforms, fp32_precision)
    budget = default_head_memory_budget(weight.device) if head_memory_budget is None else head_memory_budget
    stored_bytes = num_rows * weight.shape[0] * weight.element_size()
    if head_mode == "stored" and head_memory_budget is not None and needs_grad and stored_bytes > budget:
        raise ValueError(f"head_mode='stored' keeps {stored_bytes} bytes of logits, more than "
                         f"head_memory_budget={head_memory_budget}; raise the budget or use 'recompute'/'auto'")
    plan = dict(budget=budget, num_rows=num_rows, vocab_size=weight.shape[0], dtype=weight.dtype)
    store, chunk_rows = head_plan(head_mode=head_mode, **plan) if needs_grad else (False, 0)
    reference_rows = head_plan(head_mode="recompute", **plan)[1]
    return GemmHead(impl, transforms, fp32_precision, store=store, chunk_rows=chunk_rows or reference_rows,
                    reference_rows=reference_rows)


class FusedHead:
    """head_mode="fused": the backend's fused kernels (Triton) or tiles (twin); the logits never exist."""

    def __init__(self, impl, transforms, fp32_precision):
        self.impl, self.transforms, self.fp32_precision = impl, transforms, fp32_precision

    def forward(self, hidden, weight, bias, rows, targets, *, keep, token_stats=False):
        """-> (row_logp [M], logit_sum [M], tensors for backward, token stats: (entropy, top1) or None)."""
        if token_stats:
            raise ValueError("token_stats=True needs the logits rows, which head_mode='fused' never forms: use "
                             "head_mode 'auto', 'stored' or 'recompute'")
        row_logp, stats, logit_sum = self.impl.linear_logps_forward(
            hidden, weight, bias, rows, targets, fp32_precision=self.fp32_precision, **self.transforms)
        return row_logp, logit_sum, (stats,), None

    def backward(self, hidden, weight, bias, rows, targets, saved, grad_rows, needs):
        """needs = (hidden, weight, bias) flags -> (grad_hidden, grad_weight, grad_bias), None where not needed."""
        (stats,) = saved
        return self.impl.linear_logps_backward(
            hidden, weight, bias, rows, targets, stats, grad_rows, needs_hidden_grad=needs[0],
            needs_weight_grad=needs[1], needs_bias_grad=needs[2], fp32_precision=self.fp32_precision,
            **self.transforms)


class Products:
    """The head's matrix products: input-dtype operands, fp32 accumulation, results in the math dtype where
    the row math or a sum of partials needs them (see the module docstring for the CPU fallback).

    Logits buffers are vocabulary-major (a [C, V] view of [V, C] memory) on CPU when the backend's row
    functions take any strides (impl.VOCAB_MAJOR_LOGITS: the PyTorch twin): oneDNN computes W @ h^T ~1.3x
    faster than h @ W^T at LM-head shapes (C and D in the hundreds, V in the ten thousands). Elsewhere they
    are row-major [C, V] (the Triton row kernels read contiguous rows)."""

    def __init__(self, weight, impl=None):
        self.math = math_dtype(weight)
        self.native = weight.dtype == self.math  # fp32 / fp64 inputs: every product is already in the math dtype
        self.out_dtype = not self.native and weight.device.type == "cuda"
        self.vocab_major = weight.device.type == "cpu" and getattr(impl, "VOCAB_MAJOR_LOGITS", False)
        self.vocab_size, self.device = weight.shape[0], weight.device

    def buffer(self, num_rows, dtype, storage=None):
        """An uninitialised [num_rows, V] logits buffer in `dtype`, laid out as described above; storage: a flat
        tensor of at least num_rows * V elements to take the memory from (one scratch for every chunk)."""
        if storage is None:
            storage = torch.empty(num_rows * self.vocab_size, device=self.device, dtype=dtype)
        flat = storage[:num_rows * self.vocab_size]
        return flat.view(self.vocab_size, num_rows).t() if self.vocab_major else flat.view(num_rows, self.vocab_size)

    def mm(self, a, b, out=None):
        """a @ b in the math dtype (into out when given)."""
        if self.native:
            return torch.mm(a, b, out=out)
        into = {} if out is None else {"out": out}
        if self.out_dtype:
            return torch.mm(a, b, out_dtype=self.math, **into)
        return torch.mm(a.to(self.math), b.to(self.math), **into)

    def logits(self, h, weight, out):
        """h [C, D] @ weight.T -> out [C, V] (a `buffer` in the math dtype): one GEMM, except for 16-bit inputs
        on CPU, whose weight is upcast one slab of CPU_VOCAB_SLAB rows at a time (a bounded fp32 copy)."""
        if not self.vocab_major and (self.native or self.out_dtype):
            return self.mm(h, weight.t(), out=out)
        slab = weight.shape[0] if self.native else CPU_VOCAB_SLAB
        for begin in range(0, weight.shape[0], slab):
            end = min(begin + slab, weight.shape[0])
            if self.vocab_major:
                self.mm(weight[begin:end], h.t(), out=out[:, begin:end].t())
            else:
                self.mm(h, weight[begin:end].t(), out=out[:, begin:end])
        return out

    def add_mm_(self, total, a, b):
        """total (math dtype) += a @ b, accumulated in the math dtype."""
        if self.out_dtype:
            return torch.addmm(total, a, b, out_dtype=self.math, out=total)
        return total.addmm_(a.to(self.math), b.to(self.math))


class GemmHead:
    """head_mode "stored" / "recompute": GEMMs by torch, row work by the backend's row functions."""

    def __init__(self, impl, transforms, fp32_precision, *, store, chunk_rows, reference_rows):
        self.impl, self.transforms, self.fp32_precision = impl, transforms, fp32_precision
        self.store, self.chunk_rows, self.reference_rows = store, chunk_rows, reference_rows

    @staticmethod
    def _chunks(num_rows, chunk_rows):
        """Slices of the scored rows, chunk_rows at a time (plain ints: no host sync)."""
        return [slice(begin, min(begin + chunk_rows, num_rows)) for begin in range(0, num_rows, chunk_rows)]

    @staticmethod
    def _logits(products, hidden, weight, bias, rows, out):
        """X = hidden[rows] @ W^T (+ b) written into out [C, V] in the math dtype (fp32 accumulation)."""
        x = products.logits(hidden.index_select(0, rows), weight, out)
        return x if bias is None else x.add_(bias)

    def forward(self, hidden, weight, bias, rows, targets, *, keep, token_stats=False):
        """-> (row_logp [M], logit_sum [M], tensors for backward: (U,) stored, (stats,) recompute, () if not keep,
        (entropy [M], top1 [M] bool) with token_stats, else None)."""
        M, V = rows.numel(), weight.shape[0]
        products, store = Products(weight, self.impl), self.store and keep
        if products.vocab_major and not keep and self.reference_rows >= min(M, self.impl.TILE_ROWS):
            # no grad on CPU (module docstring); a tile has at most TILE_ROWS rows: within the budget
            row_logp, _, logit_sum, *metrics = self.impl.linear_logps_forward(
                hidden, weight, bias, rows, targets, fp32_precision=self.fp32_precision, token_stats=token_stats,
                **self.transforms)
            return row_logp, logit_sum, (), tuple(metrics) if token_stats else None
        chunk_rows = self.chunk_rows if keep else self.reference_rows
        kept = products.buffer(M, hidden.dtype) if store else None  # U, input dtype
        in_kept = store and products.native  # the GEMM writes U's buffer directly (one chunk)
        scratch = None if in_kept else torch.empty(min(M, chunk_rows) * V, device=hidden.device, dtype=products.math)
        row_logp, logit_sum, entropy = (torch.empty(M, device=hidden.device, dtype=products.math) for _ in range(3))
        stats = torch.empty(2, M, device=hidden.device, dtype=products.math)
        top1 = torch.empty(M, device=hidden.device, dtype=torch.bool) if token_stats else None
        with matmul_precision(self.fp32_precision, hidden.device):
            for part in self._chunks(M, chunk_rows):
                out = kept if in_kept else products.buffer(part.stop - part.start, products.math, scratch)
                logits = self._logits(products, hidden, weight, bias, rows[part], out)
                grad_out = kept[part] if store and not in_kept else None
                outs = self.impl.row_logps_forward(logits, targets[part], write_grad=store, grad_out=grad_out,
                                                   token_stats=token_stats, overwrite=True, **self.transforms)
                row_logp[part], stats[:, part], logit_sum[part] = outs[:3]
                if token_stats:
                    entropy[part], top1[part] = outs[3:]
        saved = ((kept,) if store else (stats,)) if keep else ()
        return row_logp, logit_sum, saved, (entropy, top1) if token_stats else None

    def backward(self, hidden, weight, bias, rows, targets, saved, grad_rows, needs):
        """needs = (hidden, weight, bias) flags -> (grad_hidden, grad_weight, grad_bias), None where not needed."""
        with matmul_precision(self.fp32_precision, hidden.device):
            if self.store:
                return self._stored_backward(hidden, weight, bias, rows, saved[0], grad_rows, needs)
            return self._recompute_backward(hidden, weight, bias, rows, targets, saved[0], grad_rows, needs)

    def _stored_backward(self, hidden, weight, bias, rows, u, g, needs):
        """One GEMM per gradient over the whole U [M, V]; g [M] moves onto the smaller operands."""
        products = Products(weight, self.impl)
        grad_hidden = grad_weight = grad_bias = None
        h = hidden.index_select(0, rows)
        if needs[0]:
            # CPU 16-bit: the product is rounded to the input dtype once before the g scale (no fp32-output GEMM)
            grad_h = products.mm(u, weight) if products.native or products.out_dtype else torch.mm(u, weight)
            grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, (grad_h.to(g.dtype) * g[:, None]).to(h.dtype))
        if needs[1]:
            grad_weight = u.t() @ (h.to(g.dtype) * g[:, None]).to(h.dtype)  # final dtype, no round trip
        if needs[2] and bias is not None:
            grad_bias = u.t() @ g.to(u.dtype)
        return grad_hidden, grad_weight, grad_bias

    def _recompute_backward(self, hidden, weight, bias, rows, targets, stats, grad_rows, needs):
        """Per chunk: X_c recomputed in the math dtype, dX_c = g * U_c (input dtype), grad_hidden[rows_c] = dX_c @ W,
        grad_weight (+)= dX_c^T @ H_c, grad_bias (+)= column sums of dX_c."""
        M, V = rows.numel(), weight.shape[0]
        products, chunks = Products(weight, self.impl), self._chunks(M, self.chunk_rows)
        scratch_size = min(M, self.chunk_rows) * V
        scratch = torch.empty(scratch_size, device=hidden.device, dtype=products.math)
        dx_scratch = None if products.native else hidden.new_empty(scratch_size)  # native: dX overwrites X
        grad_hidden = torch.zeros_like(hidden) if needs[0] else None
        one_chunk, needs_bias = len(chunks) == 1, needs[2] and bias is not None
        total_weight = None if one_chunk or not needs[1] else torch.zeros(weight.shape, device=weight.device,
                                                                          dtype=products.math)
        total_bias = torch.zeros(V, device=weight.device, dtype=products.math) if needs_bias else None
        grad_weight = None
        for part in chunks:
            n = part.stop - part.start
            logits = self._logits(products, hidden, weight, bias, rows[part], products.buffer(n, products.math,
                                                                                              scratch))
            dx_out = logits if products.native else products.buffer(n, hidden.dtype, dx_scratch)
            dx = self.impl.row_logps_backward(logits, targets[part], stats[:, part], grad_rows[part], out=dx_out,
                                              overwrite=True, **self.transforms)
            h = hidden.index_select(0, rows[part])
            if needs[0]:
                grad_hidden.index_copy_(0, rows[part], dx @ weight)  # each row once: final dtype
            if needs[1] and one_chunk:
                grad_weight = dx.t() @ h  # final dtype, no round trip
            elif needs[1]:
                products.add_mm_(total_weight, dx.t(), h)
            if needs_bias:
                total_bias += dx.sum(dim=0, dtype=products.math)
        if total_weight is not None:
            grad_weight = total_weight.to(weight.dtype)
        elif needs[1] and grad_weight is None:  # no scored row
            grad_weight = torch.zeros_like(weight)
        grad_bias = total_bias.to(bias.dtype) if needs_bias else None
        return grad_hidden, grad_weight, grad_bias
