"""The LM head modes of `fastdpo.ops.linear_sequence_logps` against float64, on both backends.

Values, logit sums and all gradients for every head mode x dtype x transforms x bias; chunk boundaries,
frozen head, autocast, determinism, NaN upstream gradients and refused options.
"""
import pytest
import torch

import fastdpo.head
from fastdpo.ops import linear_sequence_logps
from reference import head_logits_f64, rel_err

BACKENDS = ["torch", "triton"]
MODES = ["stored", "recompute", "fused", "auto"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
TRANSFORMS = {"plain": {}, "scale-softcap-temperature": {"logit_scale": 1.5, "softcap": 8.0, "temperature": 0.7}}


def _problem(N=14, D=24, V=97, S=3, *, dtype=torch.float32, with_bias=True, bias_offset=0.0, seed=0):
    """Random head inputs (CPU, float64 masters) and a token plan with unscored (-1) tokens."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * (2.0 / D ** 0.5)
    bias = torch.randn(V, generator=g, dtype=torch.float64) + bias_offset if with_bias else None
    seq_index = torch.randint(0, S, (N,), generator=g)
    seq_index[torch.rand(N, generator=g) < 0.25] = -1
    targets = torch.where(seq_index >= 0, torch.randint(0, V, (N,), generator=g), -1)
    inputs = [t.to(dtype) for t in (hidden, weight, bias) if t is not None]
    return inputs, targets, seq_index, S


def _on(device, tensors, requires_grad=True):
    return [t.to(device).requires_grad_(requires_grad) for t in tensors]


def _expected(inputs, targets, seq_index, S, upstream, transforms):
    """float64 (logps, logit_sums, grads of (upstream . logps) w.r.t. inputs) from the inputs' values."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in inputs]
    z = head_logits_f64(*leaves, **transforms)
    scored = seq_index >= 0
    logp = torch.log_softmax(z, dim=-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    logps = torch.zeros(S, dtype=torch.float64).index_add(0, seq_index[scored], logp[scored])
    logit_sums = torch.zeros(S, dtype=torch.float64).index_add(0, seq_index[scored], z.sum(1)[scored])
    grads = torch.autograd.grad(logps, leaves, upstream.double())
    return logps.detach(), logit_sums.detach(), grads


def _run(inputs, targets, seq_index, S, upstream, device, **options):
    hidden, weight, bias = (*inputs, None) if len(inputs) == 2 else inputs
    logps, logit_sums = linear_sequence_logps(hidden, weight, bias, targets.to(device), seq_index.to(device), S,
                                              **options)
    grads = torch.autograd.grad(logps, [t for t in inputs if t.requires_grad], upstream.to(device))
    return logps, logit_sums, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("transforms", TRANSFORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_head_mode_matches_float64(mode, dtype, transforms, with_bias, backend, device):
    inputs, targets, seq_index, S = _problem(dtype=dtype, with_bias=with_bias)
    inputs = _on(device, inputs)
    upstream = torch.randn(S, generator=torch.Generator().manual_seed(1))
    logps, logit_sums, grads = _run(inputs, targets, seq_index, S, upstream, device, backend=backend,
                                    head_mode=mode, **TRANSFORMS[transforms])
    expected, expected_sums, expected_grads = _expected(inputs, targets, seq_index, S, upstream,
                                                        TRANSFORMS[transforms])
    assert logps.dtype == logit_sums.dtype == torch.float32
    assert rel_err(logps, expected) <= TOL[dtype]
    assert rel_err(logit_sums, expected_sums) <= TOL[dtype]
    for name, grad, want, leaf in zip(("hidden", "weight", "bias"), grads, expected_grads, inputs):
        assert grad.dtype == leaf.dtype and grad.device == leaf.device, name
        assert rel_err(grad, want) <= TOL[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["stored", "recompute", "auto"])
def test_many_chunks_match_one_chunk_and_float64(mode, backend, device, monkeypatch):
    """A budget of 3 rows of logits splits the 14 scored-or-not rows into chunks of 3 (stored: default budget)."""
    inputs, targets, seq_index, S = _problem(seed=2)
    V, itemsize = inputs[1].shape[0], inputs[1].element_size()
    budget = 3 * V * itemsize
    if mode == "stored":  # an explicit budget below M x V is refused for "stored": shrink the default
        monkeypatch.setattr(fastdpo.head, "CPU_HEAD_MEMORY_BUDGET", budget)
        monkeypatch.setattr(fastdpo.head, "CUDA_HEAD_MEMORY_FRACTION", 0.0)
    options = dict(backend=backend, head_mode=mode, softcap=6.0,
                   head_memory_budget=None if mode == "stored" else budget)
    upstream = torch.randn(S, generator=torch.Generator().manual_seed(3))
    chunked = _run(_on(device, inputs), targets, seq_index, S, upstream, device, **options)
    expected, expected_sums, expected_grads = _expected(inputs, targets, seq_index, S, upstream, {"softcap": 6.0})
    assert rel_err(chunked[0], expected) <= 1e-5 and rel_err(chunked[1], expected_sums) <= 1e-5
    for grad, want in zip(chunked[2], expected_grads):
        assert rel_err(grad, want) <= 1e-5


def test_chunk_count_follows_the_budget():
    inputs, targets, seq_index, S = _problem()
    weight = inputs[1]
    head = fastdpo.head.make_head(None, head_mode="recompute", head_memory_budget=3 * 97 * 4 + 5, weight=weight,
                                  num_rows=11, transforms={}, fp32_precision="ieee", needs_grad=True)
    assert head.chunk_rows == 3 and not head.store
    auto = lambda budget: fastdpo.head.make_head(None, head_mode="auto", head_memory_budget=budget, weight=weight,
                                                 num_rows=11, transforms={}, fp32_precision="ieee", needs_grad=True)
    assert auto(11 * 97 * 4).store and not auto(11 * 97 * 4 - 1).store


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_frozen_head_gives_hidden_grad_only(mode, backend, device):
    inputs, targets, seq_index, S = _problem(seed=4)
    hidden, weight, bias = _on(device, inputs[:1]) + _on(device, inputs[1:], requires_grad=False)
    upstream = torch.randn(S, generator=torch.Generator().manual_seed(5))
    _, _, (grad_hidden,) = _run([hidden, weight, bias], targets, seq_index, S, upstream, device, backend=backend,
                                head_mode=mode)
    _, _, expected_grads = _expected(inputs, targets, seq_index, S, upstream, {})
    assert rel_err(grad_hidden, expected_grads[0]) <= 1e-5
    assert weight.grad is None and bias.grad is None


@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_on_cpu(mode):
    """Under bf16 autocast the ops compute in the input dtypes: fp32 inputs keep fp32 accuracy."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        inputs, targets, seq_index, S = _problem(dtype=dtype, seed=6)
        inputs = _on(torch.device("cpu"), inputs)
        upstream = torch.randn(S, generator=torch.Generator().manual_seed(7))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, _, grads = _run(inputs, targets, seq_index, S, upstream, "cpu", backend="torch", head_mode=mode)
        expected, _, expected_grads = _expected(inputs, targets, seq_index, S, upstream, {})
        assert rel_err(logps, expected) <= tol
        for grad, want, leaf in zip(grads, expected_grads, inputs):
            assert grad.dtype == leaf.dtype and rel_err(grad, want) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_deterministic(mode, backend, device):
    inputs, targets, seq_index, S = _problem(dtype=torch.bfloat16, seed=8)
    upstream = torch.randn(S, generator=torch.Generator().manual_seed(9))
    options = dict(backend=backend, head_mode=mode, head_memory_budget=4 * 97 * 2, softcap=5.0)
    if mode == "stored":
        options["head_memory_budget"] = None
    first, second = (_run(_on(device, inputs), targets, seq_index, S, upstream, device, **options) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_nan_upstream_gradient_propagates(mode, backend, device):
    inputs, targets, seq_index, S = _problem(seed=10)
    upstream = torch.tensor([1.0, float("nan"), 0.0])
    _, _, (grad_hidden, grad_weight, grad_bias) = _run(_on(device, inputs), targets, seq_index, S, upstream,
                                                       device, backend=backend, head_mode=mode)
    nan_rows = (seq_index == 1).to(device)
    assert grad_hidden[nan_rows].isnan().all() and grad_hidden[~nan_rows].isfinite().all()
    assert grad_weight.isnan().all() and grad_bias.isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_large_bias_small_temperature_tail_rows_stay_finite(mode, backend, device):
    """5 scored rows (a partial tile), bias 1, temperature 0.01: exp(z - lse) must not overflow anywhere."""
    inputs, targets, seq_index, S = _problem(N=5, D=16, V=64, S=2, bias_offset=1.0, seed=11)
    upstream = torch.randn(S, generator=torch.Generator().manual_seed(12))
    logps, _, grads = _run(_on(device, inputs), targets, seq_index, S, upstream, device, backend=backend,
                           head_mode=mode, temperature=0.01)
    expected, _, expected_grads = _expected(inputs, targets, seq_index, S, upstream, {"temperature": 0.01})
    assert rel_err(logps, expected) <= 1e-5
    for grad, want in zip(grads, expected_grads):
        assert grad.isfinite().all() and rel_err(grad, want) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_not_a_multiple_of_16(backend, device):
    inputs, targets, seq_index, S = _problem(N=6, D=8, V=50257, S=2, dtype=torch.bfloat16, seed=13)
    upstream = torch.randn(S, generator=torch.Generator().manual_seed(14))
    logps, _, grads = _run(_on(device, inputs), targets, seq_index, S, upstream, device, backend=backend)
    expected, _, expected_grads = _expected(inputs, targets, seq_index, S, upstream, {})
    assert rel_err(logps, expected) <= 1e-2
    for grad, want in zip(grads, expected_grads):
        assert rel_err(grad, want) <= 1e-2


@pytest.mark.parametrize("fp32_precision", ["ieee", "tf32"])
def test_fp32_precision_on_cpu_is_exact_and_flags_are_restored(fp32_precision):
    """On CPU TF32 is only a permission: both settings give the exact-product result, bit for bit."""
    inputs, targets, seq_index, S = _problem(seed=15)
    upstream = torch.randn(S, generator=torch.Generator().manual_seed(16))
    before = torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    runs = [_run(_on(torch.device("cpu"), inputs), targets, seq_index, S, upstream, "cpu", backend="torch",
                 fp32_precision=precision) for precision in ("ieee", fp32_precision)]
    assert (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp32 products on tensor cores)")
def test_fp32_precision_ieee_does_not_follow_allow_tf32(device):
    if device.type != "cuda":
        pytest.skip("FASTDPO_TEST_DEVICE is not cuda")
    inputs, targets, seq_index, S = _problem(N=256, D=512, V=4096, seed=17)
    upstream = torch.randn(S, generator=torch.Generator().manual_seed(18))
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        logps, _, grads = _run(_on(device, inputs), targets, seq_index, S, upstream, device, head_mode="stored")
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved
    expected, _, expected_grads = _expected(inputs, targets, seq_index, S, upstream, {})
    assert rel_err(logps, expected) <= 1e-5
    assert all(rel_err(g, e) <= 1e-5 for g, e in zip(grads, expected_grads))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with ~16 GB free")
def test_offsets_past_two_to_the_31_elements(device):
    """M x V > 2^31 logits elements in the stored buffer: the last rows must still be right."""
    if device.type != "cuda" or torch.cuda.mem_get_info()[0] < 16 << 30:
        pytest.skip("FASTDPO_TEST_DEVICE is not cuda, or under 16 GB free")
    N, D, V = 17000, 64, 128256  # 2.18e9 > 2^31 logits
    g = torch.Generator().manual_seed(19)
    hidden = torch.randn(N, D, generator=g).to(device, torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / 8).to(device, torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    seq_index = torch.arange(N, device=device)
    logps, _ = linear_sequence_logps(hidden, weight, None, targets, seq_index, N, head_mode="stored")
    (grad_hidden,) = torch.autograd.grad(logps.sum(), [hidden])
    tail = torch.arange(N - 8, N)
    z = hidden[tail].detach().double() @ weight.detach().double().T
    expected = torch.log_softmax(z, -1).gather(1, targets[tail, None]).squeeze(1)
    assert rel_err(logps[tail], expected) <= 1e-2
    assert grad_hidden[tail].isfinite().all() and grad_hidden[tail].abs().sum() > 0


@pytest.mark.parametrize("options, match", [
    (dict(head_mode="stored-ish"), "head_mode"),
    (dict(head_memory_budget=0), "head_memory_budget"),
    (dict(head_memory_budget=-5), "head_memory_budget"),
    (dict(head_memory_budget=1.5e9), "head_memory_budget"),
    (dict(head_memory_budget=True), "head_memory_budget"),
    (dict(head_memory_budget="1GB"), "head_memory_budget"),
    (dict(fp32_precision="fast"), "fp32_precision"),
    (dict(head_mode="stored", head_memory_budget=100), "head_memory_budget"),
])
def test_bad_options_are_refused(options, match):
    inputs, targets, seq_index, S = _problem()
    with pytest.raises(ValueError, match=match):
        _run(_on(torch.device("cpu"), inputs), targets, seq_index, S, torch.ones(S), "cpu", backend="torch",
             **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES + ["reference"])
def test_bf16_logps_match_float64_of_the_same_inputs(mode, backend, device):
    """bf16 inputs: the row math sees fp32 logits in every mode, so the per-sequence log-probs are within 1e-6
    relative of float64 on the same bf16 values (rounding the logits to bf16 first gives ~1e-4)."""
    inputs, targets, seq_index, S = _problem(N=40, D=64, V=512, S=4, dtype=torch.bfloat16, seed=21)
    grad = mode != "reference"
    inputs = _on(device, inputs, requires_grad=grad)
    hidden, weight, bias = inputs
    with torch.set_grad_enabled(grad):
        logps, _ = linear_sequence_logps(hidden, weight, bias, targets.to(device), seq_index.to(device), S,
                                         backend=backend, head_mode="auto" if mode == "reference" else mode)
    expected, _, _ = _expected(inputs, targets, seq_index, S, torch.ones(S), {})
    assert ((logps.double().cpu() - expected).abs() / expected.abs()).max() <= 1e-6


def _exact_large_logits(V=64, D=4, N=12, S=3, seed=22):
    """fp32 inputs whose logits hidden @ W^T + b lie within 8 of +-1e4 and are exact in fp32 (integer hidden,
    weights in quarters, bias 1e4 +- eighths): any gradient error is the softmax's own."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-2, 3, (N, D), generator=g).double()
    weight = torch.randint(-4, 5, (V, D), generator=g).double() / 4
    sign = torch.where(torch.arange(V) % 2 == 0, 1.0, -1.0).double()
    bias = 1e4 * sign + torch.randint(-16, 17, (V,), generator=g).double() / 8
    seq_index = torch.randint(0, S, (N,), generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    return [t.float() for t in (hidden, weight, bias)], targets, seq_index, S


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["stored", "recompute", "fused"])
def test_gradients_exact_at_logits_near_1e4(mode, backend, device):
    """softmax in backward as exp((z - max) - log sum exp(z - max)): no fp32 z - lse cancellation (~5e-4)."""
    inputs, targets, seq_index, S = _exact_large_logits()
    upstream = torch.randn(S, generator=torch.Generator().manual_seed(23))
    _, _, grads = _run(_on(device, inputs), targets, seq_index, S, upstream, device, backend=backend,
                       head_mode=mode)
    _, _, expected_grads = _expected(inputs, targets, seq_index, S, upstream, {})
    for name, grad, want in zip(("hidden", "weight", "bias"), grads, expected_grads):
        assert rel_err(grad, want) <= 1e-5, name


def test_default_budget_is_a_fixed_setting_not_free_memory(monkeypatch):
    """CUDA: a fixed share of the device's total memory; the free memory (which the caching allocator's
    churn changes from step to step) is never read."""
    from types import SimpleNamespace

    def free_memory(*_):
        raise AssertionError("the head budget must not depend on the free memory")

    monkeypatch.setattr(torch.cuda, "mem_get_info", free_memory)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: SimpleNamespace(total_memory=80 << 30))
    budgets = {fastdpo.head.default_head_memory_budget(torch.device("cuda", 0)) for _ in range(3)}
    assert budgets == {10 << 30}
    assert fastdpo.head.default_head_memory_budget(torch.device("cpu")) == fastdpo.head.CPU_HEAD_MEMORY_BUDGET


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_steps_with_allocator_churn_are_bitwise_identical(backend, device):
    """A DPO step (policy forward + backward, reference forward), allocations and frees, the same step again."""
    import fastdpo

    inputs, targets, seq_index, S = _problem(N=24, D=32, V=300, S=2, dtype=torch.bfloat16, with_bias=False, seed=24)
    hidden, weight = (t.to(device) for t in inputs)
    labels = torch.where(seq_index >= 0, targets, -100).reshape(2, 12).to(device)

    def step():
        h, w = hidden.clone().reshape(2, 12, 32).requires_grad_(), weight.clone().requires_grad_()
        out = fastdpo.loss(hidden=h, weight=w, ref_hidden=h.detach() * 0.5, labels=labels, backend=backend)
        out.loss.backward()
        return out.loss, out.chosen_logps, h.grad, w.grad

    first = step()
    churn = [torch.empty(int(n) << 16, device=device) for n in torch.randint(1, 64, (20,))]
    del churn[::2]
    second = step()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_cpu_no_grad_head_token_stats_across_vocabulary_tiles(monkeypatch, transform):
    """Without grad on CPU the head runs the twin's tiled forward: its online entropy and top-1 hit (the first
    maximum, across tiles) match float64, and its log-probs are the same bits with or without token_stats."""
    from fastdpo import torch_ops

    monkeypatch.setattr(torch_ops, "TILE_VOCAB", 32)
    monkeypatch.setattr(torch_ops, "TILE_ROWS", 8)
    g = torch.Generator().manual_seed(24)
    N, D, V, S = 19, 24, 203, 3  # integer logits (exact in fp32 in any summation order): exact ties
    hidden = torch.randint(-1, 2, (N, D), generator=g).float()
    weight = torch.randint(-1, 2, (V, D), generator=g).float()
    weight[150] = weight[70] = 1.0  # tiles 2 and 4 hold the same column ...
    hidden[4] = 1.0  # ... which is row 4's maximum: the first one (70) is its argmax
    z = torch_ops.Transform(**TRANSFORMS[transform]).apply_(hidden.double() @ weight.double().T)
    assert z[4].argmax() == 70 and z[4, 150] == z[4, 70]
    seq_index = torch.arange(N) % S
    targets = z.argmax(-1)
    targets[4], targets[7] = 150, (targets[7] + 1) % V  # a tie lost, a miss
    plain = linear_sequence_logps(hidden, weight, None, targets, seq_index, S, **TRANSFORMS[transform])
    logps, logit_sums, entropy, hits = linear_sequence_logps(hidden, weight, None, targets, seq_index, S,
                                                             token_stats=True, **TRANSFORMS[transform])
    assert torch.equal(plain[0], logps) and torch.equal(plain[1], logit_sums)
    token_entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    want_entropy = torch.zeros(S, dtype=torch.float64).index_add_(0, seq_index, token_entropy)
    want_hits = torch.zeros(S, dtype=torch.float64).index_add_(0, seq_index, (z.argmax(-1) == targets).double())
    assert rel_err(entropy, want_entropy) <= 1e-5 and torch.equal(hits.double(), want_hits)
    assert want_hits.sum() == N - 2


def test_cpu_no_grad_head_keeps_within_a_budget_smaller_than_a_tile(monkeypatch):
    """The twin's tiled forward serves a no-grad CPU call only when one tile (up to TILE_ROWS rows) fits the
    budget; a smaller budget runs the GEMM chunks it allows, with the same values."""
    from fastdpo import torch_ops

    (hidden, weight), targets, seq_index, S = _problem(N=40, V=97, with_bias=False, seed=25)
    calls = []
    tiled = torch_ops.linear_logps_forward
    monkeypatch.setattr(torch_ops, "linear_logps_forward", lambda *a, **k: calls.append(1) or tiled(*a, **k))
    with torch.no_grad():
        wide = linear_sequence_logps(hidden, weight, None, targets, seq_index, S, head_mode="recompute")
        assert calls == [1]
        narrow = linear_sequence_logps(hidden, weight, None, targets, seq_index, S, head_mode="recompute",
                                       head_memory_budget=8 * 97 * 4)  # 8 rows of logits: less than the 30 rows
        assert calls == [1]
    assert rel_err(narrow[0], wide[0]) <= 1e-6


def test_twin_token_stats_keep_the_bits_and_follow_argmax_on_nan(monkeypatch):
    """The twin's row pass sums exp in the same vocabulary blocks with or without token_stats (same bits over
    several blocks), and its top-1 hit is torch.argmax's, NaN rows included (argmax picks the first NaN), on
    both CPU paths: the row functions (grad) and the tiled forward (no grad, several vocabulary tiles)."""
    from fastdpo import torch_ops

    monkeypatch.setattr(torch_ops, "STATS_BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(torch_ops, "TILE_VOCAB", 32)
    g = torch.Generator().manual_seed(26)
    logits = torch.randn(6, 203, generator=g) * 3
    targets = torch.randint(0, 203, (6,), generator=g)
    plain = torch_ops.row_logps_forward(logits.clone(), targets, overwrite=True)
    *with_stats, entropy, top1 = torch_ops.row_logps_forward(logits.clone(), targets, overwrite=True, token_stats=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, with_stats))
    logits[1, 150], targets[1] = float("nan"), 150  # argmax: the NaN, a hit
    logits[2, 40] = float("nan")  # a NaN in an earlier tile than the target's maximum: a miss
    targets[2] = int(logits[2].nan_to_num(-1e9).argmax())
    want = logits.argmax(dim=1) == targets
    assert bool(want[1]) and not bool(want[2])
    assert torch.equal(torch_ops.row_logps_forward(logits.clone(), targets, overwrite=True, token_stats=True)[4], want)
    hidden, rows, weight = torch.eye(6), torch.arange(6), logits.t().contiguous()
    nan_logits = hidden @ weight.t()  # 0 * NaN: columns 40 and 150 are NaN in every row, argmax 40 (tile 1)
    targets[2] = 40
    want = nan_logits.argmax(dim=1) == targets
    assert bool(want[2]) and not bool(want[1])
    tiled = torch_ops.linear_logps_forward(hidden, weight, None, rows, targets, token_stats=True)
    assert torch.equal(tiled[4], want)


def _copies_2d(run):
    """Shapes of the 2-D dtype-converting copies (aten._to_copy) that run() makes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.dim() == 2:
                shapes.append(tuple(out.shape))
            return out

    with Copies():
        run()
    return shapes


def test_16_bit_cpu_head_copies_no_whole_weight_or_logits_block():
    """bf16 on CPU: the twin's tiled forward upcasts the weight one tile at a time (a whole [V, D] fp32 copy is
    2.1 GB at V = 128256, D = 4096), and the GEMM head's row pass writes U / dX into the bf16 buffer without a
    converted [rows, V] temporary."""
    from fastdpo import torch_ops

    (hidden, weight, bias), targets, seq_index, S = _problem(N=20, V=5000, dtype=torch.bfloat16, seed=27)
    rows = torch.nonzero(seq_index >= 0).squeeze(1)
    tiled = _copies_2d(lambda: torch_ops.linear_logps_forward(hidden, weight, bias, rows, targets[rows]))
    assert tiled and max(shape[0] for shape in tiled) <= torch_ops.TILE_VOCAB
    for mode in ("stored", "recompute"):  # the head object itself: a dispatch mode does not see inside custom ops
        head = fastdpo.head.make_head(torch_ops, head_mode=mode, head_memory_budget=None, weight=weight,
                                      num_rows=len(rows), transforms={}, fp32_precision="ieee", needs_grad=True)

        def step():
            saved = head.forward(hidden, weight, bias, rows, targets[rows], keep=True)[2]
            head.backward(hidden, weight, bias, rows, targets[rows], saved, torch.ones(len(rows)), (True,) * 3)

        assert not [shape for shape in _copies_2d(step) if shape == (len(rows), 5000)], mode
