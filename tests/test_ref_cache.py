"""Tests for fastdpo.ref_cache: precomputed reference log-probs in a safetensors file."""
import json
import sys

import pytest
import torch

from fastdpo.model import model_loss
from fastdpo.packing import pack_pairs
from fastdpo.ref_cache import (
    CorruptReferenceCacheError,
    ReferenceCache,
    StaleReferenceCacheError,
    dataset_hash,
    make_compute_fn,
    pair_key,
    weights_fingerprint,
)


VOCAB = 64


def make_pairs(n, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        lp, lc, lr = (int(x) for x in torch.randint(1, 7, (3,), generator=g))
        pairs.append({
            "prompt_input_ids": torch.randint(0, vocab, (lp,), generator=g).tolist(),
            "chosen_input_ids": torch.randint(0, vocab, (lc,), generator=g).tolist(),
            "rejected_input_ids": torch.randint(0, vocab, (lr,), generator=g).tolist(),
        })
    return pairs


class ToyCompute:
    """Deterministic compute_fn: a function of the ids only, counting the pairs it sees."""

    def __init__(self):
        self.seen = 0

    def __call__(self, batch):
        self.seen += len(batch)
        f = lambda p, c: -(sum(c) + 0.5 * sum(p) + 0.25 * len(c)) / 7.0  # noqa: E731
        ch = [f(p["prompt_input_ids"], p["chosen_input_ids"]) for p in batch]
        rj = [f(p["prompt_input_ids"], p["rejected_input_ids"]) for p in batch]
        return torch.tensor(ch), torch.tensor(rj)


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float().eval()


def direct_logps(model, pair):
    """float64 log-prob of each completion, one unpadded row at a time, from the model's own logits."""
    out = []
    for comp in ("chosen_input_ids", "rejected_input_ids"):
        ids = torch.tensor(pair["prompt_input_ids"] + pair[comp])[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(lp[len(pair["prompt_input_ids"]) - 1:].sum())
    return out


# ------------------------------------------------------------------------------------------------


def test_pair_key_content_and_container_invariance():
    import numpy as np

    a = {"prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4, 5]}
    same = ([1, 2], torch.tensor([3], dtype=torch.int32), np.array([4, 5], dtype=np.int16))
    assert pair_key(a) == pair_key(same) and len(pair_key(a)) == 16
    # moving the prompt/completion boundary, swapping chosen/rejected, or changing a token all change the key
    assert pair_key(([1], [2, 3], [4, 5])) != pair_key(a)
    assert pair_key(([1, 2], [4, 5], [3])) != pair_key(a)
    assert pair_key(([1, 2], [3], [4, 6])) != pair_key(a)
    with pytest.raises(ValueError):
        pair_key({"prompt_input_ids": [1]})
    with pytest.raises(ValueError):
        pair_key(([1.5], [2], [3]))


def test_round_trip(tmp_path):
    pairs = make_pairs(13)
    path = tmp_path / "ref.safetensors"
    fn = ToyCompute()
    built = ReferenceCache.build(pairs, fn, path, batch_size=4, reference_id="toy@1",
                                 progress=False, metadata={"note": "test"})
    assert fn.seen == 13 and path.is_file() and not list(tmp_path.glob("*.tmp*"))
    loaded = ReferenceCache.load(path, pairs=pairs, reference_id="toy@1")
    assert len(loaded) == 13
    for name in ("pair_keys", "chosen_logps", "rejected_logps"):
        assert torch.equal(getattr(built, name), getattr(loaded, name))
    assert loaded.chosen_logps.dtype == torch.float32 and loaded.pair_keys.shape == (13, 16)
    expect_c, expect_r = ToyCompute()(pairs)
    c, r = loaded.lookup(pairs)
    assert torch.equal(c, expect_c) and torch.equal(r, expect_r)
    m = loaded.metadata
    assert m["format"] == "fastdpo.ref_cache" and m["format_version"] == "1"
    assert m["fastdpo_version"] and m["reference_id"] == "toy@1" and m["reference_id_kind"] == "user"
    assert m["dataset_hash"] == dataset_hash(pairs) == loaded.dataset_hash
    assert json.loads(m["user_metadata"]) == {"note": "test"}
    assert "toy@1" in repr(loaded)


def test_deduplicates_and_keeps_first_occurrence_order(tmp_path):
    pairs = make_pairs(6)
    data = pairs + pairs[:3] + [pairs[1]]
    fn = ToyCompute()
    cache = ReferenceCache.build(data, fn, batch_size=4, reference_id="x", progress=False)
    assert fn.seen == 6 and len(cache) == 6
    assert cache.dataset_hash == dataset_hash(pairs) == dataset_hash(data)
    assert [bytes(k) for k in cache.pair_keys.numpy()] == [pair_key(p) for p in pairs]
    c, r = cache.lookup(data)
    ec, er = ToyCompute()(data)
    assert torch.equal(c, ec) and torch.equal(r, er)


def test_partial_lookup_order_keys_and_trl_concat():
    pairs = make_pairs(10)
    cache = ReferenceCache.build(pairs, ToyCompute(), batch_size=3, reference_id="x", progress=False)
    batch = [pairs[7], pairs[2], pairs[7], pairs[0]]
    c, r = cache.lookup(batch)
    ec, er = ToyCompute()(batch)
    assert torch.equal(c, ec) and torch.equal(r, er) and c.shape == (4,)
    # 16-byte keys work in place of pairs
    c2, r2 = cache.lookup([pair_key(p) for p in batch])
    assert torch.equal(c2, c) and torch.equal(r2, r)
    # TRL order: chosen block then rejected block
    assert torch.equal(cache.ref_logps(batch), torch.cat([ec, er]))
    assert pairs[3] in cache and make_pairs(1, seed=99)[0] not in cache
    assert cache.lookup([])[0].shape == (0,)


def test_stale_data_detected():
    pairs = make_pairs(8)
    cache = ReferenceCache.build(pairs, ToyCompute(), reference_id="x", progress=False)
    edited = dict(pairs[5])
    edited["chosen_input_ids"] = edited["chosen_input_ids"] + [1]  # e.g. an extra EOS token
    with pytest.raises(StaleReferenceCacheError, match=r"batch positions \[1\]"):
        cache.lookup([pairs[0], edited, pairs[1]])
    with pytest.raises(StaleReferenceCacheError, match="not in the reference cache"):
        cache.check_pairs(pairs[:3] + [edited])
    cache.check_pairs(pairs[2:5])  # a subset is fine


def test_stale_data_on_load(tmp_path):
    pairs = make_pairs(8)
    path = tmp_path / "c.safetensors"
    ReferenceCache.build(pairs, ToyCompute(), path, reference_id="x", progress=False)
    ReferenceCache.load(path, pairs=pairs[::2])
    with pytest.raises(StaleReferenceCacheError):
        ReferenceCache.load(path, pairs=make_pairs(8, seed=1))
    with pytest.raises(StaleReferenceCacheError, match="built for reference"):
        ReferenceCache.load(path, reference_id="y")


def test_weights_fingerprint_sensitivity():
    m = torch.nn.Linear(4, 3)
    fp, summary = weights_fingerprint(m)
    assert fp == weights_fingerprint(m.state_dict())[0] and len(fp) == 64
    assert summary["num_elements"] == 15 and summary["elements_per_dtype"] == {"float32": 15}
    with torch.no_grad():
        m.weight[1, 2] += 1e-6
    assert weights_fingerprint(m)[0] != fp
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    fp2 = weights_fingerprint(sd)[0]
    assert weights_fingerprint({k: v.reshape(-1) for k, v in sd.items()})[0] != fp2  # shape counts
    assert weights_fingerprint({k: v.double() for k, v in sd.items()})[0] != fp2  # dtype counts
    assert weights_fingerprint({("x" + k): v for k, v in sd.items()})[0] != fp2  # names count
    bf = {k: v.bfloat16() for k, v in sd.items()}
    assert weights_fingerprint(bf)[0] == weights_fingerprint(bf)[0]


def test_default_compute_fn_matches_direct_computation(tmp_path):
    model = tiny_llama()
    pairs = make_pairs(7, seed=3)
    path = tmp_path / "llama.safetensors"
    cache = ReferenceCache.build(pairs, model, path, batch_size=3, progress=False)
    assert cache.metadata["reference_id_kind"] == "weights_blake2b256"
    summary = json.loads(cache.metadata["reference_summary"])
    assert summary["class"] == "LlamaForCausalLM" and summary["num_elements"] > 0
    loaded = ReferenceCache.load(path, pairs=pairs, ref_model=model)
    c, r = loaded.lookup(pairs[::-1])
    for i, p in enumerate(pairs[::-1]):
        dc, dr = direct_logps(model, p)
        assert torch.allclose(c[i].double(), dc, rtol=1e-5, atol=1e-5), (i, c[i].item(), dc.item())
        assert torch.allclose(r[i].double(), dr, rtol=1e-5, atol=1e-5), (i, r[i].item(), dr.item())
    # freshly computed on a differently composed batch agrees too
    fc, fr = make_compute_fn(model)(pairs[1:4])
    c, r = loaded.lookup(pairs[1:4])
    torch.testing.assert_close(fc, c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fr, r, rtol=1e-5, atol=1e-5)


def test_stale_weights_detected(tmp_path):
    model = tiny_llama()
    pairs = make_pairs(4, seed=5)
    path = tmp_path / "llama.safetensors"
    ReferenceCache.build(pairs, model, path, batch_size=4, progress=False)
    ReferenceCache.load(path, ref_model=model)  # same weights: fine
    ReferenceCache.load(path, ref_model=tiny_llama(seed=0))  # same seed, same weights: fine
    with pytest.raises(StaleReferenceCacheError, match="weights differ"):
        ReferenceCache.load(path, pairs=pairs, ref_model=tiny_llama(seed=1))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    with pytest.raises(StaleReferenceCacheError, match="weights differ"):
        ReferenceCache.load(path, ref_model=model)


def test_reference_identity_recorded_or_warned(tmp_path):
    pairs = make_pairs(3)
    m = torch.nn.Linear(2, 2)
    path = tmp_path / "c.safetensors"
    ReferenceCache.build(pairs, ToyCompute(), path, ref_model=m, progress=False)
    ReferenceCache.load(path, ref_model=m)
    with torch.no_grad():
        m.bias.zero_()
        m.bias[0] = 3.0
    with pytest.raises(StaleReferenceCacheError):
        ReferenceCache.load(path, ref_model=m)
    with pytest.warns(UserWarning, match="cannot detect a changed reference"):
        c = ReferenceCache.build(pairs, ToyCompute(), path, progress=False)
    assert c.reference_id == ""
    with pytest.raises(StaleReferenceCacheError, match="no weights fingerprint"):
        ReferenceCache.load(path, ref_model=m)


def _build_file(tmp_path, name="c.safetensors"):
    path = tmp_path / name
    ReferenceCache.build(make_pairs(5), ToyCompute(), path, reference_id="x", progress=False)
    return path


def test_bad_files(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with pytest.raises(FileNotFoundError):
        ReferenceCache.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CorruptReferenceCacheError, match="cannot read"):
        ReferenceCache.load(garbage)

    good = _build_file(tmp_path)
    raw = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(raw[:-7])
    with pytest.raises(CorruptReferenceCacheError):
        ReferenceCache.load(trunc)

    # flip one bit of the last stored value (tensor data sits at the end of the file)
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(CorruptReferenceCacheError, match="payload hash"):
        ReferenceCache.load(flipped)

    # another safetensors file (e.g. model weights) is not a cache
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(CorruptReferenceCacheError, match="not a fastdpo reference cache"):
        ReferenceCache.load(other)

    tensors = load_file(str(good))
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    # a future format version is refused
    future = tmp_path / "future.safetensors"
    save_file(tensors, str(future), metadata={**meta, "format_version": "2"})
    with pytest.raises(CorruptReferenceCacheError, match="format version 2"):
        ReferenceCache.load(future)
    # consistent-looking edit of the values without fixing the payload hash
    edited = tmp_path / "edited.safetensors"
    save_file({**tensors, "chosen_logps": tensors["chosen_logps"] + 1}, str(edited), metadata=meta)
    with pytest.raises(CorruptReferenceCacheError, match="payload hash"):
        ReferenceCache.load(edited)
    # wrong dtype / missing tensor
    wrong = tmp_path / "wrong.safetensors"
    save_file({**tensors, "chosen_logps": tensors["chosen_logps"].double()}, str(wrong), metadata=meta)
    with pytest.raises(CorruptReferenceCacheError, match="unexpected tensor layout"):
        ReferenceCache.load(wrong)
    save_file({k: v for k, v in tensors.items() if k != "rejected_logps"}, str(wrong), metadata=meta)
    with pytest.raises(CorruptReferenceCacheError, match="lacks tensors"):
        ReferenceCache.load(wrong)
    # a damaged reference identity in the header (which the payload hash does not cover)
    for kind, reference_id in (("weights_blake2b256", "0123abcd"), ("weights_blake2b256", "z" * 64),
                               ("none", "x"), ("sha1", "x")):
        save_file(tensors, str(wrong), metadata={**meta, "reference_id_kind": kind, "reference_id": reference_id})
        with pytest.raises(CorruptReferenceCacheError, match=f"damaged header: reference_id '{reference_id}'"):
            ReferenceCache.load(wrong, verify_reference=False)
    ReferenceCache.load(good)  # the original is still fine


def test_bad_compute_fn_output():
    pairs = make_pairs(4)
    with pytest.raises(ValueError, match="returned 1 chosen"):
        ReferenceCache.build(pairs, lambda b: (torch.zeros(1), torch.zeros(len(b))), reference_id="x",
                             progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        ReferenceCache.build(pairs, lambda b: (torch.full((len(b),), float("nan")), torch.zeros(len(b))),
                             reference_id="x", progress=False)
    with pytest.raises(ValueError, match="no pairs"):
        ReferenceCache.build([], ToyCompute(), reference_id="x")


def test_progress_bar_and_fallback_without_tqdm(monkeypatch, capsys):
    pairs = make_pairs(5)
    ReferenceCache.build(pairs, ToyCompute(), batch_size=2, reference_id="x", progress=True)
    assert "5/5" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import of tqdm.auto now fails
    c = ReferenceCache.build(pairs, ToyCompute(), batch_size=2, reference_id="x", progress=True)
    assert len(c) == 5 and capsys.readouterr().err == ""


def test_cached_ref_logps_feed_fastdpo_loss():
    ref, policy = tiny_llama(seed=0), tiny_llama(seed=1)
    pairs = make_pairs(4, seed=7)
    cache = ReferenceCache.build(pairs, ref, batch_size=2, progress=False)
    P, C, R = ([p[k] for p in pairs] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
    batch = pack_pairs(P, C, R, max_tokens=64)
    with torch.no_grad():
        a = model_loss(policy, batch, ref_logps=cache.ref_logps(pairs), beta=0.1)
        b = model_loss(policy, batch, ref_model=ref, beta=0.1)
        torch.testing.assert_close(a.losses, b.losses, rtol=1e-5, atol=1e-6)
        shifted = cache.ref_logps(pairs) + torch.tensor([1.0] * 4 + [0.0] * 4)  # a stale chosen block must show
        assert not torch.allclose(a.losses, model_loss(policy, batch, ref_logps=shifted).losses)
