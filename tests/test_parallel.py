"""fastdpo.parallel in one process (the 2-rank runs are in test_distributed.py) and fastdpo.sharding.

The vocabulary-parallel op runs here on a 1-rank gloo group (float64 gradcheck, the public API route for a
DTensor weight, refusals), and its merge is checked with three vocabulary shards emulated in-process
against a float64 head, at ordinary and extreme logits.
"""
import math
import random

import pytest
import torch
import torch.distributed as dist

import fastdpo
from fastdpo.parallel import _Shard, _merge, vocab_parallel_sequence_logps
from fastdpo.sharding import PreferenceShardSampler, balanced_split, pair_token_lengths
from fastdpo.torch_ops import Transform


@pytest.fixture
def mesh():
    """A 1-rank gloo process group and device mesh, torn down after the test."""
    from torch.distributed.device_mesh import init_device_mesh

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def head_inputs(N=24, D=8, V=37, S=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=dtype)
    weight = torch.randn(V, D, generator=g, dtype=dtype) / math.sqrt(D)
    bias = torch.randn(V, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    seq_index = torch.randint(0, S, (N,), generator=g)
    seq_index[::4] = -1
    targets[seq_index < 0] = -1
    return hidden, weight, bias, targets, seq_index, S


def reference_rows(hidden, weight, bias, targets, logit_scale=1.0, softcap=None, temperature=1.0):
    """Float64 row_logp, lse, logit_sum of the full (unsharded) head."""
    x = (hidden.double() @ weight.double().t() + bias.double()) * logit_scale
    z = (x if softcap is None else softcap * torch.tanh(x / softcap)) / temperature
    lse = torch.logsumexp(z, dim=1)
    return torch.log_softmax(z, dim=1).gather(1, targets[:, None]).squeeze(1), lse, z.sum(dim=1)


def emulated_ranks(hidden, weight, bias, targets, bounds, logit_scale=1.0, softcap=None, temperature=1.0):
    """Partials of every vocabulary shard [begin, end) gathered as on W ranks, then merged in rank order."""
    transform = Transform(logit_scale, softcap, temperature)
    shards = [_Shard(weight[b:e], bias[b:e], b, transform, chunk_rows=7) for b, e in bounds]
    fingerprint = hidden.to(shards[0].math_dtype).sum(dim=1) + targets.to(shards[0].math_dtype)
    gathered = torch.stack([torch.cat([s.partials(hidden, targets), fingerprint[None]]) for s in shards])
    begins, ends = torch.tensor([b for b, _ in bounds]), torch.tensor([e for _, e in bounds])
    return _merge(gathered, targets, begins, ends)


TRANSFORMS = [dict(logit_scale=1.0, softcap=None, temperature=1.0),
              dict(logit_scale=0.7, softcap=3.0, temperature=0.8)]


@pytest.mark.parametrize("transforms", TRANSFORMS)
def test_merge_of_three_uneven_shards_matches_float64(transforms):
    hidden, weight, bias, _, _, _ = head_inputs(dtype=torch.float32)
    targets = torch.randint(0, 37, (24,), generator=torch.Generator().manual_seed(1))
    got = emulated_ranks(hidden, weight, bias, targets, [(0, 13), (13, 20), (20, 37)], **transforms)
    want = reference_rows(hidden, weight, bias, targets, **transforms)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


def test_merge_is_cancellation_free_at_large_logits():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randint(-2, 3, (16, 8), generator=g).float()  # logits 1e4 + multiples of 1/4: exact in fp32
    weight = torch.randint(-2, 3, (37, 8), generator=g) / 4.0
    bias = 1e4 + torch.randint(-8, 9, (37,), generator=g) / 4.0
    targets = torch.randint(0, 37, (16,), generator=g)
    row_logp, lse, _ = emulated_ranks(hidden, weight, bias, targets, [(0, 13), (13, 20), (20, 37)])
    want_logp, want_lse, _ = reference_rows(hidden, weight, bias, targets)
    assert ((row_logp.double() - want_logp).abs() / want_logp.abs()).max() <= 1e-6
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-7, atol=0)
    # all logits equal to 1e30: -log V exactly as in fp32
    row_logp, _, _ = emulated_ranks(hidden, torch.zeros(37, 8), torch.full((37,), 1e30), targets,
                                    [(0, 13), (13, 20), (20, 37)])
    torch.testing.assert_close(row_logp, torch.full((16,), -math.log(37)), rtol=1e-6, atol=0)


def test_merge_refuses_tokens_that_differ_between_ranks():
    hidden, weight, bias, _, _, _ = head_inputs(dtype=torch.float32)
    targets = torch.randint(0, 37, (24,), generator=torch.Generator().manual_seed(1))
    shards = [_Shard(weight[b:e], bias[b:e], b, Transform(), chunk_rows=7) for b, e in [(0, 20), (20, 37)]]
    gathered = torch.stack([torch.cat([s.partials(hidden, targets), (hidden.sum(dim=1) + targets + r)[None]])
                            for r, s in enumerate(shards)])
    with pytest.raises(ValueError, match="identical on every rank"):
        _merge(gathered, targets, torch.tensor([0, 20]), torch.tensor([20, 37]))


@pytest.mark.parametrize("head_mode", ["stored", "recompute"])
def test_single_rank_gradcheck_float64(mesh, head_mode):
    from torch.distributed.tensor import DTensor, Shard

    hidden, weight, bias, targets, seq_index, S = head_inputs(N=10, D=4, V=11, S=3)

    def logps(h, w, b):  # from_local is differentiable: the gradient reaches w and b
        dw, db = DTensor.from_local(w, mesh, [Shard(0)]), DTensor.from_local(b, mesh, [Shard(0)])
        return vocab_parallel_sequence_logps(h, dw, db, targets, seq_index, S, head_mode=head_mode,
                                             logit_scale=0.9, softcap=2.5, temperature=1.3)[0]

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(logps, leaves)
    want = torch.zeros(S, dtype=torch.float64).index_add_(
        0, seq_index[seq_index >= 0],
        reference_rows(hidden, weight, bias, targets.clamp(min=0), 0.9, 2.5, 1.3)[0][seq_index >= 0])
    torch.testing.assert_close(logps(*leaves), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("head_mode", ["stored", "recompute"])
def test_single_rank_bf16_within_1e_2(mesh, head_mode):
    from torch.distributed.tensor import DTensor, Shard

    hidden, weight, bias, targets, seq_index, S = head_inputs(N=32, D=16, V=37)
    hidden, weight, bias = (t.bfloat16() for t in (hidden, weight, bias))  # the reference sees the same values
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logps, _ = vocab_parallel_sequence_logps(leaves[0], DTensor.from_local(leaves[1], mesh, [Shard(0)]),
                                             DTensor.from_local(leaves[2], mesh, [Shard(0)]), targets, seq_index, S,
                                             head_mode=head_mode, softcap=3.0)
    assert logps.dtype == torch.float32
    upstream = torch.randn(S, generator=torch.Generator().manual_seed(4))
    (logps * upstream).sum().backward()
    exact = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    scored = seq_index >= 0
    rows = reference_rows(*exact, targets.clamp(min=0), softcap=3.0)[0]
    want = torch.zeros(S, dtype=torch.float64).index_add(0, seq_index[scored], rows[scored])
    (want * upstream.double()).sum().backward()
    torch.testing.assert_close(logps.double(), want.detach(), rtol=1e-2, atol=1e-2)
    for leaf, ref in zip(leaves, exact):
        assert leaf.grad.dtype == torch.bfloat16
        torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-2, atol=1e-2 * ref.grad.abs().max().item())


def test_public_api_routes_dtensor_weight(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    hidden, weight, _, _, _, _ = head_inputs(N=12, D=8, V=37, dtype=torch.float32)
    labels = torch.randint(0, 37, (2, 6), generator=torch.Generator().manual_seed(3))
    labels[:, :2] = -100
    h = hidden.reshape(2, 6, 8)
    plain = fastdpo.sequence_logps(hidden=h, weight=weight, labels=labels)
    sharded_weight = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    sharded = fastdpo.sequence_logps(hidden=h, weight=sharded_weight, labels=labels)
    torch.testing.assert_close(sharded.logps, plain.logps, rtol=1e-6, atol=1e-6)
    assert torch.equal(sharded.n_tokens, plain.n_tokens)
    sharded.logps.sum().backward()
    assert sharded_weight.grad.placements == (Shard(0),) and sharded_weight.grad.abs().sum() > 0


def test_replicated_dtensor_hidden_is_accepted_and_other_layouts_refused(mesh):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    hidden, weight, _, targets, seq_index, S = head_inputs(dtype=torch.float32)
    sharded = distribute_tensor(weight, mesh, [Shard(0)])
    plain, _ = vocab_parallel_sequence_logps(hidden, sharded, None, targets, seq_index, S)
    replicated, _ = vocab_parallel_sequence_logps(distribute_tensor(hidden, mesh, [Replicate()]), sharded, None,
                                                  targets, seq_index, S)
    assert torch.equal(plain, replicated)
    with pytest.raises(ValueError, match="hidden must be replicated on every rank"):
        vocab_parallel_sequence_logps(distribute_tensor(hidden, mesh, [Shard(0)]), sharded, None, targets,
                                      seq_index, S)
    mesh_2d = init_device_mesh("cpu", (1, 1))
    with pytest.raises(ValueError, match="1-D device mesh, got a 2-D mesh"):
        vocab_parallel_sequence_logps(hidden, distribute_tensor(weight, mesh_2d, [Shard(0), Replicate()]), None,
                                      targets, seq_index, S)


@pytest.mark.parametrize("tied", [False, True])
def test_shard_lm_head(mesh, tied):
    from torch.distributed.tensor import DTensor, Shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdpo.distributed import is_vocab_parallel_head, shard_lm_head

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))
    if tied:
        with pytest.raises(ValueError, match="tied to the input embedding"):
            shard_lm_head(lm, mesh)
        return
    ids = torch.randint(0, 40, (1, 6))
    with torch.no_grad():
        before = lm(input_ids=ids).logits
        assert shard_lm_head(lm, mesh) is lm
        after = lm(input_ids=ids).logits
    weight = lm.lm_head.weight
    assert isinstance(weight, DTensor) and weight.placements == (Shard(0),) and is_vocab_parallel_head(lm.lm_head)
    assert not is_vocab_parallel_head(lm.model.embed_tokens)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_model_path_refuses_unmanaged_dtensor_head_and_shard_lm_head_after_fully_shard(mesh):
    """A DTensor head weight that neither FSDP2 nor shard_lm_head manages has no known gradient reduction;
    shard_lm_head on a model FSDP2 already shards would fail inside torch: both get fastdpo's error."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdpo.distributed import shard_lm_head
    from fastdpo.model import model_sequence_logps
    from fastdpo.packing import pack_pairs

    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    lm = LlamaForCausalLM(config)
    parallelize_module(lm, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})  # not shard_lm_head
    batch = pack_pairs([[1, 2]], [[3, 4]], [[5]], max_tokens=16)
    with pytest.raises(ValueError, match="neither FSDP2 .* nor fastdpo.distributed.shard_lm_head manages it"):
        model_sequence_logps(lm, batch)
    sharded = fully_shard(LlamaForCausalLM(config), mesh=mesh)
    with pytest.raises(ValueError, match="shard_lm_head after fully_shard is not supported"):
        shard_lm_head(sharded, mesh)


def test_refusals(mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    hidden, weight, bias, targets, seq_index, S = head_inputs(dtype=torch.float32)
    shard = lambda t: distribute_tensor(t, mesh, [Shard(0)])  # noqa: E731
    group = mesh.get_group()
    cases = [
        (dict(weight=weight), "needs a DTensor weight or process_group="),
        (dict(weight=shard(weight), bias=bias), "bias must be a DTensor sharded along the vocabulary"),
        (dict(weight=distribute_tensor(weight, mesh, [Replicate()])), "weight must be a DTensor sharded"),
        (dict(weight=shard(weight), process_group=group), "do not pass them with it"),
        (dict(weight=shard(weight), head_mode="fused"), "head_mode='fused' is not available"),
        (dict(weight=shard(weight), head_mode="tiled"), "head_mode must be one of"),
        (dict(weight=shard(weight), fp32_precision="fast"), "fp32_precision must be one of"),
        (dict(weight=shard(weight), softcap=0.0), "softcap must be None or > 0"),
        (dict(weight=weight, process_group=group, vocab_offset=5), "tile the vocabulary"),
        (dict(weight=weight[:30], process_group=group), r"targets of scored tokens must lie in \[0, 30\)"),
        (dict(weight=shard(weight.double())), "must equal hidden dtype"),
    ]
    from torch.distributed.device_mesh import init_device_mesh

    other_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
    cases += [
        (dict(weight=shard(weight), bias=distribute_tensor(bias, other_mesh, [Shard(0)])),
         "bias must be sharded on the weight's device mesh .* got a DTensor on DeviceMesh\\(\\(tp=1\\)"),
        (dict(weight=weight[:0], process_group=group, targets=torch.full_like(targets, -1),
              seq_index=torch.full_like(seq_index, -1)),
         r"at least one vocabulary row \(a vocabulary of 0 rows cannot be sharded over 1 ranks"),
    ]
    for overrides, message in cases:
        kwargs = dict(hidden=hidden, weight=None, bias=None, targets=targets, seq_index=seq_index, num_sequences=S)
        kwargs.update(overrides)
        with pytest.raises(ValueError, match=message):
            vocab_parallel_sequence_logps(**kwargs)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup .* got str"):
        vocab_parallel_sequence_logps(hidden, weight, None, targets, seq_index, S, process_group="tp")


# ----------------------------------------------------------------------------- data sharding

def skewed_lengths(n, seed=0):
    rng = random.Random(seed)
    return [max(4, int(rng.lognormvariate(5.0, 0.8))) for _ in range(n)]


def test_balanced_split_equal_counts_and_balanced_tokens():
    rng = random.Random(0)
    for _ in range(300):
        ranks, per_rank = rng.randint(2, 6), rng.randint(1, 8)
        lengths = [rng.choice([rng.randint(1, 10), rng.randint(1, 1000)]) for _ in range(ranks * per_rank)]
        groups = balanced_split(lengths, ranks)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(len(g) == per_rank for g in groups)
        tokens = [sum(lengths[i] for i in g) for g in groups]
        assert max(tokens) - min(tokens) <= max(lengths)
        assert balanced_split(lengths, ranks) == groups
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        balanced_split([1, 2, 3], 2)


def test_sampler_covers_each_pair_once_with_balanced_tokens():
    lengths = skewed_lengths(256)
    ranks, per_rank = 4, 8
    samplers = [PreferenceShardSampler(lengths, pairs_per_rank=per_rank, num_replicas=ranks, rank=r, seed=5)
                for r in range(ranks)]
    steps = [list(s) for s in samplers]  # [rank][step] -> indices
    assert all(len(s) == len(samplers[0]) == 256 // 32 for s in steps)
    seen = [i for rank_steps in steps for indices in rank_steps for i in indices]
    assert sorted(seen) == list(range(256))
    spread, naive_spread = [], []
    for step in range(len(samplers[0])):
        per_rank_tokens = [sum(lengths[i] for i in steps[r][step]) for r in range(ranks)]
        assert all(len(steps[r][step]) == per_rank for r in range(ranks))
        assert max(per_rank_tokens) - min(per_rank_tokens) <= max(lengths)
        spread.append(max(per_rank_tokens) / (sum(per_rank_tokens) / ranks))
        batch = sorted(i for r in range(ranks) for i in steps[r][step])  # contiguous split for comparison
        naive = [sum(lengths[i] for i in batch[r::ranks]) for r in range(ranks)]
        naive_spread.append(max(naive) / (sum(naive) / ranks))
    assert max(spread) < 1.05 and sum(spread) < sum(naive_spread)


def test_sampler_is_deterministic_given_seed_and_epoch():
    lengths = skewed_lengths(64)
    make = lambda seed: PreferenceShardSampler(lengths, pairs_per_rank=4, num_replicas=2, rank=1,  # noqa: E731
                                               seed=seed)
    first, again, other = make(3), make(3), make(4)
    assert list(first) == list(again) and list(first) != list(other)
    epoch0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch0
    ordered = PreferenceShardSampler(lengths, pairs_per_rank=4, num_replicas=2, rank=0, shuffle=False)
    assert sorted(next(iter(ordered))) == sorted(balanced_split(lengths[:8], 2)[0])


def test_sampler_refusals_and_pair_lengths():
    with pytest.raises(ValueError, match="rank must lie in"):
        PreferenceShardSampler([5] * 8, pairs_per_rank=2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PreferenceShardSampler([5] * 3, pairs_per_rank=2, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="num_replicas and rank are required"):
        PreferenceShardSampler([5] * 8, pairs_per_rank=2)
    pairs = [{"prompt_input_ids": [1] * 5, "chosen_input_ids": [2] * 3, "rejected_input_ids": [3] * 4}]
    assert pair_token_lengths(pairs) == [5 + 3 + 1 + 4]
    trl_rows = [{"prompt_ids": p["prompt_input_ids"], "chosen_ids": p["chosen_input_ids"],
                 "rejected_ids": p["rejected_input_ids"]} for p in pairs]  # TRL 1.16 names
    assert pair_token_lengths(trl_rows) == pair_token_lengths([tuple(r.values()) for r in trl_rows]) == [13]
    assert pair_token_lengths(pairs, shared_prompt=False) == [2 * 5 + 3 + 4]
