"""Packed attention (fastdpo.attention): the segment plan against the dense mask rule, and per-sequence
log-probs and gradients of packed batches against each sequence run alone, for every architecture x attention
implementation x layout that runs on CPU. The CUDA varlen path runs with its kernel replaced by the pure-PyTorch
varlen reference (tests/reference.py), fed the very arguments the kernel would get."""
import contextlib

import pytest
import torch

import fastdpo.attention as attention
from fastdpo.attention import attention_work, bool_mask, flash_attn_varlen_kwargs, segment_plan
from fastdpo.model import forward_hidden, model_loss
from fastdpo.packing import DATASET_SHAPES, PairCollator, pack_pairs
from reference import varlen_attention_f64

import transformers  # noqa: E402

VOCAB = 96
COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=128)
ARCHITECTURES = {  # sliding windows shorter than the sequences, so that they matter
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4,
                                              max_window_layers=1),  # layer 0 full, layer 1 sliding
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=3),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, head_dim=8, sliding_window=4, final_logit_softcapping=2.0,
                                                attn_logit_softcapping=5.0),  # alternating windows, softcaps
    "cohere": lambda: transformers.CohereConfig(**COMMON, logit_scale=0.5),
}
IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")


def random_pairs(B, seed, p=(2, 9), r=(1, 7)):
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        return torch.randint(1, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [seq(*p) for _ in range(B)], [seq(*r) for _ in range(B)], [seq(*r) for _ in range(B)]


PAIRS = random_pairs(4, seed=0)
PAIRS[0][0][:], PAIRS[1][1][:] = [7], [5]  # a 1-token prompt and a 1-token response
PAIRS[0][3][:] = PAIRS[0][2]  # pairs 2 and 3 share a prompt (grouped with group_prompts=True)
LAYOUTS = {"shared": dict(shared_prompt=True), "separate": dict(shared_prompt=False),
           "grouped": dict(shared_prompt=True, group_prompts=True)}
WEIGHTS = torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # d(sum w * logps)


def _norm_in_dtype(norm):
    """transformers' RMSNorm / Cohere LayerNorm compute in float32 even in a float64 model; this is the same
    formula in the input's dtype, so that a float64 model is float64 throughout."""
    name = type(norm).__name__
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))

    def forward(x):
        if name == "CohereLayerNorm":
            x = x - x.mean(-1, keepdim=True)
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return normed * (1.0 + norm.weight) if name == "Gemma2RMSNorm" else norm.weight * normed

    return forward


@pytest.fixture(autouse=True)
def float64_softmax(monkeypatch):
    """transformers' eager attention takes its softmax in float32; float64 inputs keep float64 here."""
    softmax = torch.nn.functional.softmax

    def in_dtype(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=x.dtype if x.dtype == torch.float64 else dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", in_dtype)


def build(arch, dtype=torch.float64):
    torch.manual_seed(0)
    cfg = ARCHITECTURES[arch]()
    cfg._attn_implementation = "eager"
    config_class = type(cfg).__name__.replace("Config", "ForCausalLM")
    model = getattr(transformers, config_class)(cfg).to(dtype).eval()
    for module in model.modules():
        if type(module).__name__.endswith(("RMSNorm", "LayerNorm")):
            module.forward = _norm_in_dtype(module)
    return model


@contextlib.contextmanager
def implementation(model, impl):
    saved = model.config._attn_implementation
    model.config._attn_implementation = impl
    try:
        yield
    finally:
        model.config._attn_implementation = saved


def alone(model):
    """float64 log-probs of every sequence run on its own (eager, no mask), TRL order, and d(sum w * logps)."""
    P, C, R = PAIRS
    logps = []
    for p, x in [(p, c) for p, c in zip(P, C)] + [(p, r) for p, r in zip(P, R)]:
        logits = model(input_ids=torch.tensor([p + x])).logits[0].double()
        logps.append(logits.log_softmax(-1)[len(p) - 1:-1].gather(-1, torch.tensor(x)[:, None]).sum())
    return torch.stack(logps)


def packed(model, batch):
    """float64 per-sequence log-probs from the packed forward's hidden states (head applied here)."""
    head = forward_hidden(model, batch)
    logits = (head.hidden @ head.weight.T).double() * head.logit_scale
    if head.softcap is not None:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    lp = logits[:, :-1].log_softmax(-1)
    lab, sid = batch.labels[:, 1:], batch.seq_ids[:, 1:]
    keep = (lab != batch.ignore_index) & (sid >= 0)
    tok = lp.gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    return torch.zeros(batch.num_sequences, dtype=torch.float64).index_add(0, sid[keep], tok[keep])


def value_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    logps = compute()
    (logps * WEIGHTS).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(arch, dtype=torch.float64):
        if (arch, dtype) not in cache:
            model = build(arch, dtype)
            cache[arch, dtype] = model, value_and_grads(model, lambda: alone(model))
        return cache[arch, dtype]

    return get


@pytest.fixture
def varlen_calls(monkeypatch):
    """The CUDA varlen path on CPU: its kernel replaced by the float64 varlen reference; records the calls."""
    calls = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **options):
        calls.append(dict(cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, total_k=k.shape[0], **options))
        return varlen_attention_f64(q, k, v, cu_q, cu_k, max_q, max_k, **options)

    monkeypatch.setattr(attention, "varlen_kernel", lambda device: kernel)
    return calls


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_packed_equals_each_sequence_alone_f64(references, varlen_calls, arch, impl, layout):
    model, (want, want_grads) = references(arch)
    batch = pack_pairs(*PAIRS, max_tokens=64, pad_to_multiple_of=64, **LAYOUTS[layout])
    assert (batch.report.prompt_tokens_saved > 0) == (layout == "grouped")
    assert batch.report.num_rows == 1 and batch.report.padding_tokens > 0  # several pairs per row, padding
    with implementation(model, impl):
        if impl == "flex_attention":  # FlexAttention has no backward on CPU: log-probs only
            with torch.no_grad():
                got = packed(model, batch)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
            return
        got, got_grads = value_and_grads(model, lambda: packed(model, batch))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert set(got_grads) == set(want_grads) and len(got_grads) >= 10
    for name, grad in got_grads.items():
        # transformers' Cohere rotates q and k in float32: float32 rounding, relative to the largest entry
        atol = 1e-7 * float(want_grads[name].abs().max()) if arch == "cohere" else 1e-12
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-9, atol=atol, msg=name)
    if impl == "flash_attention_2":  # one varlen call per layer, with the plan's arguments
        plan = segment_plan(batch)
        assert len(varlen_calls) == COMMON["num_hidden_layers"]
        assert all(torch.equal(c["cu_q"], plan.cu_seqlens_q) and torch.equal(c["cu_k"], plan.cu_seqlens_k)
                   for c in varlen_calls[:1])
        windows = {c["window"] for c in varlen_calls}
        softcaps = {c["softcap"] for c in varlen_calls}
        assert windows == {"llama": {(-1, 0)}, "cohere": {(-1, 0)}, "mistral": {(2, 0)}, "qwen2": {(-1, 0), (3, 0)},
                           "gemma2": {(-1, 0), (3, 0)}}[arch]
        assert softcaps == ({5.0} if arch == "gemma2" else {None})


def test_fp32_model_loss_matches_each_sequence_alone(references):
    model, (want, want_grads) = references("llama", torch.float32)
    batch = pack_pairs(*PAIRS, max_tokens=64, shared_prompt=True)
    with implementation(model, "sdpa"):
        got, got_grads = value_and_grads(model, lambda: packed(model, batch))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_shared_layout_under_flash_attention_2(varlen_calls):
    """main refused the default (shared-prompt) layout under flash_attention_2 ("flash-attn varlen cannot
    express the shared-prompt layout"); now one varlen call per layer over gathered keys, as exact as sdpa."""
    model = build("llama", torch.float32)
    ref = build("llama", torch.float32)
    batch = pack_pairs(*PAIRS, max_tokens=64, shared_prompt=True)
    with implementation(model, "sdpa"), implementation(ref, "sdpa"):
        want = model_loss(model, batch, ref_model=ref)
    with implementation(model, "flash_attention_2"), implementation(ref, "flash_attention_2"):
        got = model_loss(model, batch, ref_model=ref)
    assert len(varlen_calls) == 2 * COMMON["num_hidden_layers"]  # reference + policy forward
    plan = segment_plan(batch)
    assert varlen_calls[0]["total_k"] == plan.cu_seqlens_k[-1] > plan.cu_seqlens_q[-1]  # prompt keys gathered twice
    torch.testing.assert_close(got.losses, want.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.chosen_logps, want.chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.rejected_logps, want.rejected_logps, rtol=1e-5, atol=1e-5)


def test_no_dense_mask_outside_eager(monkeypatch):
    """sdpa: neither fastdpo's dense masks nor transformers' mask functions run; the attention sees no mask."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a dense [T, T] mask was built")

    for name in ("bool_mask", "eager_mask", "make_mask_mod", "_mask_from_ids"):
        monkeypatch.setattr(attention, name, forbidden)
    monkeypatch.setattr("fastdpo.model.eager_mask", forbidden)
    import transformers.masking_utils as masking

    attention.packed_implementation("sdpa")  # registered before the mask functions are replaced
    for name in ("sdpa", "eager", "flex_attention", "flash_attention_2", "fastdpo|sdpa"):
        monkeypatch.setitem(masking.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name, forbidden)
    model = build("qwen2", torch.float32)  # full and sliding layers
    with implementation(model, "sdpa"):
        out = model_loss(model, pack_pairs(*PAIRS, max_tokens=64), reference_free=True)
        assert torch.isfinite(out.loss) and model.config._attn_implementation == "fastdpo|sdpa"


def test_unpacked_calls_run_the_models_own_implementation():
    """After a packed forward the model keeps "fastdpo|sdpa" (gradient checkpointing reruns the forward in
    backward); a plain call (generation, evaluation) is transformers' sdpa with its own masks."""
    model = build("mistral", torch.float32)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [0, 0, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    with implementation(model, "sdpa"):
        want = model(input_ids=ids, attention_mask=mask).logits
        model_loss(model, pack_pairs(*PAIRS, max_tokens=64), reference_free=True)
        assert model.config._attn_implementation == "fastdpo|sdpa"
        got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("window", [None, 3])
def test_plan_allows_exactly_the_mask_rule(layout, window):
    """Each query's gathered keys [first, last] (within the window) are the keys the dense mask allows."""
    P, C, R = random_pairs(9, seed=3, p=(1, 9), r=(1, 7))
    P[4], P[7] = P[2], P[2]  # a group of three pairs with one prompt
    batch = pack_pairs(P, C, R, max_tokens=40, pad_to_multiple_of=16, **LAYOUTS[layout])
    shared = layout != "separate"
    plan = segment_plan(batch)
    kv = plan.kv_index if plan.kv_index is not None else torch.arange(batch.input_ids.numel())
    first = plan.first_key if window is None else torch.maximum(plan.first_key, plan.last_key - window + 1)
    RT = batch.input_ids.numel()
    allowed = torch.zeros(RT, RT, dtype=torch.bool)
    for q in range(RT):
        allowed[q, kv[first[q]:plan.last_key[q] + 1]] = True
    dense = torch.block_diag(*bool_mask(batch, window)[:, 0])
    assert torch.equal(allowed, dense)
    assert plan.max_seqlen_q == int(plan.cu_seqlens_q.diff().max()) and plan.cu_seqlens_q[-1] == RT
    if not shared:
        assert plan.kv_index is None  # every sequence attends to itself: nothing to gather
    varlen = flash_attn_varlen_kwargs(batch)
    assert torch.equal(varlen["cu_seqlens_k"], plan.cu_seqlens_k) and varlen["max_seqlen_k"] == plan.max_seqlen_k


def test_grouped_prompts_layout():
    """[prompt[:-1]] [p c1] [p r1] [p c2] [p r2]: the prompt context once per group, positions continuing it."""
    batch = pack_pairs([[1, 2, 3], [1, 2, 3], [4]], [[5, 6], [7], [8]], [[9], [10, 11], [12]], group_prompts=True)
    assert batch.report.num_rows == 1 and batch.report.padding_tokens == 0  # max_tokens=None: one row
    assert batch.report.prompt_tokens_saved == 2 and "2 prompt tokens saved" in str(batch.report)
    assert batch.input_ids[0].tolist() == [1, 2, 3, 5, 6, 3, 9, 3, 7, 3, 10, 11, 4, 8, 4, 12]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3, 2, 3, 2, 3, 4, 0, 1, 0, 1]
    assert batch.seq_ids[0].tolist() == [-1, -1, -1, 0, 0, -1, 3, -1, 1, -1, 4, 4, -1, 2, -1, 5]
    assert batch.branch_ids[0].tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 4, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="group_prompts=True needs shared_prompt=True"):
        pack_pairs([[1]], [[2]], [[3]], shared_prompt=False, group_prompts=True)
    with pytest.raises(ValueError, match="group_prompts=True needs shared_prompt=True"):
        PairCollator(shared_prompt=False, group_prompts=True)
    rows = [([1, 2, 3], [5, 6], [9]), ([1, 2, 3], [7], [10, 11]), ([4], [8], [12])]
    assert torch.equal(PairCollator(group_prompts=True)(rows).input_ids, batch.input_ids)
    with pytest.raises(ValueError, match="prompt group 0 need 12 tokens > max_tokens=8"):
        pack_pairs([[1, 2, 3]] * 2, [[5, 6]] * 2, [[9]] * 2, max_tokens=8, group_prompts=True)


def test_plan_is_built_once_per_batch_and_device():
    batch = pack_pairs(*PAIRS, max_tokens=64)
    assert segment_plan(batch) is segment_plan(batch, "cpu")


def test_plan_refuses_positions_that_do_not_follow_the_segments():
    batch = pack_pairs(*PAIRS, max_tokens=64)
    batch.position_ids[0, 3] += 1
    with pytest.raises(ValueError, match="position_ids do not follow its segments"):
        segment_plan(batch)


def test_refused_implementations_are_named():
    model = build("llama", torch.float32)
    batch = pack_pairs(*PAIRS, max_tokens=64)
    with implementation(model, "paged|sdpa"), pytest.raises(ValueError, match=r"'paged\|sdpa' is not supported"):
        model_loss(model, batch, reference_free=True)
    with pytest.raises(ValueError, match="'my_kernel' is not supported"):
        attention.packed_implementation("my_kernel")


def test_attention_work_is_the_sum_over_segments():
    """4 UltraFeedback-like pairs in one row: the dense mask computes ~7x the entries the segments allow;
    per-segment SDPA at most 1.3x, a varlen kernel the segments themselves."""
    prompt, response = DATASET_SHAPES["ultrafeedback"]
    pairs = [[[1] * prompt] * 4, [[2] * response] * 4, [[3] * response] * 4]
    for shared in (True, False):
        work = attention_work(segment_plan(pack_pairs(*pairs, max_tokens=4 * 1136, shared_prompt=shared)))
        assert work["dense_mask"] > 4 * work["segments"]
        assert work["segments"] <= work["segment_sdpa"] <= 1.3 * work["segments"]
    plan = segment_plan(pack_pairs(*pairs, max_tokens=4 * 1136))
    assert attention_work(plan, sliding_window=64)["segments"] < attention_work(plan)["segments"]


@pytest.mark.parametrize("window", [None, 40])
def test_flex_block_mask_spans_many_blocks(varlen_calls, window):
    """Several 128-token query blocks, segments straddling block edges: flex (forward), per-segment SDPA and the
    varlen path (through the float64 reference) agree on random q/k/v, GQA, with and without a window."""
    P, C, R = random_pairs(12, seed=4, p=(5, 40), r=(5, 40))
    plan = segment_plan(pack_pairs(P, C, R, max_tokens=200, pad_to_multiple_of=32))
    assert plan.num_rows * plan.row_length > 3 * 128
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(plan.num_rows * plan.row_length, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    want = attention.segment_sdpa(q, k, v, plan, window=window)
    torch.testing.assert_close(attention.segment_flex(q, k, v, plan, window=window), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attention.segment_varlen(q, k, v, plan, window=window), want, rtol=1e-12, atol=1e-12)
    assert len(varlen_calls) == 1
