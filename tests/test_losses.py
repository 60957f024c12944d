"""fastdpo.losses against independent float64 formulas.

The reference formulas below are written from the papers / TRL 1.16 equations with elementary
float64 tensor operations only (exp, log, log1p, sort), so their autograd gives independent
reference gradients too.
"""

import math

import pytest
import torch

from fastdpo.losses import (
    F_DIVERGENCE_TYPES,
    LOSS_PARAMS,
    LOSS_TYPES,
    LossTerms,
    check_loss_config,
    preference_loss,
)

B = 8
RTOL, ATOL = 1e-5, 1e-6

F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
LENGTH_LOSSES = {"ipo", "sigmoid_norm", "simpo", "sft"}
# label_smoothing each loss is tested with (0 where the loss does not use it)
SMOOTHING = {"sigmoid": 0.2, "robust": 0.1, "exo_pair": 0.05, "aot": 0.15, "aot_unpaired": 0.3, "simpo": 0.1}
BETA = {"ipo": 0.5, "sppo_hard": 0.5, "simpo": 2.0}  # beta per loss (default 0.1)


# ---------------------------------------------------------------------------------------------
# Independent float64 reference


def lsig(x):
    """log(sigmoid(x)), stable on both sides."""
    return torch.minimum(x, torch.zeros_like(x)) - torch.log1p(torch.exp(-x.abs()))


def sig(x):
    return torch.exp(lsig(x))


def ref_scores(lr, f_div, alpha):
    u = torch.exp(lr)  # pi / pi_ref
    if f_div == "forward_kl":
        return 1 - 1 / u
    if f_div == "js_divergence":
        return torch.log(2 * u / (1 + u))
    if f_div == "alpha_divergence" and alpha != 1:
        return (u ** (alpha - 1) - 1) / (alpha - 1)
    return lr


def ref_loss(name, x, *, beta, eps=0.0, f_div="reverse_kl", alpha=0.5, tau=0.05, gamma=0.5, bco_delta=0.0):
    """x: dict of float64 tensors c, r, rc, rr (log-probs) and lc, lr (lengths)."""
    c, r, rc, rr = x["c"], x["r"], x["rc"], x["rr"]
    rho_c, rho_r = c - rc, r - rr
    s_c, s_r = ref_scores(rho_c, f_div, alpha), ref_scores(rho_r, f_div, alpha)
    z = beta * (s_c - s_r)
    if name in LENGTH_LOSSES:
        nc, nr = x["lc"].clamp(min=1), x["lr"].clamp(min=1)

    def smoothed(t):
        return -(1 - eps) * lsig(t) - eps * lsig(-t)

    if name == "sigmoid":
        return smoothed(z)
    if name == "hinge":
        return torch.clamp(1 - z, min=0)
    if name == "ipo":
        return (s_c / nc - s_r / nr - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        p_w, p_l = sig(z), sig(-z)
        return p_w * torch.log(p_w / (1 - eps)) + p_l * torch.log(p_l / eps)
    if name == "nca_pair":
        return -lsig(beta * rho_c) - 0.5 * lsig(-beta * rho_c) - 0.5 * lsig(-beta * rho_r)
    if name == "robust":
        return ((1 - eps) * -lsig(z) - eps * -lsig(-z)) / (1 - 2 * eps)
    if name == "bco_pair":
        return -lsig(beta * rho_c - bco_delta) - lsig(bco_delta - beta * rho_r)
    if name == "sppo_hard":
        return (rho_c - 1 / (2 * beta)) ** 2 + (rho_r + 1 / (2 * beta)) ** 2
    if name == "aot":
        d = torch.sort(c - r).values - torch.sort(rc - rr).values
        return smoothed(beta * d)
    if name == "aot_unpaired":
        return smoothed(beta * (torch.sort(rho_c).values - torch.sort(rho_r).values))
    if name == "apo_zero":
        return (1 - sig(beta * rho_c)) + sig(beta * rho_r)
    if name == "apo_down":
        return sig(beta * rho_c) + (1 - sig(beta * (rho_c - rho_r)))
    if name == "discopop":
        m = sig(z / tau)
        return -lsig(z) * (1 - m) + torch.exp(-z) * m
    if name == "sft":
        return (-c.sum() / x["lc"].sum().clamp(min=1)).repeat(c.numel())
    if name == "sigmoid_norm":
        return -lsig(beta * (s_c / nc - s_r / nr))
    if name == "simpo":
        return smoothed(beta * (c / nc - r / nr) - gamma)
    raise AssertionError(name)


# ---------------------------------------------------------------------------------------------
# Inputs


def make_inputs(seed, batch=B):
    """fp32-representable float64 inputs: log-prob sums, reference within a few nats, lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (2, batch), generator=g)
    policy = -(torch.rand(2, batch, generator=g, dtype=torch.float64) * 1.5 + 0.2) * lengths
    ref = policy + torch.randn(2, batch, generator=g, dtype=torch.float64) * 2
    policy, ref = policy.float().double(), ref.float().double()
    return {"c": policy[0], "r": policy[1], "rc": ref[0], "rr": ref[1], "lc": lengths[0], "lr": lengths[1]}


def run(x, dtype=torch.float32, requires_grad=False, **kwargs):
    c = x["c"].to(dtype).requires_grad_(requires_grad)
    r = x["r"].to(dtype).requires_grad_(requires_grad)
    out = preference_loss(
        c, r, x["rc"].to(dtype), x["rr"].to(dtype), chosen_lengths=x["lc"], rejected_lengths=x["lr"], **kwargs
    )
    return out, c, r


def check_close(actual, expected, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def grad_of(t):
    """t.grad, with zeros for an input the loss does not use (sft ignores the rejected log-probs)."""
    return torch.zeros_like(t) if t.grad is None else t.grad


def check_grad_close(actual, expected):
    """fp32 gradients: relative 1e-5 of each entry or of the largest entry (sums of cancelling terms)."""
    actual, expected = grad_of(actual), grad_of(expected)
    check_close(actual, expected, atol=RTOL * expected.abs().max().item())


def case_kwargs(name, f_div):
    kwargs = {"beta": BETA.get(name, 0.1), "eps": SMOOTHING.get(name, 0.0)}
    if f_div != "reverse_kl":
        kwargs["f_div"] = f_div
    return kwargs


def to_api(beta, eps=0.0, f_div="reverse_kl", alpha=None, tau=None, gamma=None, bco_delta=None):
    api = {"beta": beta, "label_smoothing": eps}
    if f_div != "reverse_kl":
        api["f_divergence_type"] = f_div
    for key, value in (("alpha", alpha), ("discopop_tau", tau), ("gamma", gamma), ("bco_delta", bco_delta)):
        if value is not None:
            api[key] = value
    return api


CASES = [(name, f_div) for name in LOSS_TYPES for f_div in F_DIVERGENCE_TYPES
         if f_div == "reverse_kl" or name in F_DIVERGENCE_LOSSES]


# ---------------------------------------------------------------------------------------------
# Values and gradients of every loss type


def test_loss_types_listed():
    expected = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo"}
    assert set(LOSS_TYPES) == expected and len(LOSS_TYPES) == len(expected)


@pytest.mark.parametrize("name,f_div", CASES)
def test_values_match_reference(name, f_div):
    x = make_inputs(seed=CASES.index((name, f_div)))
    kwargs = case_kwargs(name, f_div)
    out, _, _ = run(x, loss_type=name, **to_api(**kwargs))
    assert isinstance(out, LossTerms) and out.losses.dtype == torch.float32 and out.losses.shape == (B,)
    check_close(out.losses, ref_loss(name, x, **kwargs))
    beta = kwargs["beta"]
    if name == "simpo":
        expected_c = beta * x["c"] / x["lc"]
        expected_r = beta * x["r"] / x["lr"]
    else:
        expected_c, expected_r = beta * (x["c"] - x["rc"]), beta * (x["r"] - x["rr"])
    check_close(out.chosen_rewards, expected_c)
    check_close(out.rejected_rewards, expected_r)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("name,f_div", CASES)
def test_gradients_match_reference(name, f_div):
    x = make_inputs(seed=1000 + CASES.index((name, f_div)))
    kwargs = case_kwargs(name, f_div)
    weights = torch.rand(B, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.5
    out, c, r = run(x, requires_grad=True, loss_type=name, **to_api(**kwargs))
    (out.losses.double() * weights).sum().backward()

    x64 = dict(x, c=x["c"].clone().requires_grad_(), r=x["r"].clone().requires_grad_())
    (ref_loss(name, x64, **kwargs) * weights).sum().backward()
    check_grad_close(c, x64["c"])
    check_grad_close(r, x64["r"])


def test_sigmoid_is_ln2_when_policy_equals_reference():
    x = make_inputs(seed=3)
    for beta in (0.1, 1.0, 5.0):
        out = preference_loss(x["c"].float(), x["r"].float(), x["c"].float(), x["r"].float(), beta=beta)
        check_close(out.losses, torch.full((B,), math.log(2)))
        assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


def test_label_smoothing_changes_sigmoid_as_cdpo():
    x = make_inputs(seed=4)
    plain, _, _ = run(x, beta=0.3)
    smoothed, _, _ = run(x, beta=0.3, label_smoothing=0.25)
    z = 0.3 * ((x["c"] - x["rc"]) - (x["r"] - x["rr"]))
    check_close(plain.losses, -lsig(z))
    check_close(smoothed.losses, -0.75 * lsig(z) - 0.25 * lsig(-z))


def test_robust_at_zero_smoothing_is_sigmoid():
    x = make_inputs(seed=5)
    check_close(run(x, loss_type="robust")[0].losses, run(x, loss_type="sigmoid")[0].losses)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 2.0, 1.0 + 1e-7])
def test_alpha_divergence_coefficients(alpha):
    x = make_inputs(seed=6)
    out, _, _ = run(x, f_divergence_type="alpha_divergence", alpha=alpha)
    expected = ref_loss("sigmoid", x, beta=0.1, f_div="alpha_divergence", alpha=1.0 if abs(alpha - 1) < 1e-6 else alpha)
    check_close(out.losses, expected)


def test_alpha_divergence_exponent_is_clamped_like_trl():
    # (alpha - 1) * rho = 100 > 80: the score saturates at (exp(80) - 1) / (alpha - 1) instead of overflowing
    big = torch.tensor([50.0])
    out = preference_loss(big, torch.tensor([-1.0]), torch.tensor([-50.0]), torch.tensor([-1.0]),
                          f_divergence_type="alpha_divergence", alpha=2.0, loss_type="hinge")
    assert out.losses.item() == 0.0 and torch.isfinite(out.losses).all()
    out = preference_loss(torch.tensor([-50.0]), torch.tensor([0.0]), torch.tensor([50.0]), torch.tensor([0.0]),
                          f_divergence_type="alpha_divergence", alpha=0.0, loss_type="hinge", beta=1.0)
    check_close(out.losses, torch.tensor([1 + math.expm1(80.0)]))


def test_bco_delta_shifts_rewards():
    x = make_inputs(seed=8)
    for delta in (0.3, torch.tensor(-0.2)):
        out, _, _ = run(x, loss_type="bco_pair", bco_delta=delta)
        check_close(out.losses, ref_loss("bco_pair", x, beta=0.1, bco_delta=float(delta)))


def test_discopop_tau_and_stability():
    x = make_inputs(seed=9)
    out, _, _ = run(x, loss_type="discopop", discopop_tau=0.5, beta=0.7)
    check_close(out.losses, ref_loss("discopop", x, beta=0.7, tau=0.5))
    # a very negative margin: exp(-z) overflows where sigmoid(z / tau) underflows; still finite
    out = preference_loss(torch.tensor([-2000.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                          loss_type="discopop", beta=1.0)
    check_close(out.losses, torch.tensor([2000.0]))


def test_aot_sorts_across_the_batch():
    x = make_inputs(seed=10)
    out, _, _ = run(x, loss_type="aot")
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(0))
    shuffled = {k: v[perm] for k, v in x.items()}
    check_close(run(shuffled, loss_type="aot")[0].losses, out.losses)
    # sorting matters: the per-pair DPO loss differs from the rank-matched one
    assert not torch.allclose(out.losses, run(x, loss_type="sigmoid")[0].losses)


# ---------------------------------------------------------------------------------------------
# Combinations, reference-free, SimPO, dtypes, edge cases


def test_combined_loss_weights():
    x = make_inputs(seed=11)
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]  # MPO
    out, _, _ = run(x, loss_type=types, loss_weights=weights, beta=0.2)
    expected = sum(w * ref_loss(t, x, beta=0.2) for t, w in zip(types, weights))
    check_close(out.losses, expected)
    default, _, _ = run(x, loss_type=["hinge", "ipo"])
    check_close(default.losses, ref_loss("hinge", x, beta=0.1) + ref_loss("ipo", x, beta=0.1))
    single, _, _ = run(x, loss_type=["apo_zero"], loss_weights=[2.5])
    check_close(single.losses, 2.5 * ref_loss("apo_zero", x, beta=0.1))


def test_combined_with_label_smoothing_and_f_divergence():
    x = make_inputs(seed=12)
    out, _, _ = run(x, loss_type=["robust", "sft", "hinge"], loss_weights=[1.0, 0.5, 0.1], label_smoothing=0.1,
                    f_divergence_type="js_divergence")
    kw = {"beta": 0.1, "f_div": "js_divergence"}
    expected = ref_loss("robust", x, eps=0.1, **kw) + 0.5 * ref_loss("sft", x, **kw) + 0.1 * ref_loss("hinge", x, **kw)
    check_close(out.losses, expected)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "aot", "nca_pair", "apo_down"])
def test_reference_free_treats_reference_as_zero(name):
    x = make_inputs(seed=13)
    zero_ref = dict(x, rc=torch.zeros(B, dtype=torch.float64), rr=torch.zeros(B, dtype=torch.float64))
    kwargs = {"beta": 0.05, "eps": SMOOTHING.get(name, 0.0)}
    without = preference_loss(x["c"].float(), x["r"].float(), chosen_lengths=x["lc"], rejected_lengths=x["lr"],
                              loss_type=name, reference_free=True, **to_api(**kwargs))
    check_close(without.losses, ref_loss(name, zero_ref, **kwargs))
    check_close(without.chosen_rewards, 0.05 * x["c"])
    ignored, _, _ = run(x, loss_type=name, reference_free=True, **to_api(**kwargs))  # given references are ignored
    check_close(ignored.losses, without.losses)


def test_simpo_formula_and_rewards():
    x = make_inputs(seed=14)
    out = preference_loss(x["c"].float(), x["r"].float(), chosen_lengths=x["lc"], rejected_lengths=x["lr"],
                          loss_type="simpo", beta=2.5, gamma=1.4)
    avg_c, avg_r = x["c"] / x["lc"], x["r"] / x["lr"]
    check_close(out.losses, -lsig(2.5 * (avg_c - avg_r) - 1.4))
    check_close(out.chosen_rewards, 2.5 * avg_c)
    check_close(out.rejected_rewards, 2.5 * avg_r)
    # defaults: gamma 0.5; references are not used
    with_refs, _, _ = run(x, loss_type="simpo", beta=2.5)
    check_close(with_refs.losses, -lsig(2.5 * (avg_c - avg_r) - 0.5))
    # CPO-style SimPO + NLL
    combo, _, _ = run(x, loss_type=["simpo", "sft"], loss_weights=[1.0, 0.3], beta=2.5)
    check_close(combo.losses, ref_loss("simpo", x, beta=2.5) + 0.3 * ref_loss("sft", x, beta=2.5))


@pytest.mark.parametrize("name", sorted(LENGTH_LOSSES))
def test_zero_lengths_are_finite(name):
    x = make_inputs(seed=15)
    x["lc"][:3] = 0
    x["lr"][2:5] = 0
    kwargs = case_kwargs(name, "reverse_kl")
    out, c, r = run(x, requires_grad=True, loss_type=name, **to_api(**kwargs))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(grad_of(c)).all() and torch.isfinite(grad_of(r)).all()
    assert torch.isfinite(out.chosen_rewards).all()
    check_close(out.losses, ref_loss(name, x, **kwargs))  # the reference counts 0 tokens as 1
    all_zero = dict(x, lc=torch.zeros(B, dtype=torch.long), lr=torch.zeros(B, dtype=torch.long))
    assert torch.isfinite(run(all_zero, loss_type=name, **to_api(**kwargs))[0].losses).all()


def test_dtypes():
    x = make_inputs(seed=16)
    bf16, _, _ = run(x, dtype=torch.bfloat16)
    assert bf16.losses.dtype == torch.float32 and bf16.chosen_rewards.dtype == torch.float32
    f64, _, _ = run(x, dtype=torch.float64)
    assert f64.losses.dtype == torch.float64
    torch.testing.assert_close(f64.losses, ref_loss("sigmoid", x, beta=0.1), rtol=1e-12, atol=0)
    mixed = preference_loss(x["c"].float(), x["r"].float(), x["rc"].bfloat16(), x["rr"].bfloat16())
    assert mixed.losses.dtype == torch.float32


def test_reference_gets_no_gradient():
    x = make_inputs(seed=17)
    rc = x["rc"].float().requires_grad_()
    out = preference_loss(x["c"].float().requires_grad_(), x["r"].float(), rc, x["rr"].float())
    out.losses.sum().backward()
    assert rc.grad is None


def test_check_loss_config_reports_needs():
    cfg = check_loss_config(beta=0.1, loss_type="sigmoid")
    assert cfg.loss_types == ("sigmoid",) and cfg.loss_weights == (1.0,)
    assert cfg.needs_reference and not cfg.needs_lengths and cfg.params == LOSS_PARAMS
    assert not check_loss_config(loss_type="sigmoid", reference_free=True).needs_reference
    cfg = check_loss_config(loss_type=["sft", "simpo"], gamma=1.0)
    assert not cfg.needs_reference and cfg.needs_lengths and cfg.params["gamma"] == 1.0
    assert check_loss_config(loss_type=["sigmoid", "ipo"], loss_weights=[1, 2]).loss_weights == (1.0, 2.0)


def test_sft_needs_no_reference():
    x = make_inputs(seed=18)
    out = preference_loss(x["c"].float(), x["r"].float(), chosen_lengths=x["lc"], rejected_lengths=x["lr"],
                          loss_type="sft")
    check_close(out.losses, ref_loss("sft", x, beta=0.1))
    check_close(out.chosen_rewards, 0.1 * x["c"])


# ---------------------------------------------------------------------------------------------
# Errors

BAD_CONFIGS = [
    ({"loss_type": "dpo"}, r"loss_type must be one of .*'sigmoid'.*got 'dpo'"),
    ({"loss_type": ["sigmoid", "kto"]}, r"loss_type must be one of .*got 'kto'"),
    ({"loss_type": []}, r"loss_type must be one of .*non-empty"),
    ({"loss_type": ["simpo", "sigmoid"]}, r"'simpo' .* only be combined with 'sft'"),
    ({"beta": 0.0}, r"beta must be a positive"),
    ({"beta": -1.0}, r"beta must be a positive"),
    ({"beta": float("nan")}, r"beta must be a positive"),
    ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, r"loss_weights must have one weight .*expected 2"),
    ({"loss_weights": [1.0, 2.0]}, r"loss_weights must have one weight .*expected 1 .*got 2"),
    ({"loss_weights": [float("inf")]}, r"loss_weights\[0\] must be a finite number"),
    ({"loss_weights": ["1"]}, r"loss_weights\[0\] must be a finite number", TypeError),
    ({"beta": "0.1"}, r"beta must be a positive finite number, got str", TypeError),
    ({"beta": True}, r"beta must be a positive finite number, got bool", TypeError),
    ({"label_smoothing": "0.1"}, r"label_smoothing must be a finite number", TypeError),
    ({"label_smoothing": 0.5}, r"label_smoothing must lie in \[0, 0.5\) for loss_type 'sigmoid'"),
    ({"label_smoothing": -0.1, "loss_type": "robust"}, r"label_smoothing must lie in \[0, 0.5\) for .*'robust'"),
    ({"loss_type": "exo_pair"}, r"label_smoothing must lie in \(0, 1\) for loss_type 'exo_pair'"),
    ({"loss_type": "exo_pair", "label_smoothing": 1.0}, r"label_smoothing must lie in \(0, 1\)"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, r"label_smoothing must be 0.0 for loss_type \['hinge'\]"),
    ({"label_smoothing": float("nan")}, r"label_smoothing must be a finite"),
    ({"gama": 1.0}, r"unknown loss parameter\(s\) \['gama'\]"),
    ({"gamma": 1.0}, r"loss parameter 'gamma' is not used by loss_type \['sigmoid'\]"),
    ({"alpha": 0.3}, r"loss parameter 'alpha' is not used .*reverse_kl"),
    ({"f_divergence_type": "kl"}, r"f_divergence_type must be one of"),
    ({"loss_type": "aot", "f_divergence_type": "forward_kl"}, r"f_divergence_type='forward_kl' is only supported"),
    ({"loss_type": "discopop", "discopop_tau": 0.0}, r"discopop_tau must be a positive"),
    ({"loss_type": "simpo", "gamma": float("inf")}, r"gamma must be a finite"),
    ({"f_divergence_type": "alpha_divergence", "alpha": "x"}, r"alpha must be a finite", TypeError),
    ({"loss_type": "bco_pair", "bco_delta": torch.zeros(2)}, r"bco_delta must be"),
    ({"reference_free": 1}, r"reference_free must be a bool", TypeError),
]


@pytest.mark.parametrize("kwargs,match,error", [case + (ValueError,) * (3 - len(case)) for case in BAD_CONFIGS])
def test_bad_config_raises(kwargs, match, error):
    with pytest.raises(error, match=match):
        check_loss_config(**kwargs)
    x = make_inputs(seed=19)
    with pytest.raises(error, match=match):
        run(x, **kwargs)


def test_bad_tensors_raise():
    x = make_inputs(seed=20)
    c, r, rc, rr = (x[k].float() for k in ("c", "r", "rc", "rr"))
    lc, lr = x["lc"], x["lr"]
    cases = [
        (lambda: preference_loss(c, r[:-1], rc, rr), r"rejected_logps must have shape \[8\]"),
        (lambda: preference_loss(c, r, rc[:-1], rr), r"ref_chosen_logps must have shape \[8\]"),
        (lambda: preference_loss(c, r, rc, rr.view(2, 4)), r"ref_rejected_logps must have shape"),
        (lambda: preference_loss(c.view(2, 4), r.view(2, 4), rc, rr), r"chosen_logps must have shape \[B\]"),
        (lambda: preference_loss(c.long(), r, rc, rr), r"chosen_logps must be a floating-point tensor"),
        (lambda: preference_loss(c, r.tolist(), rc, rr), r"rejected_logps must be a floating-point tensor"),
        (lambda: preference_loss(c, r, None, rr), r"ref_chosen_logps is required .*reference_free=True"),
        (lambda: preference_loss(c, r, rc), r"ref_rejected_logps is required"),
        (lambda: preference_loss(c, r, rc, rr, loss_type="ipo", rejected_lengths=lr),
         r"chosen_lengths .* is required for loss_type \['ipo'\]"),
        (lambda: preference_loss(c, r, loss_type="simpo", chosen_lengths=lc), r"rejected_lengths .* is required"),
        (lambda: preference_loss(c, r, rc, rr, loss_type="sigmoid_norm", chosen_lengths=lc.float(),
                                 rejected_lengths=lr), r"chosen_lengths must be an integer tensor"),
        (lambda: preference_loss(c, r, rc, rr, loss_type="sft", chosen_lengths=lc,
                                 rejected_lengths=lr[:3]), r"rejected_lengths must have shape \[8\]"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_nan_inputs_propagate():
    x = make_inputs(seed=21)
    c = x["c"].float().clone()
    c[2] = float("nan")
    out = preference_loss(c, x["r"].float(), x["rc"].float(), x["rr"].float())
    assert torch.isnan(out.losses[2]) and torch.isfinite(out.losses[[0, 1, 3]]).all()
