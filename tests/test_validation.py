"""The input contract of the public API (issue 10, classes 2-7): every input gets the right result or a clear
error naming the argument. Swept over `sequence_logps`, `loss`, `pack_pairs` / `PairCollator`, `ReferenceCache`
(and `model_loss`, which validates through `loss`), on both backends."""
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdpo
from fastdpo import EmptySequenceWarning
from fastdpo.packing import PairCollator, pack_pairs, pack_rows
from fastdpo.ref_cache import ReferenceCache, ReferenceCacheError, UnverifiedReferenceCacheWarning
from reference import head_logits_f64, random_labels, rel_err, sequence_logps_f64

B, T, V, D = 2, 6, 40, 8
BACKENDS = ["torch", "triton"]
ENTRIES = ["sequence_logps", "loss"]
FORMS = ["logits", "fused"]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D ** 0.5 * 3
    labels = random_labels(2 * B, T, V, prompt_len=2, ignore_frac=0.0, seed=seed)
    return hidden, weight, labels


def _call(entry, form, backend, /, **overrides):
    hidden, weight, labels = _inputs()
    kwargs = dict(labels=labels, backend=backend)
    kwargs.update(dict(hidden=hidden, weight=weight) if form == "fused" else dict(logits=hidden @ weight.T))
    if entry == "loss":
        kwargs["ref_logps"] = torch.full((2 * B,), -10.0)
    kwargs.update(overrides)
    return getattr(fastdpo, entry)(**kwargs)


# ------------------------------------------------------------------------------------------ class 2: options

BAD_OPTIONS = [
    ("temperature", float("inf"), ValueError), ("temperature", 0.0, ValueError), ("temperature", -1, ValueError),
    ("temperature", "2", TypeError), ("temperature", None, TypeError),
    ("softcap", -1.0, ValueError), ("softcap", 0, ValueError), ("softcap", float("nan"), ValueError),
    ("softcap", "30", TypeError),
    ("logit_scale", float("nan"), ValueError), ("logit_scale", 0.0, ValueError), ("logit_scale", True, TypeError),
    ("backend", "cuda", ValueError), ("backend", 1, TypeError),
    ("check_finite", 1, TypeError), ("shift", "yes", TypeError),
    ("ignore_index", 1.5, TypeError), ("ignore_index", 3, ValueError),  # 3 is a token id of the vocabulary
    ("num_sequences", 0, ValueError), ("num_sequences", 4.0, TypeError), ("num_sequences", True, TypeError),
    ("head_mode", "fast", ValueError), ("head_mode", None, TypeError),
    ("head_memory_budget", 0, ValueError), ("head_memory_budget", 1.5, TypeError),
    ("head_memory_budget", True, TypeError),
    ("fp32_precision", "fp16", ValueError), ("fp32_precision", None, TypeError),
]
LOSS_OPTIONS = [
    ("beta", float("inf"), ValueError), ("beta", "0.1", TypeError), ("label_smoothing", float("nan"), ValueError),
    ("label_smoothing", "0", TypeError), ("reference_free", "no", TypeError),
    ("loss_weights", [float("nan")], ValueError),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name,value,error", BAD_OPTIONS)
def test_every_option_is_validated_by_name(entry, form, backend, name, value, error):
    with pytest.raises(error, match=re.escape(name)):
        _call(entry, form, backend, **{name: value})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,value,error", LOSS_OPTIONS)
def test_loss_options_are_validated_by_name(backend, name, value, error):
    with pytest.raises(error, match=re.escape(name)):
        _call("loss", "fused", backend, **{name: value})


def test_model_loss_validates_through_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32))
    batch = pack_pairs([[1, 2, 3]], [[4, 5]], [[6]], max_tokens=16)
    with pytest.raises(TypeError, match="temperature"):
        fastdpo.model_loss(model, batch, reference_free=True, temperature="2")
    with pytest.raises(ValueError, match="head_mode"):
        fastdpo.model_loss(model, batch, reference_free=True, head_mode="fastest")


REFUSED = {  # an option that would be ignored is refused
    "head option with logits": (dict(head_mode="stored"), "only apply to the fused LM-head form"),
    "budget with logits": (dict(head_memory_budget=1 << 20), "only apply to the fused LM-head form"),
    "bias with logits": (dict(bias=torch.zeros(V)), "bias applies to the fused form"),
}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", REFUSED)
def test_options_that_would_be_ignored_are_refused(entry, case):
    overrides, message = REFUSED[case]
    with pytest.raises(ValueError, match=message):
        _call(entry, "logits", "torch", **overrides)


def test_ignored_reference_and_fused_only_flags_are_refused():
    hidden, weight, labels = _inputs()
    logits = hidden @ weight.T
    with pytest.raises(ValueError, match="reference_free=True does not use a reference"):
        fastdpo.loss(logits, labels, ref_logits=logits, reference_free=True)
    with pytest.raises(ValueError, match="loss_type simpo does not use a reference"):
        fastdpo.loss(logits, labels, ref_logps=torch.zeros(2 * B), loss_type="simpo")
    with pytest.raises(ValueError, match="ref_weight and ref_bias go with ref_hidden"):
        fastdpo.loss(logits, labels, ref_logits=logits, ref_weight=weight)
    with pytest.raises(ValueError, match="ref_weight is required with ref_hidden"):
        fastdpo.loss(logits, labels, ref_hidden=hidden)
    with pytest.raises(ValueError, match="inplace_backward=True applies to the logits form only"):
        fastdpo.sequence_logps(hidden=hidden, weight=weight, labels=labels, inplace_backward=True)
    with pytest.raises(TypeError, match="inplace_backward must be a bool"):
        fastdpo.sequence_logps(logits, labels, inplace_backward=1)


TRANSFORMS = dict(logit_scale=0.7, softcap=3.0, temperature=1.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_form_honours_the_transforms(backend):
    hidden, weight, labels = _inputs(1)
    logits = (hidden @ weight.T).requires_grad_()
    out = fastdpo.sequence_logps(logits, labels, backend=backend, **TRANSFORMS)
    (grad,) = torch.autograd.grad(out.logps.sum(), logits)
    expected_logits = logits.detach().double().requires_grad_()
    expected = sequence_logps_f64(head_logits_f64(expected_logits, torch.eye(V, dtype=torch.float64),
                                                  **TRANSFORMS), labels)[0]
    (expected_grad,) = torch.autograd.grad(expected.sum(), expected_logits)
    assert rel_err(out.logps, expected) <= 1e-5 and rel_err(grad, expected_grad) <= 1e-5
    # the loss too: temperature changes it (it was silently ignored before)
    ref_logps = torch.linspace(-20.0, -10.0, 2 * B)
    cold = fastdpo.loss(logits, labels, ref_logps=ref_logps, backend=backend, **TRANSFORMS).loss
    plain = fastdpo.loss(logits, labels, ref_logps=ref_logps, backend=backend).loss
    rho = expected.detach() - ref_logps.double()
    assert rel_err(cold, -torch.nn.functional.logsigmoid(0.1 * (rho[:B] - rho[B:])).mean()) <= 1e-5
    assert abs(cold.item() - plain.item()) > 1e-3


# ------------------------------------------------------------------------------ class 3: sequence bookkeeping

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_num_sequences_is_checked_against_rows_and_seq_ids(entry, form, backend):
    for wrong in (2 * B - 1, 2 * B + 2):
        with pytest.raises(ValueError, match=rf"num_sequences must equal the number of rows of labels \({2 * B}\)"):
            _call(entry, form, backend, num_sequences=wrong)
    seq_ids = torch.arange(2 * B)[:, None].expand(2 * B, T).contiguous()
    with pytest.raises(ValueError, match=r"seq_ids must lie in \[-1, 3\) .* found 3"):
        _call(entry, form, backend, seq_ids=seq_ids, num_sequences=3)
    with pytest.raises(ValueError, match="seq_ids hold no sequence"):
        _call(entry, form, backend, seq_ids=torch.full_like(seq_ids, -1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_extra_sequences_of_seq_ids_are_empty(backend):
    hidden, weight, labels = _inputs(2)
    seq_ids = torch.arange(2 * B)[:, None].expand(2 * B, T).contiguous()
    out = fastdpo.sequence_logps(hidden @ weight.T, labels, seq_ids, num_sequences=2 * B + 2, backend=backend)
    assert out.logps.shape == (2 * B + 2,) and torch.equal(out.n_tokens[2 * B:], torch.zeros(2, dtype=torch.long))
    assert torch.equal(out.n_tokens[:2 * B], (labels[:, 1:] != -100).sum(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_empty_member_of_a_pair_warns_naming_the_pair(form, backend):
    hidden, weight, labels = _inputs(3)
    labels[B + 1, :] = -100  # the rejected response of pair 1 has no scored token
    with pytest.warns(EmptySequenceWarning, match=r"pair\(s\) \[1\] have a chosen or rejected response"):
        out = _call("loss", form, backend, labels=labels)
    assert out.rejected_lengths[1] == 0 and out.rejected_logps[1] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptySequenceWarning)
        _call("loss", form, backend)


# ------------------------------------------------------------------------------------------ class 4: packing

def test_pack_pairs_ignore_index_never_collides_with_a_token_id():
    with pytest.raises(ValueError, match="ignore_index must be negative"):
        pack_pairs([[1, 2]], [[5, 6]], [[7]], max_tokens=16, ignore_index=5)
    prompts, chosen, rejected = [[1, 2], [3]], [[0, 5, 39], [0]], [[39, 39], [5, 0, 0]]
    batch = pack_pairs(prompts, chosen, rejected, max_tokens=32, shared_prompt=True)
    hidden = torch.randn(*batch.input_ids.shape, D)
    out = fastdpo.sequence_logps(hidden=hidden, weight=torch.randn(V, D), labels=batch.labels,
                                 seq_ids=batch.seq_ids, num_sequences=batch.num_sequences)
    assert out.n_tokens.tolist() == [len(r) for r in chosen + rejected]  # token ids 0 and 39 all scored


BAD_PACK_OPTIONS = [
    (dict(max_tokens="64"), TypeError, "max_tokens"), (dict(max_tokens=3), ValueError, "max_tokens"),
    (dict(shared_prompt=1), TypeError, "shared_prompt"), (dict(truncation=None), TypeError, "truncation"),
    (dict(truncation="cut"), ValueError, "truncation"), (dict(pad_token_id=-1), ValueError, "pad_token_id"),
    (dict(pad_token_id=1.0), TypeError, "pad_token_id"), (dict(pad_to_multiple_of=0), ValueError, "pad_to_multiple_of"),
    (dict(vocab_size=0), ValueError, "vocab_size"), (dict(ignore_index="-100"), TypeError, "ignore_index"),
    (dict(vocab_size=10, pad_token_id=10), ValueError, "pad_token_id=10 is outside the vocabulary"),
]


@pytest.mark.parametrize("options,error,message", BAD_PACK_OPTIONS)
def test_packing_options_are_validated_by_name(options, error, message):
    kwargs = {"max_tokens": 16, **options}
    with pytest.raises(error, match=message):
        pack_pairs([[1, 2]], [[3]], [[4]], **kwargs)
    with pytest.raises(error, match=message):
        PairCollator(**kwargs)


def _rows():
    """Tokenized rows as TRL 1.16's DPOTrainer makes them."""
    return [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
            {"prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [9, 10, 11]}]


def _legacy(rows):
    """The same rows under TRL < 1.0's column names."""
    return [{"prompt_input_ids": r["prompt_ids"], "chosen_input_ids": r["chosen_ids"],
             "rejected_input_ids": r["rejected_ids"]} for r in rows]


def test_trl_rows_datasets_and_collator_pack_like_token_lists():
    import datasets

    rows = _rows()
    expected = pack_pairs([r["prompt_ids"] for r in rows], [r["chosen_ids"] for r in rows],
                          [r["rejected_ids"] for r in rows], max_tokens=16, shared_prompt=True)
    legacy = _legacy(rows)
    tuples = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows]
    loader = torch.utils.data.DataLoader(datasets.Dataset.from_list(rows), batch_size=2,
                                         collate_fn=PairCollator(max_tokens=16))
    for batch in [pack_rows(rows, max_tokens=16), pack_rows(legacy, max_tokens=16), pack_rows(tuples, max_tokens=16),
                  pack_rows(datasets.Dataset.from_list(rows), max_tokens=16), next(iter(loader))]:
        for name in ("input_ids", "labels", "seq_ids", "position_ids"):
            assert torch.equal(getattr(batch, name), getattr(expected, name)), name
    with pytest.raises(ValueError, match=r"needs the keys \('prompt_ids', 'chosen_ids', 'rejected_ids'\)"):
        pack_rows([{"prompt": [1], "chosen": [2], "rejected": [3]}], max_tokens=16)
    with pytest.raises(ValueError, match="needs the columns"):
        pack_rows(datasets.Dataset.from_list([{"prompt": [1]}]), max_tokens=16)
    with pytest.raises(TypeError, match="rows must be a datasets.Dataset or a sequence"):
        pack_rows({"prompt_ids": [1]}, max_tokens=16)


# ------------------------------------------------------------------------------------- class 5: clear errors

def _meta(tensor):
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_malformed_tensors_get_errors_naming_the_argument(entry, backend):
    hidden, weight, labels = _inputs(4)
    seq_ids = torch.arange(2 * B)[:, None].expand(2 * B, T).contiguous()
    cases = [
        (dict(labels=labels.tolist()), TypeError, "labels must be an int64 or int32 tensor, got list"),
        (dict(labels=labels[:, :0], hidden=hidden[:, :0]), ValueError, "at least one row and one position"),
        (dict(seq_ids=torch.where(seq_ids == 1, -2, seq_ids)), ValueError, r"seq_ids must lie in \[-1, 4\) .*found -2"),
        (dict(seq_ids=seq_ids.float()), ValueError, "seq_ids must be an int64 or int32 tensor"),
        (dict(labels=_meta(labels)), ValueError, "hidden is on cpu but labels is on meta"),
        (dict(seq_ids=_meta(seq_ids)), ValueError, "seq_ids is on meta but labels is on cpu"),
        (dict(weight=_meta(weight)), ValueError, "weight is on meta but labels is on cpu"),
        (dict(weight=weight.bfloat16()), ValueError, "weight dtype torch.bfloat16 must equal hidden dtype"),
        (dict(bias=torch.zeros(V, dtype=torch.float64)), ValueError, r"bias must have shape \(40,\) and dtype"),
        (dict(hidden=hidden.tolist()), TypeError, "hidden must be a floating-point tensor, got list"),
        (dict(weight=torch.zeros(0, D)), ValueError, "weight must have shape"),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            _call(entry, "fused", backend, **overrides)
    with pytest.raises(ValueError, match="logits must have shape"):
        _call(entry, "logits", backend, logits=torch.randn(2 * B, T, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_inputs_get_errors_naming_the_argument(backend):
    hidden, weight, labels = _inputs(5)
    cases = [
        (dict(ref_logps=[0.0] * 2 * B), TypeError, "ref_logps must be a tensor, got list"),
        (dict(ref_logps=torch.zeros(2 * B, dtype=torch.long)), ValueError, "ref_logps must be a float32 tensor"),
        (dict(ref_logps=_meta(torch.zeros(2 * B))), ValueError, "ref_logps is on meta"),
        (dict(ref_logps=torch.tensor([0.0, float("nan"), 0.0, 0.0])), ValueError, "ref_logps contains NaN"),
        (dict(ref_logps=None, ref_hidden=_meta(hidden)), ValueError, "reference model inputs: hidden is on meta"),
        (dict(ref_logps=None, ref_hidden=hidden.double()), ValueError, "reference model inputs: weight dtype"),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            _call("loss", "fused", backend, **overrides)


# --------------------------------------------------------------------------- class 6: reference cache durability

def _compute_fn(calls):
    def compute(batch_pairs):
        calls.append(len(batch_pairs))
        return torch.full((len(batch_pairs),), -1.0), torch.full((len(batch_pairs),), -2.0)
    return compute


def test_cache_build_checks_its_arguments_and_destination_before_computing(tmp_path):
    calls = []
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for path in (blocker / "cache.safetensors", tmp_path / "missing" / "cache.safetensors", tmp_path):
        with pytest.raises(ReferenceCacheError, match=re.escape(str(path))):
            ReferenceCache.build(_rows(), _compute_fn(calls), path, reference_id="r")
    for kwargs, error, message in [(dict(batch_size=1.5), TypeError, "batch_size"),
                                   (dict(batch_size=0), ValueError, "batch_size"),
                                   (dict(metadata={"x": object()}), TypeError, "metadata must be JSON"),
                                   (dict(reference_id=3), TypeError, "reference_id"),
                                   (dict(progress="no", reference_id="r"), TypeError, "progress")]:
        with pytest.raises(error, match=message):
            ReferenceCache.build(_rows(), _compute_fn(calls), tmp_path / "c.safetensors", **kwargs)
    assert calls == []  # nothing was computed


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_cache_save_is_durable_and_cleans_up_temp_files(tmp_path, monkeypatch):
    import fastdpo.ref_cache as ref_cache

    path = tmp_path / "c.safetensors"
    stale, alive = tmp_path / f"c.safetensors.tmp{_dead_pid()}", tmp_path / "c.safetensors.tmp1"
    stale.write_bytes(b"partial file of a killed run")
    alive.write_bytes(b"file of a running process (pid 1)")
    events = []
    fsync, replace = ref_cache._fsync, ref_cache.os.replace
    monkeypatch.setattr(ref_cache, "_fsync", lambda p: (events.append(("fsync", str(p))), fsync(p)))
    monkeypatch.setattr(ref_cache.os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))),
                                                               replace(a, b)))
    ReferenceCache.build(_rows(), _compute_fn([]), path, reference_id="r", progress=False)
    tmp = f"{path}.tmp{ref_cache.os.getpid()}"
    assert events == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(tmp_path))]
    assert not stale.exists() and alive.exists()

    def failing_replace(a, b):
        raise OSError("disk full")
    monkeypatch.setattr(ref_cache.os, "replace", failing_replace)
    before = path.read_bytes()
    with pytest.raises(OSError, match="disk full"):
        ReferenceCache.build(_rows()[:1], _compute_fn([]), path, reference_id="r", progress=False)
    assert path.read_bytes() == before and {p.name for p in tmp_path.iterdir()} == {path.name, alive.name}


def test_cache_load_without_a_reference_check_warns_unless_opted_out(tmp_path):
    path = tmp_path / "c.safetensors"
    ReferenceCache.build(_rows(), _compute_fn([]), path, reference_id="model@1", progress=False)
    with pytest.warns(UnverifiedReferenceCacheWarning, match="may hold another model's log-probs"):
        ReferenceCache.load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedReferenceCacheWarning)
        ReferenceCache.load(path, verify_reference=False)
        ReferenceCache.load(path, reference_id="model@1")
    with pytest.raises(ValueError, match="verify_reference=False contradicts"):
        ReferenceCache.load(path, reference_id="model@1", verify_reference=False)


def test_cache_takes_trl_rows_and_datasets(tmp_path):
    import datasets

    rows = _rows()
    cache = ReferenceCache.build(datasets.Dataset.from_list(rows), _compute_fn([]), tmp_path / "c.safetensors",
                                 reference_id="r", progress=False)
    legacy = _legacy(rows)
    for batch in (rows, legacy, [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows],
                  datasets.Dataset.from_list(rows)):
        assert cache.ref_logps(batch).tolist() == [-1.0, -1.0, -2.0, -2.0]


# ---------------------------------------------------------------------------------------- class 7: float64

@pytest.mark.parametrize("form", FORMS)
def test_float64_inputs_give_float64_results_on_the_twin_and_are_refused_by_triton(form):
    hidden, weight, labels = (x.double() if x.is_floating_point() else x for x in _inputs(6))
    inputs = dict(hidden=hidden, weight=weight) if form == "fused" else dict(logits=hidden @ weight.T)
    expected = sequence_logps_f64(hidden @ weight.T, labels)[0]
    for backend in ("auto", "torch"):
        out = fastdpo.sequence_logps(labels=labels, backend=backend, **inputs)
        assert out.logps.dtype == torch.float64 and rel_err(out.logps, expected) <= 1e-12
    with pytest.raises(ValueError, match="float64 inputs are computed by the PyTorch twin only"):
        fastdpo.sequence_logps(labels=labels, backend="triton", **inputs)


# ---------------------------------------------------------------------------------- host syncs (issue 8 item 6)

SYNC_OPS = {"_local_scalar_dense", "nonzero", "equal", "bincount", "unique", "_unique2", "unique_dim",
            "unique_consecutive", "masked_select", "is_nonzero", "repeat_interleave"}


class _SyncCounter(TorchDispatchMode):
    """Counts the ops that wait for the device on CUDA (reading a value on the host, data-dependent shapes),
    boolean-mask indexing, and Tensor.tolist() (a device-to-host copy on CUDA, no dispatched op on CPU).
    Ops run by the PyTorch twin are not counted: on CUDA the Triton launchers run in its place."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def record(self, name):
        import traceback

        frames = [f.filename for f in traceback.extract_stack() if "/fastdpo/" in f.filename
                  or "/kernels/" in f.filename]
        if not frames or not frames[-1].endswith("torch_ops.py"):
            self.syncs.append((name, frames[-1].rsplit("/", 1)[-1] if frames else "?"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        boolean_index = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                for i in args[1] if i is not None)
        if name in SYNC_OPS or boolean_index:
            self.record(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_forces_at_most_two_host_syncs(backend, monkeypatch):
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2 * B, T, D, generator=g, requires_grad=True)
    ref_hidden, weight = torch.randn(2 * B, T, D, generator=g), torch.randn(V, D, generator=g)
    labels = random_labels(2 * B, T, V, prompt_len=2, seed=7)
    counter = _SyncCounter()
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (counter.record("tolist"), tolist(self))[1])
    with counter:
        out = fastdpo.loss(hidden=hidden, weight=weight, ref_hidden=ref_hidden, labels=labels, backend=backend)
    assert len(counter.syncs) <= 2, counter.syncs
    assert torch.isfinite(out.loss)
