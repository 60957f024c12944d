"""Packing: layouts, masks, positions, labels, bin packing, truncation, and exactness on a tiny Llama."""
import warnings

import pytest
import torch

from fastdpo.attention import (
    _block_mask_explicit,
    bool_mask,
    eager_mask,
    flash_attn_varlen_kwargs,
    make_mask_mod,
)
from fastdpo.model import model_sequence_logps
from fastdpo.packing import (
    PackedBatch,
    PackingWarning,
    balanced_bins,
    first_fit_decreasing,
    layout_token_counts,
    pack_pairs,
    pair_length,
    synthetic_lengths,
)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 128
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)


def tiny_llama(impl, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation=impl)).eval()


@pytest.fixture(scope="module")
def models():
    return {impl: tiny_llama(impl) for impl in ("sdpa", "eager")}


def random_pairs(B, seed, p=(1, 9), r=(1, 7)):
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    P = [seq(*p) for _ in range(B)]
    C = [seq(*r) for _ in range(B)]
    R = [seq(*r) for _ in range(B)]
    return P, C, R


def unpacked_logps(model, prompts, responses):
    """float64 log_softmax + gather on each prompt+response run on its own."""
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            logits = model(input_ids=torch.tensor([p + r])).logits[0].double()
            lp = logits.log_softmax(-1)[len(p) - 1:-1].gather(-1, torch.tensor(r)[:, None])
            out.append(lp.sum())
    return torch.stack(out)


def packed_logps(logits, batch):
    """float64 per-sequence sums from packed logits, shift=True, TRL numbering (written independently)."""
    lp = logits[:, :-1].double().log_softmax(-1)
    lab = batch.labels[:, 1:]
    sid = batch.seq_ids[:, 1:]
    keep = (lab != -100) & (sid >= 0)
    tok = lp.gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    return torch.zeros(batch.num_sequences, dtype=torch.float64).index_add_(0, sid[keep], tok[keep])


def run_packed(model, batch, impl):
    mask = bool_mask(batch) if impl == "sdpa" else eager_mask(batch, torch.float32)
    with torch.no_grad():
        return model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask).logits


# ------------------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("shared", [True, False])
def test_packed_logps_equal_unpacked(models, impl, shared):
    model = models[impl]
    P, C, R = random_pairs(7, seed=1)
    P[0], C[1], R[2] = [5], [7], [9]  # 1-token prompt and responses
    batch = pack_pairs(P, C, R, max_tokens=48, shared_prompt=shared)
    assert batch.report.num_rows >= 2 and max(len(b) for b in _rows_pairs(batch)) >= 2  # real packing
    got = packed_logps(run_packed(model, batch, impl), batch)
    want = torch.cat([unpacked_logps(model, P, C), unpacked_logps(model, P, R)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def _rows_pairs(batch):
    rows = {}
    for k, r in enumerate(batch.pair_rows):
        rows.setdefault(r, []).append(k)
    return list(rows.values())


def test_shared_layout_needs_explicit_mask(models):
    """Transformers would read the shared layout's position ids as 3 packed sequences per pair (rejected
    cut off from its prompt): the explicit 4-D mask is what makes it exact. This guards the premise."""
    model = models["sdpa"]
    P, C, R = random_pairs(3, seed=2, p=(3, 6))
    batch = pack_pairs(P, C, R, max_tokens=64, shared_prompt=True)
    want = torch.cat([unpacked_logps(model, P, C), unpacked_logps(model, P, R)])
    with torch.no_grad():
        posonly = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    assert not torch.allclose(packed_logps(posonly, batch), want, rtol=1e-3)
    torch.testing.assert_close(packed_logps(run_packed(model, batch, "sdpa"), batch), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_nonshared_position_ids_only_is_padding_free(models, impl):
    """Non-shared layout: transformers' padding-free detection from position_ids (attention_mask=None)
    gives the same result as our 4-D mask, i.e. positions restart exactly where sequences do -- but only
    with use_cache=False. transformers 5.24 skips packed-sequence detection whenever a cache exists, and
    config.use_cache=True creates one by default (train mode too): the rows then silently attend across
    sequences. model_loss passes use_cache=False *and* an explicit mask; this test guards that premise."""
    model = models[impl]
    P, C, R = random_pairs(5, seed=3)
    batch = pack_pairs(P, C, R, max_tokens=40, shared_prompt=False)
    want = torch.cat([unpacked_logps(model, P, C), unpacked_logps(model, P, R)])
    with torch.no_grad():
        posonly = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        default = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    torch.testing.assert_close(packed_logps(posonly, batch), want, rtol=1e-5, atol=0)
    assert not torch.allclose(packed_logps(default, batch), want, rtol=1e-3)


def test_no_nan_on_padding_rows(models):
    P, C, R = random_pairs(3, seed=4)
    batch = pack_pairs(P, C, R, max_tokens=64, shared_prompt=True, pad_to_multiple_of=16)
    assert batch.report.padding_tokens > 0
    for impl in ("sdpa", "eager"):
        assert torch.isfinite(run_packed(models[impl], batch, impl)).all()


# ------------------------------------------------------------------------------------------------ layout

def test_shared_layout_exact():
    b = pack_pairs([[11, 12, 13]], [[21, 22]], [[31, 32, 33]], max_tokens=16, shared_prompt=True)
    assert b.input_ids.tolist() == [[11, 12, 13, 21, 22, 13, 31, 32, 33]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5]]
    assert b.labels.tolist() == [[-100, -100, -100, 21, 22, -100, 31, 32, 33]]
    assert b.seq_ids.tolist() == [[-1, -1, -1, 0, 0, -1, 1, 1, 1]]
    m = _block_mask_explicit(b)[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0],  # p0
        [1, 1, 0, 0, 0, 0, 0, 0, 0],  # p1
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # p2
        [1, 1, 1, 1, 0, 0, 0, 0, 0],  # c0
        [1, 1, 1, 1, 1, 0, 0, 0, 0],  # c1
        [1, 1, 0, 0, 0, 1, 0, 0, 0],  # p2' sees p0 p1 and itself, not p2 nor chosen
        [1, 1, 0, 0, 0, 1, 1, 0, 0],  # r0
        [1, 1, 0, 0, 0, 1, 1, 1, 0],
        [1, 1, 0, 0, 0, 1, 1, 1, 1],
    ]
    assert b.cu_seqlens.tolist() == [0, 9] and b.max_seqlen == 9


def test_nonshared_layout_exact():
    b = pack_pairs([[11, 12]], [[21]], [[31, 32]], max_tokens=16, shared_prompt=False, pad_to_multiple_of=8)
    assert b.input_ids.tolist() == [[11, 12, 21, 11, 12, 31, 32, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert b.labels.tolist() == [[-100, -100, 21, -100, -100, 31, 32, -100]]
    assert b.seq_ids.tolist() == [[-1, -1, 0, -1, -1, 1, 1, -1]]
    m = _block_mask_explicit(b)[0, 0]
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[:3, :3] = torch.ones(3, 3).tril().bool()
    want[3:7, 3:7] = torch.ones(4, 4).tril().bool()
    want[7, 7] = True  # padding attends to itself only
    assert torch.equal(m, want)
    assert b.cu_seqlens.tolist() == [0, 3, 7, 8] and b.cu_seqlens.dtype == torch.int32 and b.max_seqlen == 4


def test_trl_numbering_and_counts():
    P, C, R = random_pairs(9, seed=5)
    for shared in (True, False):
        b = pack_pairs(P, C, R, max_tokens=40, shared_prompt=shared)
        assert b.num_pairs == 9 and b.num_sequences == 18
        sid, lab = b.seq_ids[:, 1:], b.labels[:, 1:]
        for i in range(9):  # scored tokens (shift=True) of chosen i / rejected 9+i are exactly the responses
            assert lab[sid == i].tolist() == C[i]
            assert lab[sid == 9 + i].tolist() == R[i]
        assert ((b.labels == -100) == (b.seq_ids == -1)).all()
        assert (b.seq_ids[:, 0] == -1).all()  # first token of a row is never scored


def test_position_ids_restart_per_sequence():
    P, C, R = random_pairs(6, seed=6)
    b = pack_pairs(P, C, R, max_tokens=64, shared_prompt=False)
    for row in range(b.input_ids.shape[0]):
        pos = b.position_ids[row]
        starts = (pos == 0).nonzero().flatten().tolist()
        # every segment boundary in cu_seqlens (within this row) starts at position 0
        T = b.input_ids.shape[1]
        bounds = [int(x) - row * T for x in b.cu_seqlens if row * T <= int(x) < (row + 1) * T]
        assert bounds == starts
        for s, e in zip(starts, starts[1:] + [T]):
            assert pos[s:e].tolist() == list(range(e - s))


@pytest.mark.parametrize("shared", [True, False])
def test_mask_mod_matches_bool_mask(shared):
    P, C, R = random_pairs(8, seed=7)
    b = pack_pairs(P, C, R, max_tokens=50, shared_prompt=shared, pad_to_multiple_of=8)
    Rn, T = b.input_ids.shape
    mm = make_mask_mod(b)
    i = torch.arange(T)
    dense = mm(torch.arange(Rn)[:, None, None, None], 0, i[None, None, :, None], i[None, None, None, :])
    assert torch.equal(dense, _block_mask_explicit(b))
    # the same mask_mod evaluated point-wise through vmap-free scalar calls on a few entries
    for (r, q, k) in [(0, 0, 0), (0, T - 1, 0), (Rn - 1, T // 2, T // 3)]:
        assert bool(mm(torch.tensor(r), 0, torch.tensor(q), torch.tensor(k))) == bool(_block_mask_explicit(b)[r, 0, q, k])
    assert _block_mask_explicit(b).any(-1).all()  # no fully masked query row
    assert torch.equal(_block_mask_explicit(b), _block_mask_explicit(b).tril())  # never attends to the future


def test_flex_attention_model_matches_sdpa(models):
    """flex_attention runs the packed batch over the plan's gathered keys (forward: no flex backward on CPU)."""
    P, C, R = random_pairs(4, seed=9)
    b = pack_pairs(P, C, R, max_tokens=40, shared_prompt=True)
    flex = tiny_llama("flex_attention")
    with torch.no_grad():
        got = model_sequence_logps(flex, b).logps
    torch.testing.assert_close(got.double(), packed_logps(run_packed(models["sdpa"], b, "sdpa"), b),
                               rtol=1e-5, atol=0)


def test_flash_varlen_kwargs_match_transformers_position_id_derivation():
    """Separate layout without padding: the plan's varlen arguments are transformers' own (from position ids)
    and nothing is gathered; the shared layout gathers the prompt context once more per rejected response."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    P, C, R = random_pairs(6, seed=10)
    b = pack_pairs(P, C, R, max_tokens=10_000, shared_prompt=False)
    assert b.report.padding_tokens == 0
    kw = flash_attn_varlen_kwargs(b)
    (cu_q, cu_k), (mq, mk) = prepare_fa_kwargs_from_position_ids(b.position_ids.reshape(1, -1))
    assert torch.equal(kw["cu_seqlens_q"], cu_q) and torch.equal(kw["cu_seqlens_k"], cu_k)
    assert kw["max_seqlen_q"] == int(mq) == b.max_seqlen and kw["kv_index"] is None
    s = flash_attn_varlen_kwargs(pack_pairs(P, C, R, max_tokens=10_000, shared_prompt=True))
    n_context = sum(len(p) - 1 for p in P)
    assert s["kv_index"].numel() == s["cu_seqlens_k"][-1] == s["cu_seqlens_q"][-1] + n_context


# ------------------------------------------------------------------------------------------------ bin packing

def test_first_fit_decreasing():
    assert first_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 10) == [[0, 1, 6], [2, 3, 4, 5]]
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 30, (200,), generator=g).tolist()
    bins = first_fit_decreasing(lens, 32)
    assert sorted(k for b in bins for k in b) == list(range(200))
    assert all(sum(lens[k] for k in b) <= 32 for b in bins)
    assert len(bins) <= 11 / 9 * (-(-sum(lens) // 32)) + 1  # FFD bound vs the trivial lower bound
    with pytest.raises(ValueError, match="exceeds"):
        first_fit_decreasing([40], 32)


def test_balanced_bins_pad_less_than_first_fit_decreasing():
    lens = [900, 150, 120, 100]  # FFD at 1024: [900, 120] + [150, 100] -> 2 rows of 1020 tokens
    assert max(sum(lens[k] for k in b) for b in first_fit_decreasing(lens, 1024)) == 1020
    bins = balanced_bins(lens, 1024)
    assert len(bins) == 2 and max(sum(lens[k] for k in b) for b in bins) == 900
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 300, (40,), generator=g).tolist()
    ffd, bal = first_fit_decreasing(lens, 1024), balanced_bins(lens, 1024)
    assert len(bal) == len(ffd) and sorted(k for b in bal for k in b) == list(range(40))
    assert max(sum(lens[k] for k in b) for b in bal) <= max(sum(lens[k] for k in b) for b in ffd)


@pytest.mark.parametrize("shared", [True, False])
def test_rows_respect_budget_and_keep_pairs_together(shared):
    P, C, R = random_pairs(25, seed=11)
    b = pack_pairs(P, C, R, max_tokens=37, shared_prompt=shared)
    assert b.input_ids.shape[1] <= 37
    assert b.report.real_tokens == sum(pair_length(len(p), len(c), len(r), shared) for p, c, r in zip(P, C, R))
    for i in range(25):
        rows_c = (b.seq_ids == i).any(1).nonzero().flatten().tolist()
        rows_r = (b.seq_ids == 25 + i).any(1).nonzero().flatten().tolist()
        assert rows_c == rows_r == [b.pair_rows[i]]
    # each row holds whole pairs back to back: the pair's segment ids are contiguous
    seg = b.segment_ids
    for r in range(seg.shape[0]):
        s = seg[r][seg[r] >= 0]
        assert (s.diff() >= 0).all()
    lb = -(-b.report.real_tokens // 37)
    assert b.report.num_rows <= lb + 2


def test_pad_to_multiple_of_and_device():
    P, C, R = random_pairs(3, seed=12)
    b = pack_pairs(P, C, R, max_tokens=40, pad_to_multiple_of=16)
    assert b.input_ids.shape[1] % 16 == 0
    b2 = b.to("cpu")
    assert isinstance(b2, PackedBatch) and torch.equal(b2.input_ids, b.input_ids)
    assert torch.equal(bool_mask(b), _block_mask_explicit(b))
    em = eager_mask(b, torch.float32)
    assert ((em == 0) == bool_mask(b)).all() and em.min() == torch.finfo(torch.float32).min


# ------------------------------------------------------------------------------------------------ truncation

def test_truncation_error_names_the_pair():
    P, C, R = [[1] * 3, [1] * 10], [[2] * 3, [2] * 5], [[3] * 3, [3] * 5]
    with pytest.raises(ValueError, match=r"pair 1 needs 21 tokens .*max_tokens=16"):
        pack_pairs(P, C, R, max_tokens=16, shared_prompt=True)
    with pytest.raises(ValueError, match=r"pair 1 needs 30 tokens"):
        pack_pairs(P, C, R, max_tokens=16, shared_prompt=False)


def test_keep_end_of_prompt():
    p = list(range(1, 11))
    with pytest.warns(PackingWarning, match="truncated 1 of 1"):
        b = pack_pairs([p], [[50, 51]], [[60]], max_tokens=10, shared_prompt=True, truncation="keep_end_of_prompt")
    assert b.input_ids[0].tolist() == [5, 6, 7, 8, 9, 10, 50, 51, 10, 60]  # prompt's end kept
    ev = b.report.truncated
    assert len(ev) == 1 and ev[0].before == (10, 2, 1) and ev[0].after == (6, 2, 1)
    with pytest.warns(PackingWarning):
        b = pack_pairs([p], [[50, 51]], [[60]], max_tokens=10, shared_prompt=False, truncation="keep_end_of_prompt")
    assert b.input_ids[0].tolist() == [8, 9, 10, 50, 51, 8, 9, 10, 60, ]
    with pytest.raises(ValueError, match="1-token prompt"):
        pack_pairs([p], [[5] * 9], [[6] * 9], max_tokens=10, truncation="keep_end_of_prompt")


def test_truncate_response():
    with pytest.warns(PackingWarning):
        b = pack_pairs([[1, 2]], [[5] * 10], [[6] * 3], max_tokens=12, shared_prompt=True,
                       truncation="truncate_response")
    assert b.report.truncated[0].after == (2, 6, 3)  # shorter kept whole, longer cut to fit
    with pytest.warns(PackingWarning):
        b = pack_pairs([[1, 2]], [[5] * 10], [[6] * 9], max_tokens=12, shared_prompt=True,
                       truncation="truncate_response")
    assert b.report.truncated[0].after == (2, 5, 4)  # both cut, odd token to chosen
    assert b.labels[b.seq_ids == 0].tolist() == [5] * 5 and b.labels[b.seq_ids == 1].tolist() == [6] * 4
    with pytest.raises(ValueError, match="1-token responses"):
        pack_pairs([[1] * 10], [[5]], [[6]], max_tokens=11, truncation="truncate_response")


def test_no_truncation_no_warning():
    P, C, R = random_pairs(4, seed=13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = pack_pairs(P, C, R, max_tokens=64, truncation="truncate_response")
    assert b.report.truncated == [] and "truncated" not in str(b.report)


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("args,kwargs,match", [
    (([[1]], [[2]], [[3], [4]]), {}, "same length"),
    (([], [], []), {}, "at least one"),
    (([[]], [[2]], [[3]]), {}, r"prompts\[0\] is empty"),
    (([[1]], [[2]], [[]]), {}, r"rejected\[0\] is empty"),
    (([[1]], [[2, 1.5]], [[3]]), {}, "non-integer"),
    (([[1]], [[-2]], [[3]]), {}, "negative"),
    (([[1]], [[200]], [[3]]), {"vocab_size": 128}, "outside the vocabulary"),
    (([[1]], [[2 ** 63]], [[3]]), {}, r"chosen\[0\] contains token id 9223372036854775808, beyond the int64"),
    ((["hello"], [[2]], [[3]]), {}, "string"),
    (([[1]], [[2]], [[3]]), {"truncation": "left"}, "truncation must be one of"),
    (([[1]], [[2]], [[3]]), {"max_tokens": 0}, "max_tokens"),
    (([torch.ones(2, 2, dtype=torch.long)], [[2]], [[3]]), {}, "1-D"),
])
def test_bad_inputs(args, kwargs, match):
    kwargs = {"max_tokens": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        pack_pairs(*args, **kwargs)


def test_tensor_inputs_accepted():
    b = pack_pairs([torch.tensor([1, 2])], [torch.tensor([3])], [torch.tensor([4])], max_tokens=8)
    assert b.input_ids.tolist() == [[1, 2, 3, 2, 4]]


# ------------------------------------------------------------------------------------------------ accounting

def test_layout_token_counts():
    P, C, R = [10, 10], [4, 4], [6, 6]
    out = layout_token_counts(P, C, R, batch_size=2)
    assert out["padded"] == 2 * 16 and out["packed"] == 20 + 10 and out["shared"] == 10 + 4 + 1 + 6
    assert out["unique_tokens"] == 20
    assert out["shared_attn"] < out["packed_attn"] <= out["padded_attn"]
    # with a row budget, row padding is counted: 2 pairs of 21 tokens -> 1 row of 42 at max_tokens=50
    out = layout_token_counts(P, C, R, batch_size=2, max_tokens=50)
    assert out["shared"] == 21 and out["packed"] == 30  # 2 x 30 > 50: two rows of 30
    p, c, r = synthetic_lengths(150, 70, 64, sigma=0.5, seed=0)
    v = layout_token_counts(p, c, r, batch_size=8)
    assert v["shared"] < v["packed"] < v["padded"]
