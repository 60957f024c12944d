"""fastdpo.sequence_logps on both backends (Triton through the interpreter) against float64."""
import pytest
import torch

import fastdpo
from reference import head_logits_f64, random_labels, rel_err, sequence_logps_f64

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _packed_seq_ids(R, T, seed=0):
    """Each row holds 2-3 sequences back to back, with padding (-1) at the end; S sequences in total."""
    g = torch.Generator().manual_seed(seed)
    seq_ids = torch.full((R, T), -1)
    next_id = 0
    for r in range(R):
        cuts = sorted(torch.randperm(T - 2, generator=g)[:2].add(1).tolist()) + [T - 1]
        start = 0
        for end in cuts:
            seq_ids[r, start:end] = next_id
            next_id += 1
            start = end
    return seq_ids, next_id


CASES = {  # name: (R, T, V, packed)
    "rows": (3, 9, 300, False),
    "multi-block-vocab": (2, 5, 4096 + 77, False),
    "packed": (2, 12, 130, True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_logits_form_forward_and_backward_match_float64(backend, dtype, case):
    R, T, V, packed = CASES[case]
    torch.manual_seed(1)
    logits = (torch.randn(R, T, V) * 4).to(dtype).requires_grad_()
    labels = random_labels(R, T, V, seed=2)
    seq_ids, S = _packed_seq_ids(R, T) if packed else (None, None)

    out = fastdpo.sequence_logps(logits, labels, seq_ids, num_sequences=S, backend=backend)
    expected, expected_n = sequence_logps_f64(logits.detach(), labels, seq_ids, num_sequences=S)
    assert out.logps.dtype == torch.float32
    assert rel_err(out.logps, expected) <= 1e-5  # fp32 math on the (possibly bf16) logits
    assert torch.equal(out.n_tokens, expected_n)

    upstream = torch.randn(out.logps.shape[0])
    (grad,) = torch.autograd.grad(out.logps, logits, upstream)
    leaf = logits.detach().double().requires_grad_()
    (expected_grad,) = torch.autograd.grad(
        sequence_logps_f64(leaf, labels, seq_ids, num_sequences=S)[0], leaf, upstream.double())
    assert grad.dtype == dtype
    assert rel_err(grad, expected_grad) <= TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_false_and_single_row_labels(backend):
    torch.manual_seed(3)
    logits = torch.randn(7, 40)
    labels = random_labels(1, 7, 40, prompt_len=0, seed=4)[0]
    out = fastdpo.sequence_logps(logits, labels, shift=False, backend=backend)
    expected, n = sequence_logps_f64(logits[None], labels[None], shift=False)
    assert rel_err(out.logps, expected) <= 1e-5 and torch.equal(out.n_tokens, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_logits_are_handled(backend):
    torch.manual_seed(5)
    wide = torch.randn(2, 6, 90)
    logits = wide[:, :, 10:80]  # row stride 90, vocab 70
    transposed = torch.randn(2, 70, 6).transpose(1, 2)  # vocab axis not contiguous
    labels = random_labels(2, 6, 70, seed=6)
    for x in (logits, transposed):
        out = fastdpo.sequence_logps(x, labels, backend=backend)
        assert rel_err(out.logps, sequence_logps_f64(x, labels)[0]) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_without_tokens_has_zero_logp(backend):
    logits = torch.randn(2, 5, 20)
    labels = torch.randint(0, 20, (2, 5))
    labels[1] = -100
    out = fastdpo.sequence_logps(logits, labels, backend=backend)
    assert out.logps[1].item() == 0.0 and out.n_tokens.tolist() == [4, 0]
    assert out.logps[0].item() < 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_are_bitwise_deterministic(backend):
    torch.manual_seed(7)
    logits = torch.randn(3, 10, 500, requires_grad=True)
    labels = random_labels(3, 10, 500, seed=8)
    seq_ids, S = _packed_seq_ids(3, 10)
    runs = []
    for _ in range(2):
        out = fastdpo.sequence_logps(logits, labels, seq_ids, num_sequences=S, backend=backend)
        (grad,) = torch.autograd.grad(out.logps.sum() * 1.5, logits)
        runs.append((out.logps, grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_gradient_into_logits(backend):
    torch.manual_seed(9)
    base = torch.randn(2, 6, 64)
    labels = random_labels(2, 6, 64, seed=10)
    logits = base.clone().requires_grad_()
    (expected,) = torch.autograd.grad(fastdpo.sequence_logps(logits, labels, backend=backend).logps.sum(), logits)
    leaf = base.clone().requires_grad_()
    buffer = leaf * 1.0  # a non-leaf whose storage may be reused
    out = fastdpo.sequence_logps(buffer, labels, backend=backend, inplace_backward=True)
    out.logps.sum().backward()
    assert torch.equal(leaf.grad, expected)
    assert torch.equal(buffer.detach(), expected)  # the logits buffer now holds the gradient


def test_gradcheck_float64_torch_backend():
    torch.manual_seed(11)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = random_labels(2, 5, 7, prompt_len=1, seed=12)
    hidden = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    f_logits = lambda x: fastdpo.sequence_logps(x, labels, backend="torch").logps
    f_fused = lambda h, w, b: fastdpo.sequence_logps(hidden=h, weight=w, bias=b, labels=labels, softcap=3.0,
                                                     logit_scale=0.7, temperature=1.3, backend="torch").logps
    assert torch.autograd.gradcheck(f_logits, (logits,))
    assert torch.autograd.gradcheck(f_fused, (hidden, weight, bias))


FUSED_CASES = {  # name: (R, T, D, V, bias, transforms)
    "plain": (2, 9, 24, 150, False, {}),
    "bias-softcap": (3, 7, 40, 97, True, {"softcap": 2.5}),
    "scale-temperature": (2, 8, 16, 70, True, {"logit_scale": 0.6, "temperature": 0.8}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_form_forward_and_backward_match_float64(backend, dtype, case):
    R, T, D, V, with_bias, transforms = FUSED_CASES[case]
    torch.manual_seed(13)
    hidden = torch.randn(R, T, D).to(dtype).requires_grad_()
    weight = (torch.randn(V, D) / D ** 0.5 * 3).to(dtype).requires_grad_()
    bias = torch.randn(V).to(dtype).requires_grad_() if with_bias else None
    labels = random_labels(R, T, V, prompt_len=3, seed=14)
    inputs = [t for t in (hidden, weight, bias) if t is not None]

    out = fastdpo.sequence_logps(hidden=hidden, weight=weight, bias=bias, labels=labels, backend=backend,
                                 **transforms)
    upstream = torch.randn(R)
    grads = torch.autograd.grad(out.logps, inputs, upstream)

    leaves = [t.detach().double().requires_grad_() for t in inputs]
    h, w, b = leaves if with_bias else (*leaves, None)
    expected = sequence_logps_f64(head_logits_f64(h, w, b, **transforms), labels)[0]
    expected_grads = torch.autograd.grad(expected, leaves, upstream.double())
    assert rel_err(out.logps, expected) <= TOL[dtype]  # the GEMM head rounds bf16 logits to bf16
    for name, g, e in zip(("hidden", "weight", "bias"), grads, expected_grads):
        assert g.dtype == dtype, name
        assert rel_err(g, e) <= TOL[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_form_equals_logits_form(backend):
    torch.manual_seed(15)
    hidden = torch.randn(2, 10, 32, requires_grad=True)
    weight = torch.randn(200, 32, requires_grad=True)
    labels = random_labels(2, 10, 200, prompt_len=4, seed=16)
    seq_ids, S = _packed_seq_ids(2, 10)
    fused = fastdpo.sequence_logps(hidden=hidden, weight=weight, labels=labels, seq_ids=seq_ids, backend=backend)
    plain = fastdpo.sequence_logps(hidden @ weight.T, labels, seq_ids, backend=backend)
    assert rel_err(fused.logps, plain.logps) <= 1e-5 and torch.equal(fused.n_tokens, plain.n_tokens)
    g_fused = torch.autograd.grad(fused.logps.sum(), (hidden, weight))
    g_plain = torch.autograd.grad(plain.logps.sum(), (hidden, weight))
    for a, b in zip(g_fused, g_plain):
        assert rel_err(a, b) <= 1e-5


def test_reference_path_saves_nothing_for_backward():
    hidden = torch.randn(2, 6, 8)
    weight = torch.randn(30, 8)
    labels = random_labels(2, 6, 30, seed=17)
    with torch.no_grad():
        out = fastdpo.sequence_logps(hidden=hidden, weight=weight.requires_grad_(), labels=labels)
    assert out.logps.grad_fn is None and not out.logps.requires_grad


def test_nan_in_scored_logits_is_reported():
    logits = torch.randn(2, 4, 10)
    labels = torch.randint(0, 10, (2, 4))
    logits[1, 2, 5] = float("nan")
    with pytest.raises(FloatingPointError, match="logits contain NaN or inf"):
        fastdpo.sequence_logps(logits, labels)
    out = fastdpo.sequence_logps(logits, labels, check_finite=False)
    assert torch.isnan(out.logps[1]) and torch.isfinite(out.logps[0])


BAD_INPUTS = {
    "label out of range": (dict(logits=torch.randn(2, 4, 10), labels=torch.tensor([[1, 2, 10, 3], [0, 0, 0, 0]])),
                           r"labels must lie in \[0, 10\)"),
    "negative label": (dict(logits=torch.randn(1, 3, 10), labels=torch.tensor([[1, -5, 2]])), "labels must lie"),
    "shape mismatch": (dict(logits=torch.randn(2, 4, 10), labels=torch.zeros(2, 5, dtype=torch.long)),
                       "logits must have shape"),
    "integer logits": (dict(logits=torch.zeros(2, 4, 10, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long)),
                       "logits must be a floating-point tensor"),
    "float labels": (dict(logits=torch.randn(2, 4, 10), labels=torch.zeros(2, 4)), "labels must be an int64 or int32"),
    "seq_ids shape": (dict(logits=torch.randn(2, 4, 10), labels=torch.zeros(2, 4, dtype=torch.long),
                           seq_ids=torch.zeros(2, 3, dtype=torch.long)), "seq_ids must have the shape of labels"),
    "seq_ids range": (dict(logits=torch.randn(1, 4, 10), labels=torch.zeros(1, 4, dtype=torch.long),
                           seq_ids=torch.tensor([[0, 1, -2, 1]])), r"seq_ids must lie in \[-1, 2\)"),
    "seq_ids all -2": (dict(logits=torch.randn(1, 4, 10), labels=torch.zeros(1, 4, dtype=torch.long),
                            seq_ids=torch.full((1, 4), -2)), r"seq_ids must be >= -1 .* found -2"),
    "token_weights shape": (dict(logits=torch.randn(1, 4, 10), labels=torch.zeros(1, 4, dtype=torch.long),
                                 token_weights=torch.ones(1, 3)), r"token_weights must have the shape of labels"),
    "token_weights nan": (dict(logits=torch.randn(1, 4, 10), labels=torch.zeros(1, 4, dtype=torch.long),
                               token_weights=torch.tensor([[1.0, float("nan"), 1.0, 1.0]])),
                          "token_weights must be finite"),
    "empty batch": (dict(logits=torch.randn(0, 4, 10), labels=torch.zeros(0, 4, dtype=torch.long)), "empty batch"),
    "both forms": (dict(logits=torch.randn(1, 4, 10), hidden=torch.randn(1, 4, 3), weight=torch.randn(10, 3),
                        labels=torch.zeros(1, 4, dtype=torch.long)), "not both"),
    "hidden/weight dims": (dict(hidden=torch.randn(1, 4, 3), weight=torch.randn(10, 5),
                                labels=torch.zeros(1, 4, dtype=torch.long)), "hidden must have shape"),
    "weight dtype": (dict(hidden=torch.randn(1, 4, 3), weight=torch.randn(10, 3, dtype=torch.float64),
                          labels=torch.zeros(1, 4, dtype=torch.long)), "weight dtype"),
    "bias length": (dict(hidden=torch.randn(1, 4, 3), weight=torch.randn(10, 3), bias=torch.randn(9),
                         labels=torch.zeros(1, 4, dtype=torch.long)), r"bias must have shape \(10,\)"),
    "bad backend": (dict(logits=torch.randn(1, 4, 10), labels=torch.zeros(1, 4, dtype=torch.long), backend="cuda"),
                    "backend must be one of"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_a_clear_error(case):
    kwargs, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        fastdpo.sequence_logps(**kwargs)


def _weighted_f64(logits, labels, seq_ids, weights, S):
    """sum_t weights[t] * log p(labels[t]) per sequence, float64, shifted as Hugging Face labels."""
    logp = torch.log_softmax(logits.double(), -1)[:, :-1]
    target, seq, w = labels[:, 1:], seq_ids[:, 1:], weights[:, 1:].double()
    scored = (target != -100) & (seq >= 0)
    token = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return torch.zeros(S, dtype=torch.float64).index_add(0, seq[scored], (token * w)[scored])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["logits", "fused"])
def test_token_weights_weight_each_token_in_its_sequence_sum(backend, form):
    """LD-DPO-style weights (1, alpha and 0 among the scored tokens): the weighted sums and their gradients match
    float64; n_tokens still counts every scored token; fastdpo.loss weights a computed reference the same way."""
    R, T, V, D = 2, 12, 130, 16
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(R, T, D, generator=g).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / 4).requires_grad_()
    labels = random_labels(R, T, V, seed=5)
    seq_ids, S = _packed_seq_ids(R, T, seed=6)
    S += S % 2  # an even number of sequences for fastdpo.loss
    weights = torch.tensor([1.0, 0.3, 0.0])[torch.randint(0, 3, (R, T), generator=g)]
    inputs = dict(logits=hidden @ weight.T) if form == "logits" else dict(hidden=hidden, weight=weight)
    out = fastdpo.sequence_logps(**inputs, labels=labels, seq_ids=seq_ids, num_sequences=S, token_weights=weights,
                                 backend=backend)
    leaf_h, leaf_w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = _weighted_f64(leaf_h @ leaf_w.T, labels, seq_ids, weights, S)
    assert rel_err(out.logps, expected) <= 1e-5
    assert torch.equal(out.n_tokens, fastdpo.sequence_logps(**inputs, labels=labels, seq_ids=seq_ids,
                                                            num_sequences=S, backend=backend).n_tokens)
    upstream = torch.randn(S, generator=g)
    got = torch.autograd.grad(out.logps, (hidden, weight), upstream)
    want = torch.autograd.grad(expected, (leaf_h, leaf_w), upstream.double())
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5

    ref_weight = weight.detach() + 0.01
    reference = dict(ref_logits=hidden.detach() @ ref_weight.T) if form == "logits" else \
        dict(ref_hidden=hidden.detach(), ref_weight=ref_weight)
    loss = fastdpo.loss(**inputs, labels=labels, seq_ids=seq_ids, num_sequences=S, token_weights=weights,
                        backend=backend, **reference)
    ref_expected = _weighted_f64(hidden.detach() @ ref_weight.T, labels, seq_ids, weights, S)
    assert rel_err(torch.cat([loss.chosen_logps, loss.rejected_logps]), expected) <= 1e-5
    assert rel_err(torch.cat([loss.ref_chosen_logps, loss.ref_rejected_logps]), ref_expected) <= 1e-5
