"""kernels/linear_logps.py: fused LM-head log-probs (Triton interpreter on CPU, float64 references).

Small shapes with D and V that are not multiples of the tiles; the launchers' ``blocks`` override
shrinks the tiles (same kernels) so the interpreter stays fast and many vocab splits / token tiles occur.
"""

import pytest
import torch


from fastdpo.kernels.linear_logps import linear_logps_backward, linear_logps_forward

BLOCKS = (16, 32, 16)  # (BLOCK_M, BLOCK_V, BLOCK_D); the interpreter needs dot tiles >= 16
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
CONFIGS = {
    "plain": dict(bias=False, logit_scale=1.0, softcap=None, temperature=1.0),
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
    """float64 forward values and autograd gradients (of sum_m g[m] * (z[m, t_m] - lse[m]))."""
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
    return (tgt.detach(), lse.detach(), z.sum(-1).detach(),
            h.grad, w.grad, None if b is None else b.grad)


def check(actual, expected, dtype, what):
    assert actual.dtype == dtype, what
    tol = TOL[dtype]
    atol = tol["atol"] * max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double(), expected, rtol=tol["rtol"], atol=atol, msg=what)


@pytest.mark.parametrize("dtype,D", [(torch.float32, 48), (torch.bfloat16, 80)])
@pytest.mark.parametrize("cfg", ["plain", "full"])
def test_forward_matches_float64_reference(dtype, D, cfg):
    c = CONFIGS[cfg]
    hidden, weight, bias, rows, targets, grad_rows = make_inputs(dtype, D=D, bias=c["bias"])
    kw = dict(logit_scale=c["logit_scale"], softcap=c["softcap"], temperature=c["temperature"])
    tgt, lse, lsum = linear_logps_forward(hidden, weight, bias, rows, targets, blocks=BLOCKS, **kw)
    r_tgt, r_lse, r_lsum, *_ = reference(hidden, weight, bias, rows, targets, grad_rows, **kw)
    # fp32 outputs whatever the input dtype; bf16 inputs are exact in float64, so the
    # reference error is only the kernel's fp32 arithmetic -> fp32 tolerance for both
    for a, e, name in ((tgt, r_tgt, "target_logit"), (lse, r_lse, "lse"), (lsum, r_lsum, "logit_sum")):
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
    for a, e, name in zip(out, ref, ("target_logit", "lse", "logit_sum")):
        check(a, e, torch.float32, name)


@pytest.mark.parametrize("dtype,D", [(torch.float32, 48), (torch.bfloat16, 80)])
@pytest.mark.parametrize("cfg", ["plain", "full"])
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
    tgt, lse, lsum = linear_logps_forward(hidden, weight, bias, rows, targets, **kw)
    gh, gw, gb = linear_logps_backward(hidden, weight, bias, rows, targets, lse, grad_rows, **kw)
    ref = reference(hidden, weight, bias, rows, targets, grad_rows, **kw)
    for a, e, name in zip((tgt, lse, lsum), ref[:3], ("target_logit", "lse", "logit_sum")):
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
    check(a[1], b[1], torch.float32, "lse (strided view)")
    gh, _, _ = linear_logps_backward(view, weight, bias, rows, targets, a[1], grad_rows, **kw)
    check(gh, b[3], torch.float32, "grad_hidden (strided view)")
    e = torch.empty(0, dtype=torch.int64)
    out = linear_logps_forward(hidden, weight, bias, e, e, blocks=BLOCKS)
    assert all(t.shape == (0,) and t.dtype == torch.float32 for t in out)
    gh, gw, gb = linear_logps_backward(hidden, weight, bias, e, e, torch.empty(0), torch.empty(0),
                                       blocks=BLOCKS)
    assert not gh.any() and not gw.any() and not gb.any()
