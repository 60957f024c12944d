"""Matrix-product FLOPs of the LM head per scored token, counted on CPU, in units of V x D.

A TorchDispatchMode sees every aten call, so in-place and out= variants (addmm_, mm.out) are counted too
(torch's FlopCounterMode misses addmm_). One policy forward + backward and one reference forward each.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastdpo.ops import linear_sequence_logps

N, M, D, V, S = 96, 80, 128, 1000, 4  # tokens, scored tokens, hidden size, vocabulary, sequences


def _matmul_flops(name, args):
    """FLOPs of one aten matrix product given its name without a trailing '_' and its arguments."""
    shapes = [a.shape for a in args if isinstance(a, torch.Tensor)]
    if name == "mm":
        (m, k), (_, n) = shapes[:2]
        return 2 * m * k * n
    if name == "addmm":
        (m, k), (_, n) = shapes[1:3]
        return 2 * m * k * n
    if name in ("bmm", "baddbmm"):
        (b, m, k), (_, _, n) = shapes[-2:]
        return 2 * b * m * k * n
    if name in ("mv", "addmv"):
        m, k = shapes[-2]
        return 2 * m * k
    raise AssertionError(f"uncounted matrix product aten.{name}")


MATMULS = {"mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "matmul", "dot", "vdot", "addr", "linear"}


class MatmulFlops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastdpo":  # fastdpo's custom ops: count the aten calls inside them too
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **(kwargs or {}))
        name = func.overloadpacket.__name__.rstrip("_")
        if name in ("matmul", "linear"):  # composite (seen undecomposed inside a custom op): count its parts
            with self:
                return func.decompose(*args, **(kwargs or {}))
        if name in MATMULS:
            self.flops += _matmul_flops(name, args)
        return func(*args, **(kwargs or {}))


def _inputs(with_bias, frozen):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    weight = (torch.randn(V, D, generator=g) / D ** 0.5).requires_grad_(not frozen)
    bias = torch.randn(V, generator=g).requires_grad_(not frozen) if with_bias else None
    seq_index = torch.randint(0, S, (N,), generator=g)
    seq_index[torch.randperm(N, generator=g)[:N - M]] = -1
    targets = torch.where(seq_index >= 0, torch.randint(0, V, (N,), generator=g), -1)
    return hidden, weight, bias, targets, seq_index


def _per_token(mode, *, with_bias=False, frozen=False, reference=False, budget=None, token_stats=False):
    hidden, weight, bias, targets, seq_index = _inputs(with_bias, frozen)
    with MatmulFlops() as counter:
        with torch.set_grad_enabled(not reference):
            logps, *_ = linear_sequence_logps(hidden, weight, bias, targets, seq_index, S, backend="torch",
                                              head_mode=mode, head_memory_budget=budget, token_stats=token_stats)
            if not reference:
                logps.sum().backward()
    return counter.flops / (M * V * D)


# case -> (options of _per_token, bound in V x D per scored token); budget 12 rows of logits = 7 chunks of 80
CASES = {
    "stored": (dict(mode="stored"), 6.05),
    "stored, bias": (dict(mode="stored", with_bias=True), 6.05),
    "stored, 7 chunks": (dict(mode="stored"), 6.05),
    "recompute": (dict(mode="recompute"), 8.05),
    "recompute, bias, 7 chunks": (dict(mode="recompute", with_bias=True, budget=12 * V * 4), 8.05),
    "stored, frozen head": (dict(mode="stored", frozen=True), 4.05),
    "recompute, frozen head": (dict(mode="recompute", frozen=True), 6.05),
    "fused (twin)": (dict(mode="fused"), 8.05),
    "reference, stored": (dict(mode="stored", reference=True), 2.05),
    "reference, recompute, 7 chunks": (dict(mode="recompute", reference=True, budget=12 * V * 4), 2.05),
    "reference, fused (twin)": (dict(mode="fused", reference=True), 2.05),
}


@pytest.mark.parametrize("case", CASES)
def test_head_flops_per_scored_token(case, monkeypatch):
    options, bound = dict(CASES[case][0]), CASES[case][1]
    if case == "stored, 7 chunks":
        monkeypatch.setattr("fastdpo.head.CPU_HEAD_MEMORY_BUDGET", 12 * V * 4)
    counted = _per_token(options.pop("mode"), **options)
    print(f"{case}: {counted:.4f} VD per scored token (bound {bound})")
    assert bound - 0.1 <= counted <= bound  # the work is done, and no more than the bound


def test_counter_sees_in_place_and_out_variants():
    a, b, c = torch.randn(3, 4), torch.randn(4, 5), torch.zeros(3, 5)
    with MatmulFlops() as counter:
        c.addmm_(a, b)
        torch.mm(a, b, out=c)
        torch.addmm(c, a, b, out=c)
        _ = a @ b
    assert counter.flops == 4 * 2 * 3 * 4 * 5


@pytest.mark.parametrize("mode", ["stored", "recompute"])
def test_token_metrics_add_no_matrix_products(mode):
    """Entropy and top-1 hits come from the forward's row pass: the same FLOPs as without them."""
    assert _per_token(mode, token_stats=True) == _per_token(mode)
    assert _per_token(mode, reference=True, token_stats=True) == _per_token(mode, reference=True)


@pytest.mark.parametrize("mode, bound", [("stored", 6.05), ("recompute", 8.05)])
def test_vocab_parallel_head_flops(mode, bound):
    """The vocabulary-parallel head on a 1-rank group: stored keeps U from its one forward GEMM (6 VD)."""
    import torch.distributed as dist

    from fastdpo.parallel import vocab_parallel_sequence_logps

    hidden, weight, _, targets, seq_index = _inputs(with_bias=False, frozen=False)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with MatmulFlops() as counter:
            logps, _ = vocab_parallel_sequence_logps(hidden, weight, None, targets, seq_index, S,
                                                     process_group=dist.group.WORLD, backend="torch", head_mode=mode)
            logps.sum().backward()
    finally:
        dist.destroy_process_group()
    counted = counter.flops / (M * V * D)
    assert bound - 0.1 <= counted <= bound
