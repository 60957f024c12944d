"""kernels/sequence_logps.py: the logits-form row kernels (Triton interpreter on CPU) against float64.

The launchers are called directly (no autograd, no ops layer). MAX_BLOCK_V is shrunk in most tests so
that a small vocabulary spans several blocks with a partial last one; one test runs the shipped block
on V = 50257 (V % 16 != 0).
"""
import math

import pytest
import torch

import fastdpo.kernels.sequence_logps as rows_module
from fastdpo.kernels import row_logps_backward, row_logps_forward
from reference import rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
TRANSFORMS = {
    "plain": dict(logit_scale=1.0, softcap=None, temperature=1.0),
    "scale-temperature": dict(logit_scale=0.7, softcap=None, temperature=1.3),
    "softcap": dict(logit_scale=1.0, softcap=2.5, temperature=1.0),
    "all": dict(logit_scale=1.6, softcap=3.0, temperature=0.8),
}


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(rows_module, "MAX_BLOCK_V", 64)


def make_rows(N, V, dtype, *, seed=0, scale=4.0, offset=0.0):
    """Random logits [N, V] and targets [N]: first / last vocabulary column, every third row unscored."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * scale + offset).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0], targets[1] = 0, V - 1
    targets[2::3] = -1
    return logits, targets


def reference(logits, targets, grad_rows, *, logit_scale, softcap, temperature):
    """float64 (row_logp, lse, logit_sum) and d(sum_n grad_rows[n] * row_logp[n]) / d logits, the softcap
    slope as 1 / cosh^2 (autograd's 1 - tanh^2 cancels in float64 too once tanh saturates)."""
    y = logit_scale * logits.double()
    if softcap is None:
        z, slope = y / temperature, torch.full_like(y, logit_scale / temperature)
    else:
        z, slope = softcap * torch.tanh(y / softcap) / temperature, logit_scale / temperature / torch.cosh(y / softcap) ** 2
    scored = targets >= 0
    logp = torch.log_softmax(z, dim=-1)
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), z.shape[1]).double()
    grad = torch.where(scored[:, None], grad_rows.double()[:, None] * (onehot - logp.exp()) * slope, 0.0)
    row_logp = torch.where(scored, logp.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    lse = torch.where(scored, torch.logsumexp(z, dim=-1), 0.0)
    logit_sum = torch.where(scored, z.sum(-1), 0.0)
    return row_logp, lse, logit_sum, grad


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_forward_backward_and_write_grad_match_float64(dtype, transform):
    kw = TRANSFORMS[transform]
    logits, targets = make_rows(7, 203, dtype)  # 4 blocks of 64, the last one partial
    grad_rows = torch.randn(7, generator=torch.Generator().manual_seed(1))
    grad_rows[3] = 0.0
    r_logp, r_lse, r_sum, r_grad = reference(logits, targets, grad_rows, **kw)

    row_logp, stats, logit_sum = row_logps_forward(logits, targets, **kw)
    lse = stats.sum(0)
    for name, a, e in (("row_logp", row_logp, r_logp), ("lse", lse, r_lse), ("logit_sum", logit_sum, r_sum)):
        assert a.dtype == torch.float32, name
        assert rel_err(a, e) <= 1e-5, name  # fp32 math on exact (possibly bf16) inputs

    grad = row_logps_backward(logits, targets, stats, grad_rows, **kw)
    assert grad.dtype == dtype and rel_err(grad, r_grad) <= TOL[dtype]
    assert not grad[targets < 0].any() and not grad[3].any()  # unscored rows and g == 0 give exact zeros

    buffer = logits.clone()
    stored = row_logps_forward(buffer, targets, write_grad=True, **kw)
    assert all(torch.equal(a, b) for a, b in zip(stored, (row_logp, stats, logit_sum)))
    *_, r_u = reference(logits, targets, torch.ones(7), **kw)
    assert buffer.dtype == dtype and rel_err(buffer, r_u) <= TOL[dtype]
    assert not buffer[targets < 0].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shipped_block_on_a_vocabulary_not_multiple_of_16(dtype):
    kw = TRANSFORMS["all"]
    logits, targets = make_rows(3, 50257, dtype, seed=2)
    targets[2] = 31337
    grad_rows = torch.tensor([0.5, -1.5, 2.0])
    r_logp, r_lse, r_sum, r_grad = reference(logits, targets, grad_rows, **kw)
    row_logp, stats, logit_sum = row_logps_forward(logits, targets, **kw)
    assert rel_err(row_logp, r_logp) <= 1e-5 and rel_err(stats.sum(0), r_lse) <= 1e-5
    assert rel_err(logit_sum, r_sum) <= 1e-5
    grad = row_logps_backward(logits, targets, stats, grad_rows, out=logits, **kw)  # in place
    assert grad.data_ptr() == logits.data_ptr() and rel_err(grad, r_grad) <= TOL[dtype]


@pytest.mark.usefixtures("small_blocks")
def test_large_logits_keep_full_precision():
    # logits + 1e4: shift invariant, so row_logp must not lose digits (target - lse would: ~2e-4)
    logits, targets = make_rows(5, 150, torch.float32, seed=3, offset=1e4)
    kw = TRANSFORMS["plain"]
    r_logp, _, _, r_u = reference(logits, targets, torch.ones(5), **kw)
    row_logp, _, _ = row_logps_forward(logits, targets, **kw)
    scored = targets >= 0
    assert ((row_logp[scored].double() - r_logp[scored]).abs() / r_logp[scored].abs()).max() <= 1e-6
    buffer = logits.clone()
    row_logps_forward(buffer, targets, write_grad=True, **kw)
    assert rel_err(buffer, r_u) <= 1e-5  # U from the exact max, not from the rounded lse

    # all logits equal and huge: uniform distribution, row_logp = -log V exactly (not 0)
    V = 150
    huge = torch.full((2, V), 1e30)
    row_logp, stats, _ = row_logps_forward(huge, torch.tensor([0, V - 1]))
    assert torch.allclose(row_logp.double(), torch.full((2,), -math.log(V), dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.isfinite(stats).all()


@pytest.mark.usefixtures("small_blocks")
def test_softcap_saturation_is_finite_and_exact():
    # |logit_scale * x / softcap| up to ~1e4: tanh saturates, no inf / inf, gradients vanish smoothly
    logits, targets = make_rows(4, 100, torch.float32, seed=4, scale=3e3)
    kw = dict(logit_scale=1.0, softcap=0.5, temperature=0.7)
    grad_rows = torch.tensor([1.0, -2.0, 0.5, 3.0])
    r_logp, r_lse, _, r_grad = reference(logits, targets, grad_rows, **kw)
    row_logp, stats, _ = row_logps_forward(logits, targets, **kw)
    assert rel_err(row_logp, r_logp) <= 1e-5 and rel_err(stats.sum(0), r_lse) <= 1e-5
    grad = row_logps_backward(logits, targets, stats, grad_rows, **kw)
    assert torch.isfinite(grad).all() and rel_err(grad, r_grad) <= 1e-5


@pytest.mark.usefixtures("small_blocks")
def test_unscored_rows_read_nothing_and_give_zeros():
    logits, targets = make_rows(6, 90, torch.float32, seed=5)
    logits[targets < 0] = float("nan")  # never read: results stay finite and exactly 0
    outs = row_logps_forward(logits, targets)
    for out in outs:
        assert torch.isfinite(out).all() and not out[..., targets < 0].any()
    grad = row_logps_backward(logits, targets, outs[1], torch.ones(6))
    assert torch.isfinite(grad).all() and not grad[targets < 0].any()
    row_logps_forward(logits, targets, write_grad=True)
    assert torch.isfinite(logits).all() and not logits[targets < 0].any()


@pytest.mark.usefixtures("small_blocks")
def test_nan_upstream_gradient_propagates():
    logits, targets = make_rows(4, 80, torch.float32, seed=6)
    stats = row_logps_forward(logits, targets)[1]
    grad_rows = torch.tensor([float("nan"), 0.0, 1.0, float("inf")])
    grad = row_logps_backward(logits, targets, stats, grad_rows)
    assert torch.isnan(grad[0]).all()  # never silently 0
    assert not grad[1].any() and not grad[2].any()  # g == 0, and row 2 has no target
    assert not torch.isfinite(grad[3]).all()


@pytest.mark.usefixtures("small_blocks")
def test_bitwise_deterministic():
    logits, targets = make_rows(5, 300, torch.bfloat16, seed=7)
    kw = TRANSFORMS["all"]
    grad_rows = torch.randn(5)
    f1, f2 = (row_logps_forward(logits, targets, **kw) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(f1, f2))
    g1, g2 = (row_logps_backward(logits, targets, f1[1], grad_rows, **kw) for _ in range(2))
    assert torch.equal(g1, g2)


def test_row_offsets_past_2_31_elements():
    # rows 2**30 + 16 elements apart: row 2 starts past 2**31 (an int32 row * stride would wrap).
    # The buffer is allocated lazily: only the three rows are ever touched.
    V, stride = 96, 2 ** 30 + 16
    logits = torch.empty(2 * stride + V).as_strided((3, V), (stride, 1))
    logits.copy_(torch.randn(3, V, generator=torch.Generator().manual_seed(8)) * 3)
    targets = torch.tensor([1, 50, V - 1])
    grad_rows = torch.tensor([1.0, -0.5, 2.0])
    r_logp, _, _, r_grad = reference(logits, targets, grad_rows, **TRANSFORMS["plain"])
    row_logp, stats, _ = row_logps_forward(logits, targets)
    assert rel_err(row_logp, r_logp) <= 1e-5
    grad = row_logps_backward(logits, targets, stats, grad_rows, out=logits)
    assert rel_err(grad, r_grad) <= 1e-5


BAD = {
    "temperature": (dict(temperature=0.0), "temperature must be > 0"),
    "temperature inf": (dict(temperature=float("inf")), "temperature must be a finite number"),
    "softcap": (dict(softcap=-1.0), "softcap must be None or > 0"),
    "softcap str": (dict(softcap="30"), "softcap must be a finite number"),
    "logit_scale": (dict(logit_scale=float("nan")), "logit_scale must be a finite number"),
}


@pytest.mark.parametrize("case", BAD)
def test_invalid_options_are_refused(case):
    kwargs, message = BAD[case]
    logits, targets = make_rows(3, 20, torch.float32)
    with pytest.raises(ValueError, match=message):
        row_logps_forward(logits, targets, **kwargs)
    with pytest.raises(ValueError, match=message):
        row_logps_backward(logits, targets, torch.zeros(2, 3), torch.ones(3), **kwargs)


def test_invalid_tensors_are_refused():
    logits, targets = make_rows(3, 20, torch.float32)
    with pytest.raises(ValueError, match="logits must have a unit stride"):
        row_logps_forward(torch.randn(20, 3).t(), targets)
    with pytest.raises(ValueError, match="targets must be an int64"):
        row_logps_forward(logits, targets.int())
    with pytest.raises(ValueError, match="logits must be a 2-D"):
        row_logps_forward(logits.double(), targets)
    with pytest.raises(ValueError, match="grad_rows must be a float32"):
        row_logps_backward(logits, targets, torch.zeros(2, 3), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="stats must be a float32"):
        row_logps_backward(logits, targets, torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="out must match logits"):
        row_logps_backward(logits, targets, torch.zeros(2, 3), torch.ones(3), out=logits[:, :10])


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("case", range(12))
def test_random_shapes_transforms_and_offsets(case):
    # a seeded sweep: shapes (V from 1, single blocks and partial blocks), unscored rows, transforms and
    # logit offsets up to 1e4. Bound: fp32 tolerance plus the fp32 rounding of z itself (~2^-23 |z|,
    # present in any fp32 implementation once logit_scale / temperature are not 1).
    g = torch.Generator().manual_seed(100 + case)
    pick = lambda *options: options[int(torch.randint(len(options), (1,), generator=g))]
    N, V = int(torch.randint(1, 9, (1,), generator=g)), pick(1, 2, 17, 64, 65, 200)
    dtype = pick(torch.float32, torch.bfloat16)
    kw = dict(logit_scale=pick(1.0, 0.5, 2.5), softcap=pick(None, 1.5, 30.0), temperature=pick(1.0, 0.7, 3.0))
    offset = pick(0.0, -50.0, 1e3, 1e4)
    if case % 3 == 0:  # untransformed large logits: z is exact, so row_logp must be too
        kw, offset = dict(logit_scale=1.0, softcap=None, temperature=1.0), pick(1e3, 1e4)
    logits = (torch.randn(N, V, generator=g) * pick(0.1, 3.0, 20.0) + offset).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.3] = -1
    grad_rows = torch.randn(N, generator=g)
    r_logp, r_lse, r_sum, r_grad = reference(logits, targets, grad_rows, **kw)
    z_scale = kw["logit_scale"] / kw["temperature"] * (logits.double().abs().max().item() if kw["softcap"] is None
                                                       else kw["softcap"])
    z_round = 0.0 if kw["logit_scale"] == kw["temperature"] == 1.0 else 2.0 ** -22 * z_scale

    row_logp, stats, logit_sum = row_logps_forward(logits, targets, **kw)
    lse = stats.double().sum(0)
    assert ((row_logp.double() - r_logp).abs() <= 1e-5 * r_logp.abs() + 1e-6 + 2 * z_round).all()
    assert ((lse.double() - r_lse).abs() <= 1e-5 * r_lse.abs() + 1e-6 + z_round).all()
    assert ((logit_sum.double() - r_sum).abs() <= 1e-5 * r_sum.abs().max() + 1e-6 + V * z_round).all()
    buffer = logits.clone()
    row_logps_forward(buffer, targets, write_grad=True, **kw)
    grad = row_logps_backward(logits, targets, stats, grad_rows, **kw)
    *_, r_u = reference(logits, targets, torch.ones(N), **kw)
    scale = r_u.abs().max().item() or 1.0
    assert (buffer.double() - r_u).abs().max() <= TOL[dtype] * scale + 2 * z_round * kw["logit_scale"] / kw["temperature"]
    # backward takes the softmax from (shift, log_sum_exp), not from a rounded lse: no |lse| * 2^-24 term
    grad_scale = r_grad.abs().max().item() or 1.0
    assert (grad.double() - r_grad).abs().max() <= (TOL[dtype] + 2 * z_round) * grad_scale


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("transform", ["plain", "scale-temperature"])
def test_token_stats_match_float64(impl, transform):
    """token_stats=True: per-row entropy and top-1 hit (first maximum, as torch.argmax) from the same pass."""
    from fastdpo import torch_ops

    forward = row_logps_forward if impl == "triton" else torch_ops.row_logps_forward
    kw = TRANSFORMS[transform]
    logits, targets = make_rows(9, 203, torch.float32, seed=9, offset=1e3)
    logits[4, 70] = logits[4, 150] = logits[4].max() + 1.0  # a tie: the first maximum (70) is the argmax
    targets[4], targets[5] = 150, int(logits[5].argmax())
    z = logits.double() * kw["logit_scale"]
    z = (z if kw["softcap"] is None else kw["softcap"] * torch.tanh(z / kw["softcap"])) / kw["temperature"]
    p = torch.softmax(z, dim=-1)
    scored = targets >= 0
    want_entropy = torch.where(scored, -(p * torch.log_softmax(z, dim=-1)).sum(-1), 0.0)
    want_top1 = scored & (z.argmax(-1) == targets)
    plain = forward(logits, targets, **kw)
    row_logp, stats, logit_sum, entropy, top1 = forward(logits, targets, token_stats=True, **kw)
    assert all(torch.equal(a, b) for a, b in zip(plain, (row_logp, stats, logit_sum)))  # same pass, same bits
    assert entropy.dtype == torch.float32 and top1.dtype == torch.bool
    assert (entropy.double() - want_entropy).abs().max() <= 1e-5 * want_entropy.abs().max()
    assert torch.equal(top1, want_top1) and bool(top1[5]) and not bool(top1[4])
