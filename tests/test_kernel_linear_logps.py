"""kernels/linear_logps.py: fused LM-head log-probs (Triton interpreter on CPU, float64 references).

Small shapes with D and V that are not multiples of the tiles; the launchers' ``blocks`` override
shrinks the tiles (same kernels) so the interpreter stays fast and many vocab splits / token tiles occur.
"""

import math

import pytest
import torch


from fastdpo.kernels.linear_logps import linear_logps_backward, linear_logps_forward

BLOCKS = (16, 32, 16)  # (BLOCK_M, BLOCK_V, BLOCK_D); the interpreter needs dot tiles >= 16
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
CONFIGS = {
    "plain": dict(bias=False, logit_scale=1.0, softcap=None, temperature=1.0),
    "scale-temperature": dict(bias=True, logit_scale=1.4, softcap=None, temperature=0.6),
    "full": dict(bias=True, logit_scale=0.7, softcap=3.0, temperature=0.8),
}


def make_inputs(dtype, N=37, D=48, V=203, M=19, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * D ** -0.5 * 3).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    rows = torch.randperm(N, generator=g)[:M]  # unsorted subset: most positions ignored
    targets = torch.randint(0, V, (M,), generator=g)
    targets[0], targets[1] = 0, V - 1  # first / last vocab column (tile edges)
    grad_rows = torch.randn(M, generator=g)
    grad_rows[::3] = 0.0
    return hidden, weight, b, rows, targets, grad_rows


def reference(hidden, weight, bias, rows, targets, grad_rows, logit_scale, softcap, temperature):
    """float64 (row_logp, lse, logit_sum) and autograd gradients of sum_m g[m] * row_logp[m]."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    b = bias.double().requires_grad_() if bias is not None else None
    y = h[rows] @ w.T
    if b is not None:
        y = y + b
    y = logit_scale * y
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    z = y / temperature
    lse = torch.logsumexp(z, dim=-1)
    tgt = z.gather(1, targets[:, None])[:, 0]
    (grad_rows.double() * (tgt - lse)).sum().backward()
    return ((tgt - lse).detach(), lse.detach(), z.sum(-1).detach(),
            h.grad, w.grad, None if b is None else b.grad)


def check(actual, expected, dtype, what):
    assert actual.dtype == dtype, what
    tol = TOL[dtype]
    atol = tol["atol"] * max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double(), expected, rtol=tol["rtol"], atol=atol, msg=what)


@pytest.mark.parametrize("dtype,D", [(torch.float32, 48), (torch.bfloat16, 80)])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_matches_float64_reference(dtype, D, cfg):
    c = CONFIGS[cfg]
    hidden, weight, bias, rows, targets, grad_rows = make_inputs(dtype, D=D, bias=c["bias"])
    kw = dict(logit_scale=c["logit_scale"], softcap=c["softcap"], temperature=c["temperature"])
    logp, lse, lsum = linear_logps_forward(hidden, weight, bias, rows, targets, blocks=BLOCKS, **kw)
    r_logp, r_lse, r_lsum, *_ = reference(hidden, weight, bias, rows, targets, grad_rows, **kw)
    # fp32 outputs whatever the input dtype; bf16 inputs are exact in float64, so the
    # reference error is only the kernel's fp32 arithmetic -> fp32 tolerance for both
    for a, e, name in ((logp, r_logp, "row_logp"), (lse.sum(0), r_lse, "lse"), (lsum, r_lsum, "logit_sum")):
        check(a, e, torch.float32, name)


@pytest.mark.parametrize("programs", [1, 7])
def test_forward_grouped_launch_order(monkeypatch, programs):
    # 3 token tiles in launch groups of 2 (the last group partial) x 1 or several vocab splits
    import fastdpo.kernels.linear_logps as mod
    monkeypatch.setattr(mod, "FWD_GROUP_M", 2)
    hidden, weight, bias, rows, targets, grad_rows = make_inputs(torch.float32, N=50, M=40)
    kw = dict(logit_scale=1.0, softcap=None, temperature=1.0)
    out = linear_logps_forward(hidden, weight, bias, rows, targets, blocks=BLOCKS, target_programs=programs, **kw)
    ref = reference(hidden, weight, bias, rows, targets, grad_rows, **kw)
    for a, e, name in zip((out[0], out[1].sum(0), out[2]), ref, ("row_logp", "lse", "logit_sum")):
        check(a, e, torch.float32, name)


@pytest.mark.parametrize("dtype,D", [(torch.float32, 48), (torch.bfloat16, 80)])
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("programs", [None, 1], ids=["splits", "one_split"])
def test_backward_matches_float64_reference(dtype, D, cfg, programs):
    c = CONFIGS[cfg]
    hidden, weight, bias, rows, targets, grad_rows = make_inputs(dtype, D=D, bias=c["bias"], M=35, N=41)
    grad_rows[:BLOCKS[0]] = 0.0  # a whole token tile with zero grad is skipped
    kw = dict(logit_scale=c["logit_scale"], softcap=c["softcap"], temperature=c["temperature"])
    _, lse, _ = linear_logps_forward(hidden, weight, bias, rows, targets, blocks=BLOCKS, **kw)
    gh, gw, gb = linear_logps_backward(hidden, weight, bias, rows, targets, lse, grad_rows, blocks=BLOCKS,
                                       target_programs=programs, needs_hidden_grad=True,
                                       needs_weight_grad=True, needs_bias_grad=True, **kw)
    *_, r_gh, r_gw, r_gb = reference(hidden, weight, bias, rows, targets, grad_rows, **kw)
    assert gh.shape == hidden.shape and gw.shape == weight.shape
    check(gh, r_gh, dtype, "grad_hidden")
    check(gw, r_gw, dtype, "grad_weight")
    if bias is None:
        assert gb is None
    else:
        check(gb, r_gb, dtype, "grad_bias")
    unused = torch.ones(hidden.shape[0], dtype=torch.bool)
    unused[rows] = False
    assert torch.count_nonzero(gh[unused]) == 0  # positions not in `rows` get exactly 0
    skipped = rows[grad_rows == 0]
    assert torch.count_nonzero(gh[skipped]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shipped_block_sizes(dtype):
    # the production tiles (BLOCKS) in the interpreter: one or two programs per pass on a tiny problem
    hidden, weight, bias, rows, targets, grad_rows = make_inputs(dtype, N=30, D=40, V=150, M=21)
    kw = dict(logit_scale=0.8, softcap=5.0, temperature=1.2)
    logp, lse, lsum = linear_logps_forward(hidden, weight, bias, rows, targets, **kw)
    gh, gw, gb = linear_logps_backward(hidden, weight, bias, rows, targets, lse, grad_rows, **kw)
    ref = reference(hidden, weight, bias, rows, targets, grad_rows, **kw)
    for a, e, name in zip((logp, lse.sum(0), lsum), ref[:3], ("row_logp", "lse", "logit_sum")):
        check(a, e, torch.float32, name)
    for a, e, name in zip((gh, gw, gb), ref[3:], ("grad_hidden", "grad_weight", "grad_bias")):
        check(a, e, dtype, name)


def test_needs_flags_and_zero_grads():
    hidden, weight, bias, rows, targets, grad_rows = make_inputs(torch.float32, M=12)
    kw = dict(logit_scale=1.3, softcap=None, temperature=1.0)
    _, lse, _ = linear_logps_forward(hidden, weight, bias, rows, targets, blocks=BLOCKS, **kw)
    *_, r_gh, r_gw, r_gb = reference(hidden, weight, bias, rows, targets, grad_rows, **kw)
    run = lambda g, **f: linear_logps_backward(hidden, weight, bias, rows, targets, lse, g, blocks=BLOCKS,
                                               **kw, **f)
    gh, gw, gb = run(grad_rows, needs_hidden_grad=False, needs_weight_grad=False, needs_bias_grad=True)
    assert gh is None and gw is None
    check(gb, r_gb, torch.float32, "grad_bias only")
    gh, gw, gb = run(grad_rows, needs_hidden_grad=True, needs_weight_grad=False, needs_bias_grad=False)
    assert gw is None and gb is None
    check(gh, r_gh, torch.float32, "grad_hidden only")
    gh, gw, gb = run(grad_rows, needs_hidden_grad=False, needs_weight_grad=True, needs_bias_grad=False)
    assert gh is None and gb is None
    check(gw, r_gw, torch.float32, "grad_weight only")
    # all-zero grad_rows: every token tile skipped, outputs must still be (written) zeros
    gh, gw, gb = run(torch.zeros_like(grad_rows), needs_hidden_grad=True, needs_weight_grad=True,
                     needs_bias_grad=True)
    assert not gh.any() and not gw.any() and not gb.any()


def test_deterministic_and_chunking_invariant():
    hidden, weight, bias, rows, targets, grad_rows = make_inputs(torch.bfloat16, D=80, V=150, M=40, N=45)
    kw = dict(logit_scale=0.9, softcap=4.0, temperature=1.1, blocks=BLOCKS)
    f1 = linear_logps_forward(hidden, weight, bias, rows, targets, **kw)
    f2 = linear_logps_forward(hidden, weight, bias, rows, targets, **kw)
    assert all(torch.equal(a, b) for a, b in zip(f1, f2))
    lse = f1[1]
    g1 = linear_logps_backward(hidden, weight, bias, rows, targets, lse, grad_rows, **kw)
    g2 = linear_logps_backward(hidden, weight, bias, rows, targets, lse, grad_rows, **kw)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    # a tiny fp32 workspace forces several chunks along both outer axes: same bits
    g3 = linear_logps_backward(hidden, weight, bias, rows, targets, lse, grad_rows, workspace_bytes=1, **kw)
    assert all(torch.equal(a, b) for a, b in zip(g1, g3))


def test_unaligned_views_and_empty():
    # D not a multiple of 8, hidden a strided view (row stride != D): no alignment hint path
    hidden, weight, bias, rows, targets, grad_rows = make_inputs(torch.float32, D=50, M=9)
    big = torch.randn(hidden.shape[0], 53)
    big[:, 1:51] = hidden
    view = big[:, 1:51]
    kw = dict(logit_scale=1.0, softcap=2.0, temperature=1.0, blocks=BLOCKS)
    a = linear_logps_forward(view, weight, bias, rows, targets, **kw)
    b = reference(hidden, weight, bias, rows, targets, grad_rows, 1.0, 2.0, 1.0)
    check(a[1].sum(0), b[1], torch.float32, "lse (strided view)")
    gh, _, _ = linear_logps_backward(view, weight, bias, rows, targets, a[1], grad_rows, **kw)
    check(gh, b[3], torch.float32, "grad_hidden (strided view)")
    e = torch.empty(0, dtype=torch.int64)
    out = linear_logps_forward(hidden, weight, bias, e, e, blocks=BLOCKS)
    assert out[1].shape == (2, 0) and all(t.shape == (0,) and t.dtype == torch.float32 for t in out[::2])
    gh, gw, gb = linear_logps_backward(hidden, weight, bias, e, e, torch.empty(2, 0), torch.empty(0),
                                       blocks=BLOCKS)
    assert not gh.any() and not gw.any() and not gb.any()


def test_masked_tail_rows_with_large_logits_contribute_zero():
    # M = 5 in a 16-row tile: 11 padding rows whose logits are bias / temperature = 100 (exp overflows
    # fp32 unless they are masked out exactly)
    hidden, weight, _, rows, targets, grad_rows = make_inputs(torch.float32, N=9, D=16, V=64, M=5)
    bias = torch.ones(64)
    grad_rows = torch.randn(5, generator=torch.Generator().manual_seed(3))
    kw = dict(logit_scale=1.0, softcap=None, temperature=0.01)
    _, lse, _ = linear_logps_forward(hidden, weight, bias, rows, targets, blocks=BLOCKS, **kw)
    grads = linear_logps_backward(hidden, weight, bias, rows, targets, lse, grad_rows, blocks=BLOCKS, **kw)
    *_, r_gh, r_gw, r_gb = reference(hidden, weight, bias, rows, targets, grad_rows, **kw)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, (r_gh, r_gw, r_gb)):
        assert torch.isfinite(a).all(), name
        check(a, e, torch.float32, name)


@pytest.mark.parametrize("programs", [None, 1], ids=["splits", "one_split"])
def test_nan_upstream_gradient_propagates(programs):
    # one NaN in an otherwise all-zero token tile: the tile must not be skipped as "all zero"
    hidden, weight, bias, rows, targets, _ = make_inputs(torch.float32, M=20)
    grad_rows = torch.zeros(20)
    grad_rows[3] = float("nan")
    _, lse, _ = linear_logps_forward(hidden, weight, bias, rows, targets, blocks=BLOCKS)
    gh, gw, gb = linear_logps_backward(hidden, weight, bias, rows, targets, lse, grad_rows, blocks=BLOCKS,
                                       target_programs=programs)
    assert torch.isnan(gh[rows[3]]).all() and torch.isnan(gw).all() and torch.isnan(gb).all()
    others = torch.ones(hidden.shape[0], dtype=torch.bool)
    others[rows[3]] = False
    assert not gh[others].any()  # other rows: g == 0 -> exactly 0


def test_fp32_precision_is_explicit():
    # on CPU both are exact fp32 products (TF32 is a permission, not a request); anything else is refused
    hidden, weight, bias, rows, targets, grad_rows = make_inputs(torch.float32)
    kw = dict(logit_scale=0.9, softcap=None, temperature=1.0, blocks=BLOCKS)
    ieee = linear_logps_forward(hidden, weight, bias, rows, targets, fp32_precision="ieee", **kw)
    tf32 = linear_logps_forward(hidden, weight, bias, rows, targets, fp32_precision="tf32", **kw)
    assert all(torch.equal(a, b) for a, b in zip(ieee, tf32))
    ref = reference(hidden, weight, bias, rows, targets, grad_rows, 0.9, None, 1.0)
    check(ieee[0], ref[0], torch.float32, "row_logp")
    for bad in ("tf32x3", "highest", None):
        with pytest.raises(ValueError, match="fp32_precision must be one of"):
            linear_logps_forward(hidden, weight, bias, rows, targets, fp32_precision=bad, **kw)
        with pytest.raises(ValueError, match="fp32_precision must be one of"):
            linear_logps_backward(hidden, weight, bias, rows, targets, ieee[1], grad_rows, fp32_precision=bad,
                                  **kw)
    with pytest.raises(ValueError, match="fp32_precision must be one of"):  # refused for 16-bit inputs too
        linear_logps_forward(hidden.bfloat16(), weight.bfloat16(), None, rows, targets, fp32_precision="fast")


@pytest.mark.parametrize("programs", [None, 1], ids=["splits", "one_split"])
def test_row_logp_is_exact_at_huge_equal_logits(programs):
    # every vocabulary row of the weight identical and a bias of 1e4: all logits equal and large, so
    # row_logp = -log V exactly (target - lse would lose ~1e-3 absolute at 1e4)
    V = 150
    hidden, _, _, rows, targets, _ = make_inputs(torch.float32, V=V)
    weight = torch.randn(1, 48).expand(V, 48).contiguous()
    bias = torch.full((V,), 1e4)
    logp, lse, _ = linear_logps_forward(hidden, weight, bias, rows, targets, blocks=BLOCKS,
                                        target_programs=programs)
    assert torch.allclose(logp.double(), torch.full_like(logp, -math.log(V), dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.allclose(lse.sum(0), hidden[rows] @ weight[0] + 1e4 + math.log(V), rtol=1e-6, atol=0)


def test_row_offsets_past_2_31_elements():
    # hidden rows 2**30 + 16 elements apart: hidden row 2 starts past 2**31 elements (lazily allocated,
    # only the three rows are touched); a weight with the same row stride
    D, V, stride = 16, 3, 2 ** 30 + 16
    g = torch.Generator().manual_seed(9)
    hidden = torch.empty(2 * stride + D).as_strided((3, D), (stride, 1))
    weight = torch.empty(2 * stride + D).as_strided((V, D), (stride, 1))
    hidden.copy_(torch.randn(3, D, generator=g))
    weight.copy_(torch.randn(V, D, generator=g))
    rows, targets, grad_rows = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0]), torch.tensor([1.0, -2.0, 0.5])
    kw = dict(logit_scale=1.0, softcap=None, temperature=1.0)
    out = linear_logps_forward(hidden, weight, None, rows, targets, blocks=BLOCKS, **kw)
    gh, gw, _ = linear_logps_backward(hidden, weight, None, rows, targets, out[1], grad_rows, blocks=BLOCKS, **kw)
    ref = reference(hidden, weight, None, rows, targets, grad_rows, **kw)
    for a, e, name in zip((out[0], out[1].sum(0), out[2], gh, gw), (*ref[:3], *ref[3:5]), ("row_logp", "lse", "logit_sum", "gh", "gw")):
        check(a, e, torch.float32, name)


def test_invalid_options_are_refused():
    hidden, weight, bias, rows, targets, grad_rows = make_inputs(torch.float32, M=4)
    for kw, message in ((dict(temperature=0.0), "temperature must be > 0"), (dict(softcap=-1.0), "softcap must be"),
                        (dict(logit_scale=float("inf")), "logit_scale must be a finite number")):
        with pytest.raises(ValueError, match=message):
            linear_logps_forward(hidden, weight, bias, rows, targets, **kw)
        with pytest.raises(ValueError, match=message):
            linear_logps_backward(hidden, weight, bias, rows, targets, torch.zeros(2, 4), grad_rows, **kw)
    with pytest.raises(ValueError, match="bias must be a torch.float32 \\[203\\]"):
        linear_logps_forward(hidden, weight, bias[:5], rows, targets)
    with pytest.raises(ValueError, match="grad_rows must be a float32"):
        linear_logps_backward(hidden, weight, bias, rows, targets, torch.zeros(2, 4), grad_rows.double())
    with pytest.raises(ValueError, match="stats must be a float32 \\[2, 4\\]"):
        linear_logps_backward(hidden, weight, bias, rows, targets, torch.zeros(4), grad_rows)


@pytest.mark.parametrize("case", range(6))
def test_random_shapes_and_transforms(case):
    # a seeded sweep over shapes (V from 1, tiles partly filled), dtypes, transforms, bias offsets and
    # the split count; bound: fp32 tolerance plus the fp32 rounding of z (~2^-23 |z|, inherent)
    g = torch.Generator().manual_seed(200 + case)
    pick = lambda *options: options[int(torch.randint(len(options), (1,), generator=g))]
    dtype, V = (torch.float32, torch.bfloat16)[case % 2], (1, 31, 64, 97, 150, 203)[case]
    D = pick(16, 24, 48)
    N = int(torch.randint(2, 40, (1,), generator=g))
    M = int(torch.randint(2, N + 1, (1,), generator=g))  # make_inputs sets the first two targets
    hidden, weight, bias, rows, targets, grad_rows = make_inputs(dtype, N=N, D=D, V=V, M=M, seed=300 + case)
    if bias is not None:
        bias = (bias.float() + pick(0.0, 30.0, -100.0)).to(dtype)
    kw = dict(logit_scale=pick(1.0, 0.6, 2.0), softcap=pick(None, 2.0, 20.0), temperature=pick(1.0, 0.5, 2.5))
    run = dict(blocks=BLOCKS, target_programs=pick(None, 1))
    r_logp, r_lse, r_sum, *r_grads = reference(hidden, weight, bias, rows, targets, grad_rows, **kw)
    logp, lse, logit_sum = linear_logps_forward(hidden, weight, bias, rows, targets, **kw, **run)
    grads = linear_logps_backward(hidden, weight, bias, rows, targets, lse, grad_rows, **kw, **run)
    z_max = r_lse.abs().max().item() + math.log(V) + 1.0
    z_round = 2.0 ** -22 * z_max
    assert ((logp.double() - r_logp).abs() <= 1e-5 * r_logp.abs() + 1e-6 + 2 * z_round).all()
    assert ((lse.double().sum(0) - r_lse).abs() <= 1e-5 * r_lse.abs() + 1e-6 + z_round).all()
    assert ((logit_sum.double() - r_sum).abs() <= 1e-5 * r_sum.abs().max() + 1e-6 + V * z_round).all()
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, r_grads):
        if e is not None:
            assert a.dtype == dtype, name
            scale = max(e.abs().max().item(), 1e-3)
            # each gradient sums M terms of size |g| |h| or |g| |W| (times logit_scale / temperature) that can
            # cancel exactly (V = 1: the exact gradient is 0); fp32 keeps ~2^-23 of their total either way
            terms = grad_rows.abs().sum().item() * max(hidden.abs().max().item(), weight.abs().max().item(), 1.0)
            rounding = 2.0 ** -21 * terms * kw["logit_scale"] / kw["temperature"]
            assert (a.double() - e).abs().max() <= (TOL[dtype]["rtol"] + 4 * z_round) * scale + rounding, name
