"""fastdpo.model.model_loss on tiny random Hugging Face models vs fastdpo.loss on full logits of unpacked runs."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import fastdpo
from fastdpo.attention import bool_mask, eager_mask, segment_plan
from fastdpo.model import attention_inputs, forward_hidden, logit_transforms, model_loss, model_sequence_logps
from fastdpo.packing import pack_pairs
from reference import sequence_logps_f64

from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 128
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)


def tiny_llama(impl="sdpa", seed=0, **over):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **over}, attn_implementation=impl)).eval()


def random_pairs(B, seed, p=(1, 9), r=(1, 7), vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    return [seq(*p) for _ in range(B)], [seq(*r) for _ in range(B)], [seq(*r) for _ in range(B)]


def unpacked_logits_batch(model, P, C, R):
    """TRL-style reference batch: each prompt+response run on its own, logits padded into [2B, L, V]."""
    seqs = [(p, c) for p, c in zip(P, C)] + [(p, r) for p, r in zip(P, R)]
    L = max(len(p) + len(x) for p, x in seqs)
    logits, labels = [], []
    for p, x in seqs:
        out = model(input_ids=torch.tensor([p + x])).logits[0]
        pad = L - out.shape[0]
        logits.append(torch.cat([out, out.new_zeros(pad, out.shape[1])]))
        labels.append(torch.tensor([-100] * len(p) + x + [-100] * pad))
    return torch.stack(logits), torch.stack(labels)


def assert_outputs_close(a, b, rtol=1e-5):
    for f in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "losses",
              "chosen_rewards", "rejected_rewards"):
        x, y = getattr(a, f), getattr(b, f)
        if x is None or y is None:
            assert x is None and y is None, f
            continue
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-6, msg=f)
    torch.testing.assert_close(a.loss, b.loss, rtol=rtol, atol=1e-6)
    assert torch.equal(a.chosen_lengths, b.chosen_lengths) and torch.equal(a.rejected_lengths, b.rejected_lengths)
    for k in a.metrics:
        torch.testing.assert_close(a.metrics[k], b.metrics[k], rtol=1e-4, atol=1e-5, msg=k)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl,shared", [("sdpa", True), ("sdpa", False), ("eager", True), ("eager", False)])
def test_model_loss_equals_loss_on_unpacked_logits(impl, shared):
    policy, ref = tiny_llama(impl, seed=0), tiny_llama("sdpa", seed=1)
    P, C, R = random_pairs(5, seed=2)
    batch = pack_pairs(P, C, R, max_tokens=40, shared_prompt=shared)
    assert batch.report.num_rows < 5  # several pairs per row

    out = model_loss(policy, batch, ref_model=ref, beta=0.2)
    out.loss.backward()
    g_packed = grads(policy)
    policy.zero_grad()

    logits, labels = unpacked_logits_batch(policy, P, C, R)
    with torch.no_grad():
        ref_logits, _ = unpacked_logits_batch(ref, P, C, R)
    want = fastdpo.loss(logits=logits, labels=labels, ref_logits=ref_logits, beta=0.2)
    want.loss.backward()
    g_unpacked = grads(policy)

    assert_outputs_close(out, want)
    # float64 spot check of the policy log-probs, independent of fastdpo
    lp = logits.detach().double()[:, :-1].log_softmax(-1)
    lab = labels[:, 1:]
    tok = lp.gather(-1, lab.clamp(min=0)[..., None])[..., 0].masked_fill(lab == -100, 0).sum(1)
    torch.testing.assert_close(torch.cat([out.chosen_logps, out.rejected_logps]).double(), tok, rtol=1e-5, atol=0)
    assert set(g_packed) == set(g_unpacked) and len(g_packed) > 10
    for n in g_packed:
        torch.testing.assert_close(g_packed[n], g_unpacked[n], rtol=1e-3, atol=1e-6, msg=n)
    assert all(p.grad is None for p in ref.parameters())


def test_no_logits_materialised(monkeypatch):
    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    P, C, R = random_pairs(3, seed=3)
    batch = pack_pairs(P, C, R, max_tokens=64)
    head_rows = []  # the LM head runs on an empty slice: no logits
    for m in (policy, ref):
        m.lm_head.register_forward_hook(lambda mod, args, out: head_rows.append(out.shape[-2]))
    model_loss(policy, batch, ref_model=ref).loss.backward()
    assert head_rows == [0, 0]


def test_forward_hidden_matches_model_logits():
    model = tiny_llama("eager")
    P, C, R = random_pairs(4, seed=4)
    batch = pack_pairs(P, C, R, max_tokens=48)
    with torch.no_grad():
        h = forward_hidden(model, batch)
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                       attention_mask=eager_mask(batch)).logits
    assert h.weight is model.lm_head.weight and h.bias is None and (h.logit_scale, h.softcap) == (1.0, None)
    torch.testing.assert_close(model.lm_head(h.hidden), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_model_sequence_logps_equals_unpacked_f64(shared):
    model = tiny_llama(seed=0)
    P, C, R = random_pairs(4, seed=11)
    batch = pack_pairs(P, C, R, max_tokens=40, shared_prompt=shared)
    head_rows = []
    model.lm_head.register_forward_hook(lambda mod, args, out: head_rows.append(out.shape[-2]))
    res = model_sequence_logps(model, batch)
    assert head_rows == [0] and res.logps.dtype == torch.float32 and res.logps.requires_grad  # grad mode is the caller's
    with torch.no_grad():
        logits, labels = unpacked_logits_batch(model, P, C, R)
        assert not model_sequence_logps(model, batch).logps.requires_grad
    want, n_tokens = sequence_logps_f64(logits, labels)
    torch.testing.assert_close(res.logps.detach().double(), want, rtol=1e-5, atol=0)
    assert torch.equal(res.n_tokens, n_tokens)


def test_ref_logps_and_reference_free():
    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    P, C, R = random_pairs(4, seed=5)
    batch = pack_pairs(P, C, R, max_tokens=48)
    with_model = model_loss(policy, batch, ref_model=ref)
    ref_logps = torch.cat([with_model.ref_chosen_logps, with_model.ref_rejected_logps]).detach()
    with_logps = model_loss(policy, batch, ref_logps=ref_logps)
    assert_outputs_close(with_model, with_logps)
    free = model_loss(policy, batch, reference_free=True)
    torch.testing.assert_close(free.chosen_rewards, 0.1 * with_model.chosen_logps)
    with pytest.raises(ValueError, match="ref_logps must have shape"):
        model_loss(policy, batch, ref_logps=ref_logps[:-1])
    with pytest.raises(ValueError, match="needs the reference"):
        model_loss(policy, batch)


def test_reference_runs_in_eval_mode():
    """A reference left in train mode with dropout on is scored in eval mode (as TRL does), its mode restored."""
    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1, attention_dropout=0.5)
    ref.train()
    ref.model.layers[0].eval()  # a submodule with its own mode keeps it
    batch = pack_pairs(*random_pairs(4, seed=5), max_tokens=48)
    first, second = (model_loss(policy, batch, ref_model=ref).loss for _ in range(2))
    assert torch.equal(first, second)
    ref.eval()
    torch.testing.assert_close(model_loss(policy, batch, ref_model=ref).loss, first, rtol=0, atol=0)
    ref.train()
    ref.model.layers[0].eval()
    model_loss(policy, batch, ref_model=ref)
    assert ref.training and ref.model.layers[1].training and not ref.model.layers[0].training


def lora(model, **over):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **over)
    return get_peft_model(model, config)


def test_ref_adapter_disabled():
    base = tiny_llama(seed=0)
    ref = copy.deepcopy(base)
    peft = lora(base)
    P, C, R = random_pairs(4, seed=6)
    batch = pack_pairs(P, C, R, max_tokens=48)
    out = model_loss(peft, batch, ref_adapter_disabled=True)
    want = model_loss(peft, batch, ref_model=ref)
    assert_outputs_close(out, want)
    assert not torch.allclose(out.chosen_logps, out.ref_chosen_logps)  # the adapter does something
    out.loss.backward()
    lora_grads = [p.grad for n, p in peft.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    with pytest.raises(ValueError, match="disable_adapter"):
        model_loss(ref, batch, ref_adapter_disabled=True)


def test_peft_modules_to_save_reference_uses_the_original_head():
    """modules_to_save=["lm_head"]: the policy scores with the trained head copy, the reference (adapters
    disabled) with the original head. main read `get_output_embeddings().weight` (the trained copy) for both."""
    base = tiny_llama(seed=0)
    original = copy.deepcopy(base)
    peft = lora(base, modules_to_save=["lm_head"])
    with torch.no_grad():
        trained_head = peft.base_model.model.lm_head.modules_to_save["default"]
        trained_head.weight.add_(0.5 * torch.randn_like(trained_head.weight))
    P, C, R = random_pairs(4, seed=12)
    batch = pack_pairs(P, C, R, max_tokens=48)
    out = model_loss(peft, batch, ref_adapter_disabled=True)
    with torch.no_grad():
        want_ref = model_sequence_logps(original, batch).logps
        policy_logits, labels = unpacked_logits_batch(peft, P, C, R)
    torch.testing.assert_close(torch.cat([out.ref_chosen_logps, out.ref_rejected_logps]), want_ref,
                               rtol=1e-5, atol=1e-6)
    want_policy, _ = sequence_logps_f64(policy_logits, labels)
    torch.testing.assert_close(torch.cat([out.chosen_logps, out.rejected_logps]).double(), want_policy,
                               rtol=1e-5, atol=0)
    out.loss.backward()
    assert trained_head.weight.grad is not None and peft.base_model.model.lm_head.original_module.weight.grad is None


def test_torch_compile_runs_the_compiled_forward():
    """main called the unwrapped backbone: torch.compile(model) compiled 0 graphs."""
    from torch._dynamo.testing import CompileCounter

    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    batch = pack_pairs(*random_pairs(3, seed=13), max_tokens=48)
    want = model_loss(policy, batch, ref_model=ref)
    counter = CompileCounter()
    torch._dynamo.reset()
    got = model_loss(torch.compile(policy, backend=counter), batch, ref_model=ref)
    assert counter.frame_count >= 1
    assert_outputs_close(got, want)
    torch._dynamo.reset()


def test_accelerate_bf16_autocast_wrapper_is_honoured():
    """accelerate (TRL's default bf16=True) wraps model.forward in autocast; main bypassed it (fp32 backbone)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    P, C, R = random_pairs(3, seed=14)
    batch = pack_pairs(P, C, R, max_tokens=48)
    AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton: earlier tests may set it
    try:
        wrapped = Accelerator(mixed_precision="bf16", cpu=True).prepare_model(policy)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    projection_dtypes = []
    policy.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda mod, args, out: projection_dtypes.append(out.dtype))
    out = model_loss(wrapped, batch, ref_model=ref)
    out.loss.backward()
    assert projection_dtypes == [torch.bfloat16]
    assert policy.lm_head.weight.grad is not None and policy.lm_head.weight.grad.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the same computation, logits form
        logits, labels = unpacked_logits_batch(policy, P, C, R)
    want, _ = sequence_logps_f64(logits.float(), labels)
    torch.testing.assert_close(torch.cat([out.chosen_logps, out.rejected_logps]).double(), want, rtol=2e-2, atol=0.5)


def test_cpu_bf16_autocast_context():
    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    batch = pack_pairs(*random_pairs(3, seed=15), max_tokens=48)
    want = model_loss(policy, batch, ref_model=ref, beta=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model_loss(policy, batch, ref_model=ref, beta=0.5)
    got.loss.backward()
    torch.testing.assert_close(got.chosen_logps, want.chosen_logps, rtol=2e-2, atol=0.1)
    assert policy.lm_head.weight.grad.dtype == torch.float32 and policy.lm_head.weight.grad.abs().sum() > 0


def test_ddp_forward_is_called(tmp_path):
    """main raised "not a Hugging Face causal LM" for a DDP-wrapped model."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
        batch = pack_pairs(*random_pairs(3, seed=16), max_tokens=48)
        want = model_loss(policy, batch, ref_model=ref)
        ddp = torch.nn.parallel.DistributedDataParallel(policy)
        ddp_calls = []
        ddp.register_forward_pre_hook(lambda mod, args: ddp_calls.append(1))
        got = model_loss(ddp, batch, ref_model=ref)
        got.loss.backward()
        assert ddp_calls == [1]
        assert_outputs_close(got, want)
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_head(tmp_path):
    """FSDP2 (fully_shard) exposes the head weight as a DTensor outside its forward: gathered for the loss,
    the gradient flows back to the shards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
        plain = copy.deepcopy(policy)
        batch = pack_pairs(*random_pairs(3, seed=18), max_tokens=48)
        want = model_loss(plain, batch, ref_model=ref)
        want.loss.backward()
        mesh = init_device_mesh("cpu", (1,))
        for module in (*policy.model.layers, policy.lm_head, policy):
            fully_shard(module, mesh=mesh)
        got = model_loss(policy, batch, ref_model=ref)
        got.loss.backward()
        assert_outputs_close(got, want)
        torch.testing.assert_close(policy.lm_head.weight.grad.full_tensor(), plain.lm_head.weight.grad,
                                   rtol=1e-5, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_gradient_checkpointing():
    policy, ref = tiny_llama(seed=0).train(), tiny_llama(seed=1)
    batch = pack_pairs(*random_pairs(3, seed=17), max_tokens=48)
    want = model_loss(policy, batch, ref_model=ref)
    want.loss.backward()
    want_grads = grads(policy)
    policy.zero_grad()
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = model_loss(policy, batch, ref_model=ref)
    got.loss.backward()
    assert_outputs_close(got, want)
    for name, grad in grads(policy).items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["gemma2", "cohere", "mistral"])
def test_other_architectures(arch):
    """Config transforms (Gemma 2 final_logit_softcapping, Cohere logit_scale) and sliding windows
    (Gemma 2 alternating layers, Mistral global window) against unpacked runs of the real model."""
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    torch.manual_seed(0)
    if arch == "gemma2":
        from transformers import Gemma2Config, Gemma2ForCausalLM
        cfg = Gemma2Config(**common, head_dim=8, sliding_window=4, final_logit_softcapping=2.0,
                           attn_logit_softcapping=None, attn_implementation="eager")
        make = lambda: Gemma2ForCausalLM(cfg).eval()  # noqa: E731
    elif arch == "cohere":
        from transformers import CohereConfig, CohereForCausalLM
        cfg = CohereConfig(**common, logit_scale=0.5, attn_implementation="sdpa")
        make = lambda: CohereForCausalLM(cfg).eval()  # noqa: E731
    else:
        from transformers import MistralConfig, MistralForCausalLM
        cfg = MistralConfig(**common, sliding_window=3, attn_implementation="sdpa")
        make = lambda: MistralForCausalLM(cfg).eval()  # noqa: E731
    policy = make()
    head = logit_transforms(policy)
    if arch == "gemma2":
        assert head["softcap"] == 2.0
        assert set(attention_inputs(policy, pack_pairs([[1]], [[2]], [[3]], max_tokens=8))["attention_mask"]) == {
            "full_attention", "sliding_attention"}
    if arch == "cohere":
        assert head["logit_scale"] == 0.5
    P, C, R = random_pairs(4, seed=7, p=(4, 9), r=(3, 7))  # longer than the sliding windows
    batch = pack_pairs(P, C, R, max_tokens=64, shared_prompt=True)
    out = model_loss(policy, batch, reference_free=True)
    logits, labels = unpacked_logits_batch(policy, P, C, R)
    want = fastdpo.loss(logits=logits, labels=labels, reference_free=True)
    torch.testing.assert_close(out.chosen_logps, want.chosen_logps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.rejected_logps, want.rejected_logps, rtol=1e-5, atol=1e-6)


def test_ref_with_other_transform_is_scored_on_its_own():
    """Policy without softcap, reference with softcap: the reference goes through sequence_logps itself."""
    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    ref.config.final_logit_softcapping = 3.0  # Llama ignores it in forward; compare against the formula
    P, C, R = random_pairs(3, seed=8)
    batch = pack_pairs(P, C, R, max_tokens=48)
    out = model_loss(policy, batch, ref_model=ref)
    with torch.no_grad():
        logits, labels = unpacked_logits_batch(ref, P, C, R)
    want = fastdpo.loss(logits=3.0 * torch.tanh(logits / 3.0), labels=labels, reference_free=True)
    torch.testing.assert_close(out.ref_chosen_logps, want.chosen_logps, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ errors

def test_errors():
    policy = tiny_llama(seed=0)
    P, C, R = random_pairs(3, seed=9)
    batch = pack_pairs(P, C, R, max_tokens=48)
    torch.manual_seed(0)
    bare = LlamaModel(LlamaConfig(**TINY))
    with pytest.raises(ValueError, match="no output embedding"):
        model_loss(bare, batch, reference_free=True)
    other_vocab = tiny_llama(seed=1, vocab_size=VOCAB * 2)
    with pytest.raises(ValueError, match=r"ref_model vocabulary size 256 != model vocabulary size 128"):
        model_loss(policy, batch, ref_model=other_vocab)
    big = pack_pairs([[1, 500]], [[2]], [[3]], max_tokens=8)
    with pytest.raises(ValueError, match="token id 500 outside"):
        model_loss(policy, big, reference_free=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pack_pairs([[1]], [[2]], [[500]], max_tokens=8, vocab_size=policy.config.vocab_size)
    with pytest.raises(ValueError, match=r"chosen\[1\] is empty"):
        pack_pairs([[1], [2]], [[3], []], [[4], [5]], max_tokens=8)
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        pack_pairs([[]], [[3]], [[4]], max_tokens=8)
    with pytest.raises(ValueError, match="pair 0 needs 12 tokens"):
        pack_pairs([[1] * 5], [[2] * 3], [[3] * 3], max_tokens=8, truncation="error")
    with pytest.raises(ValueError, match="same length"):
        pack_pairs([[1], [2]], [[3]], [[4], [5]], max_tokens=8)
    with pytest.raises(ValueError, match="PackedBatch"):
        model_loss(policy, {"input_ids": batch.input_ids}, reference_free=True)
    with pytest.raises(ValueError, match="only one of"):
        model_loss(policy, batch, ref_model=policy, ref_logps=torch.zeros(6))
    with pytest.raises(ValueError, match="sets 'labels' itself"):
        model_loss(policy, batch, reference_free=True, labels=batch.labels)


def test_attention_inputs_per_implementation():
    """eager: the dense additive mask (the reference); sdpa / flash / flex: the batch's segment plan and a
    stride-0 placeholder mask, for either layout (main refused the shared layout under flash)."""
    P, C, R = random_pairs(2, seed=10)
    shared = pack_pairs(P, C, R, max_tokens=48, shared_prompt=True)
    sep = pack_pairs(P, C, R, max_tokens=48, shared_prompt=False)
    sdpa, eager = tiny_llama("sdpa"), tiny_llama("eager")
    e = attention_inputs(eager, shared)["attention_mask"]
    assert e.dtype == torch.float32 and torch.equal(e == 0, bool_mask(shared))
    for impl in ("sdpa", "flash_attention_2", "flex_attention"):
        fake = copy.copy(sdpa)
        fake.config = copy.deepcopy(sdpa.config)
        fake.config._attn_implementation = impl
        for batch in (shared, sep):
            kw = attention_inputs(fake, batch)
            assert kw["fastdpo_segments"] is segment_plan(batch)
            rows, T = batch.input_ids.shape
            assert kw["attention_mask"].shape == (rows, 1, T, T)
            assert kw["attention_mask"].stride() == (0, 0, 0, 0)  # no [T, T] mask in memory
    fake.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match="not supported for packed batches"):
        attention_inputs(fake, sep)


# ------------------------------------------------------------------------------------------------ example

def test_example_runs():
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, os.path.join(REPO, "examples", "train_dpo.py"), "--steps", "3",
                          "--seed", "1"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [l for l in res.stdout.splitlines() if l.startswith("step")]
    assert len(lines) == 3 and "rewards/chosen" in lines[0] and "acc" in lines[0]
    assert "done: 3 steps" in res.stdout
