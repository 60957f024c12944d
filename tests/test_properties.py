"""Property test: random shapes, ignore patterns, packed seq_ids, transforms and logit offsets up to 1e4,
both input forms of `fastdpo.sequence_logps` against float64.

Bound (documented in README "Head modes"): |logps - float64| <= 1e-5 |float64| + n_tokens * 2^-24 * (4 + 8 A),
with A = logit_scale / temperature * max |raw logit| when a transform or the fused form rounds large logits
to fp32 (any fp32 head does), A = 0 for untransformed logits (the log-softmax itself is cancellation-free);
the 4 * 2^-24 per token is the fp32 rounding of log(sum exp), visible when a log-prob is near 0.
"""
import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, given, settings

import fastdpo
from reference import head_logits_f64, sequence_logps_f64

EPS32 = 2.0 ** -24


@st.composite
def problems(draw):
    R, T, V = draw(st.integers(1, 3)), draw(st.integers(2, 9)), draw(st.integers(2, 300))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (R, T), generator=g)
    labels[torch.rand(R, T, generator=g) < draw(st.floats(0.0, 0.9))] = -100
    seq_ids = None
    if draw(st.booleans()):  # packed: each row cut into up to 3 sequences, -1 tail
        cuts = torch.sort(torch.randint(0, 4, (R, T), generator=g), dim=1).values
        seq_ids = torch.where(cuts < 3, cuts + 3 * torch.arange(R)[:, None], -1)
    transforms = {}
    if draw(st.booleans()):
        transforms = dict(logit_scale=draw(st.floats(0.25, 4.0)), temperature=draw(st.floats(0.25, 4.0)),
                          softcap=draw(st.one_of(st.none(), st.floats(1.0, 50.0))))
    offset = draw(st.sampled_from([0.0, 1.0, 100.0, 1e4])) * draw(st.sampled_from([1.0, -1.0]))
    return g, labels, seq_ids, transforms, offset, V


def _check(logps, n_tokens, expected, expected_n, atol_per_token):
    assert torch.equal(n_tokens.cpu(), expected_n)
    bound = 1e-5 * expected.abs() + expected_n.double() * (4 * EPS32 + atol_per_token)
    assert ((logps.cpu().double() - expected).abs() <= bound).all(), (logps, expected, bound)


def _num_sequences(seq_ids, R):
    return R if seq_ids is None else 3 * R


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problems())
def test_logits_form_matches_float64(device, problem):
    g, labels, seq_ids, transforms, offset, V = problem
    R, T = labels.shape
    logits = torch.randn(R, T, V, generator=g) * 3 + offset
    S = _num_sequences(seq_ids, R)
    out = fastdpo.sequence_logps(logits.to(device), labels.to(device),
                                 None if seq_ids is None else seq_ids.to(device), num_sequences=S, **transforms)
    z = head_logits_f64(logits.reshape(-1, V), torch.eye(V, dtype=torch.float64), **transforms).reshape(R, T, V)
    expected, expected_n = sequence_logps_f64(z, labels, seq_ids, num_sequences=S)
    scale = transforms.get("logit_scale", 1.0) / transforms.get("temperature", 1.0)
    atol = 8 * EPS32 * scale * logits.abs().max().item() if transforms else 0.0
    _check(out.logps, out.n_tokens, expected, expected_n, atol)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problems(), st.integers(1, 24), st.sampled_from(["auto", "recompute", "fused"]))
def test_fused_form_matches_float64(device, problem, D, head_mode):
    g, labels, seq_ids, transforms, offset, V = problem
    R, T = labels.shape
    hidden = torch.randn(R, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) * (3 / D ** 0.5)
    bias = torch.randn(V, generator=g) + offset
    S = _num_sequences(seq_ids, R)
    out = fastdpo.sequence_logps(hidden=hidden.to(device), weight=weight.to(device), bias=bias.to(device),
                                 labels=labels.to(device), seq_ids=None if seq_ids is None else seq_ids.to(device),
                                 num_sequences=S, **transforms)
    raw = head_logits_f64(hidden, weight, bias)
    expected, expected_n = sequence_logps_f64(head_logits_f64(hidden, weight, bias, **transforms), labels, seq_ids,
                                              num_sequences=S)
    scale = transforms.get("logit_scale", 1.0) / transforms.get("temperature", 1.0)
    _check(out.logps, out.n_tokens, expected, expected_n, 8 * EPS32 * scale * raw.abs().max().item())
