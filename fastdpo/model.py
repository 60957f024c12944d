"""DPO loss straight from a Hugging Face causal LM and a PackedBatch, without materialising logits.

    batch = fastdpo.packing.pack_pairs(prompts, chosen, rejected, max_tokens=2048, shared_prompt=True)
    out = fastdpo.model.model_loss(policy, batch, ref_model=ref, beta=0.1)
    out.loss.backward()

The model is called as given (``model(...)``, its outermost ``__call__``), so every wrapper of its forward
applies: DDP, FSDP2, accelerate's autocast wrapper, ``torch.compile``, PEFT, gradient checkpointing. A
forward pre-hook on the LM head captures the head's input (the last hidden states) and hands the head an
empty slice, so the head's matmul computes nothing; the weight of the head module that actually ran (PEFT
``modules_to_save``: the trained copy, or the original with adapters disabled) and the config's logit
transforms (``final_logit_softcapping`` -> softcap, ``logit_scale`` / ``logits_scaling``) go to
``fastdpo.loss`` in its fused form.
"""
from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch

from .attention import eager_mask, mask_placeholder, packed_implementation, segment_plan
from .distributed import HeadParameters, inner_module, is_vocab_parallel_head, parameter_rows, unwrap_causal_lm
from .logps import SequenceLogps, sequence_logps
from .packing import PackedBatch

__all__ = ["model_loss", "model_sequence_logps", "forward_hidden", "HeadInputs", "attention_inputs",
           "use_packed_attention", "logit_transforms", "unwrap_causal_lm"]


def _text_config(lm):
    cfg = lm.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def logit_transforms(model: torch.nn.Module) -> dict[str, Any]:
    """{"logit_scale", "softcap"} from a causal LM's config (Cohere, Granite, Gemma 2/3)."""
    cfg = _text_config(unwrap_causal_lm(model))
    logit_scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        logit_scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        logit_scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3: c * tanh(logits / c)
    return {"logit_scale": logit_scale, "softcap": float(softcap) if softcap else None}


def _head_leaves(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The module(s) that may compute the logits: the output embedding, or, for a PEFT modules_to_save
    wrapper, its original module and every trained copy (whichever runs is the one in use)."""
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embedding (get_output_embeddings() returned None)")
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ValueError("adapters on the output embedding (lm_head) are not supported by the fused LM-head loss; "
                         "remove 'lm_head' from the adapter's target_modules (modules_to_save is supported)")
    leaves = [m for m in head.modules() if not list(m.children())]
    if not leaves or not all(isinstance(getattr(m, "weight", None), torch.Tensor) for m in leaves):
        raise ValueError(f"output embedding {type(head).__name__} is not a linear layer with a weight")
    return leaves


def _attn_implementation(lm: torch.nn.Module) -> str:
    cfg = _text_config(lm)
    impl = getattr(cfg, "_attn_implementation", None) or getattr(lm.config, "_attn_implementation", None)
    return impl or "eager"


def attention_inputs(model: torch.nn.Module, batch: PackedBatch) -> dict[str, Any]:
    """Keyword arguments describing the packed attention for the model's attention implementation.

    sdpa, flash-attention and flex_attention: {"attention_mask": a stride-0 placeholder, "fastdpo_segments":
    the batch's SegmentPlan}, for the packed attention of that kernel family (``fastdpo.attention``), which the
    model must use (:func:`use_packed_attention`; ``forward_hidden`` does). No mask is built: attention costs
    the sum over the batch's segments. eager: the dense additive ``[R, 1, T, T]`` mask (eager *adds* the mask
    to the scores), the reference; a custom 4-D mask bypasses transformers' sliding-window masks, so models with
    ``config.layer_types`` get a {layer_type: mask} mapping (Gemma 2/3, Qwen2, ...), models with a global
    ``config.sliding_window`` (Mistral) a windowed mask. The packed attentions take each layer's window from
    the layer itself.
    """
    lm = unwrap_causal_lm(model)
    cfg = _text_config(lm)
    impl = _attn_implementation(lm)
    emb = lm.get_input_embeddings().weight
    layer_types = getattr(cfg, "layer_types", None) or ()
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"layer types {sorted(unknown)} are not supported for packed batches")
    if impl != "eager":
        packed_implementation(impl)  # raises for an implementation it cannot serve
        plan = segment_plan(batch, emb.device)
        return {"attention_mask": mask_placeholder(plan, emb.device), "fastdpo_segments": plan}
    batch = batch.to(emb.device)
    dtype = emb.dtype if emb.dtype.is_floating_point else torch.float32
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    if "sliding_attention" in layer_types:
        if window is None:
            raise ValueError("config.layer_types has sliding_attention layers but no sliding_window")
        mapping = {"full_attention": eager_mask(batch, dtype)} if "full_attention" in layer_types else {}
        mapping["sliding_attention"] = eager_mask(batch, dtype, window)
        return {"attention_mask": mapping}
    return {"attention_mask": eager_mask(batch, dtype, None if layer_types else window)}


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch the model's (text) attention to fastdpo's packed attention of its implementation X ("fastdpo|X":
    ``fastdpo.attention``), for good: the switch must outlive the forward, since gradient checkpointing reruns
    it during backward. Calls without a segment plan (generation, evaluation) still run X itself. eager stays."""
    lm = unwrap_causal_lm(model)
    impl = _attn_implementation(lm)
    if impl != "eager":
        _text_config(lm)._attn_implementation = packed_implementation(impl)


def _check_ids(lm: torch.nn.Module, batch: PackedBatch, what: str) -> None:
    emb = lm.get_input_embeddings()
    n_in = parameter_rows(emb.weight) if emb is not None else None
    ids = batch.input_ids
    if int(ids.min()) < 0:
        raise ValueError(f"input_ids contain a negative token id {int(ids.min())}")
    if n_in is not None and int(ids.max()) >= n_in:
        raise ValueError(f"input_ids contain token id {int(ids.max())} outside the {what}'s vocabulary "
                         f"(input embedding size {n_in})")
    V = _text_config(lm).vocab_size
    lab = batch.labels[batch.labels != batch.ignore_index]
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= V):
        bad = int(lab.max()) if int(lab.max()) >= V else int(lab.min())
        raise ValueError(f"labels contain token id {bad} outside the {what}'s vocabulary (vocab size {V})")


class HeadInputs(NamedTuple):
    """What the LM head would have multiplied: hidden [R, T, D] and weight [V, D] (+ bias [V]) in the dtype
    the head computes in (the autocast dtype under autocast), plus the config's logit transforms."""
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None


def forward_hidden(model: torch.nn.Module, batch: PackedBatch) -> HeadInputs:
    """Run `model(...)` (its outermost __call__) on a packed batch; return the LM head's inputs (HeadInputs).

    A forward pre-hook on the head module(s) records the last hidden states (final norm applied), the
    module that ran and the autocast dtype in force, and passes an empty slice on (one position for a vocabulary-parallel head).
    The head's weight and bias are read by fastdpo.distributed.HeadParameters (FSDP2 shards gathered, DeepSpeed
    ZeRO-3 partitions taken inside the head's forward).
    """
    lm = unwrap_causal_lm(model)
    leaves = _head_leaves(lm)
    _check_ids(lm, batch, "model")
    parameters = HeadParameters(model, leaves)  # refuses, before the forward, what it could not read
    captured = []

    def capture(module, args):
        hidden = args[0]
        device_type = hidden.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        captured.append((module, hidden, autocast))
        # the head then computes [R, 0, V]; a vocabulary-parallel (DTensor) head cannot shard an empty
        # sequence, so it gets one position ([R, 1, V], discarded)
        keep = 1 if is_vocab_parallel_head(module) else 0
        return (hidden[..., :keep, :],) + tuple(args[1:])

    handles = [leaf.register_forward_pre_hook(capture) for leaf in leaves]
    try:
        attention = attention_inputs(lm, batch)
        batch = batch.to(lm.get_input_embeddings().weight.device)
        use_packed_attention(lm)
        with parameters:
            model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **attention)
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the model's forward called its output embedding {len(captured)} times (expected once)")
    module, hidden, autocast = captured[0]
    if hidden.shape[:2] != batch.input_ids.shape:
        raise RuntimeError(f"the LM head received hidden states of shape {tuple(hidden.shape)} for a batch of "
                           f"shape {tuple(batch.input_ids.shape)}")
    weight, bias = parameters.read(module)
    dtype = autocast or weight.dtype
    hidden = hidden.to(device=weight.device, dtype=dtype)
    return HeadInputs(hidden, weight.to(dtype), None if bias is None else bias.to(dtype), **logit_transforms(lm))


def _require_packed(batch) -> None:
    if not isinstance(batch, PackedBatch):
        raise ValueError(f"batch must be a fastdpo.packing.PackedBatch (from pack_pairs), got {type(batch).__name__}")


def _autocast_off(tensor: torch.Tensor):
    """fastdpo's kernels choose their own precision: no autocast around them."""
    return torch.autocast(tensor.device.type, enabled=False)


def model_sequence_logps(model: torch.nn.Module, batch: PackedBatch, **options) -> SequenceLogps:
    """Per-sequence log-probs (logps [2B] float32, TRL order, and n_tokens [2B]) of a packed batch's responses.

    Runs the model (:func:`forward_hidden`) and scores the labels with ``fastdpo.sequence_logps`` in the fused
    form: logits are never materialised. `options` (backend, temperature, ...) go to ``sequence_logps``. The
    result is on the LM head's device. Gradient mode is the caller's: wrap in ``torch.no_grad()`` for a
    reference model.
    """
    _require_packed(batch)
    head = forward_hidden(model, batch)
    batch = batch.to(head.weight.device)
    with _autocast_off(head.hidden):
        return sequence_logps(hidden=head.hidden, weight=head.weight, bias=head.bias, logit_scale=head.logit_scale,
                              softcap=head.softcap, labels=batch.labels, seq_ids=batch.seq_ids,
                              ignore_index=batch.ignore_index, shift=True, num_sequences=batch.num_sequences,
                              **options)


@contextlib.contextmanager
def adapters_disabled(model):
    """PEFT adapters of `model` switched off (the base model: DPO's reference for adapter training)."""
    lm = model
    while not hasattr(lm, "disable_adapter") and inner_module(lm) is not None:  # DDP / compile around PEFT
        lm = inner_module(lm)
    if hasattr(lm, "disable_adapter") and callable(lm.disable_adapter):  # PEFT PeftModel
        with lm.disable_adapter():
            yield
    elif getattr(lm, "_hf_peft_config_loaded", False) and hasattr(lm, "disable_adapters"):
        # transformers' PeftAdapterMixin (model.load_adapter(...))
        lm.disable_adapters()
        try:
            yield
        finally:
            lm.enable_adapters()
    else:
        raise ValueError(
            f"ref_adapter_disabled=True needs a PEFT model with disable_adapter() or a transformers model with a "
            f"loaded adapter (got {type(model).__name__} without adapters)"
        )


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """`module` in eval mode (dropout off, as TRL runs its reference) inside the block; every submodule's own
    train/eval mode is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def model_loss(
    model: torch.nn.Module,
    batch: PackedBatch,
    *,
    ref_model: torch.nn.Module | None = None,
    ref_logps: torch.Tensor | None = None,
    ref_adapter_disabled: bool = False,
    **loss_kwargs,
):
    """DPO-family loss of a Hugging Face causal LM on a packed batch -> fastdpo.DPOOutput.

    `model` (and `ref_model`) are called as given, wrappers included (DDP, FSDP2, torch.compile, accelerate).
    Reference: at most one of ``ref_model`` (another model, run under no_grad in eval mode, as TRL runs its
    reference: dropout off, each submodule's mode restored after), ``ref_logps`` (precomputed [2B] float32
    per-sequence log-probs, TRL order), ``ref_adapter_disabled=True`` (the same PEFT model with adapters
    disabled, under no_grad in eval mode: the original LM head of a modules_to_save head); none for
    ``reference_free=True`` or reference-free loss types (fastdpo.loss raises if the loss needs one).
    Remaining keyword arguments (beta, loss_type, label_smoothing, temperature, backend, ...) go to fastdpo.loss.
    """
    import fastdpo  # the package's public loss (fastdpo/dpo.py)

    _require_packed(batch)
    n_ref = (ref_model is not None) + (ref_logps is not None) + bool(ref_adapter_disabled)
    if n_ref > 1:
        raise ValueError("pass only one of ref_model, ref_logps, ref_adapter_disabled=True")
    for k in ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias", "labels", "seq_ids", "logits",
              "ref_logits", "shift", "logit_scale", "softcap", "num_sequences", "ignore_index"):
        if k in loss_kwargs:
            raise ValueError(f"model_loss sets {k!r} itself; do not pass it")

    ref_kw: dict[str, Any] = {}
    if ref_model is not None or ref_adapter_disabled:
        reference = model if ref_adapter_disabled else ref_model
        with (torch.no_grad(), eval_mode(reference),
              adapters_disabled(model) if ref_adapter_disabled else contextlib.nullcontext()):
            ref = forward_hidden(reference, batch)
        ref_kw = dict(ref_hidden=ref.hidden, ref_weight=ref.weight, ref_bias=ref.bias)
    elif ref_logps is not None:
        if isinstance(ref_logps, torch.Tensor) and ref_logps.shape != (batch.num_sequences,):
            raise ValueError(f"ref_logps must have shape [{batch.num_sequences}] (2 x {batch.num_pairs} pairs, "
                             f"chosen first), got {tuple(ref_logps.shape)}")
        ref_kw = dict(ref_logps=ref_logps)

    head = forward_hidden(model, batch)
    dev = head.weight.device
    batch = batch.to(dev)
    if "ref_hidden" in ref_kw:
        ref_kw = _reference_on(ref_kw, ref, head, batch, loss_kwargs)
    with _autocast_off(head.hidden):
        return fastdpo.loss(hidden=head.hidden, weight=head.weight, bias=head.bias, logit_scale=head.logit_scale,
                            softcap=head.softcap, labels=batch.labels, seq_ids=batch.seq_ids,
                            ignore_index=batch.ignore_index, shift=True, num_sequences=batch.num_sequences,
                            **ref_kw, **loss_kwargs)


def _reference_on(ref_kw: dict, ref: HeadInputs, head: HeadInputs, batch: PackedBatch, loss_kwargs: dict) -> dict:
    """The reference's fused inputs on the policy head's device and dtype; a reference with other logit
    transforms (or vocabulary) cannot share the policy's fused call and is scored on its own."""
    if ref.weight.shape[0] != head.weight.shape[0]:
        raise ValueError(f"ref_model vocabulary size {ref.weight.shape[0]} != model vocabulary size "
                         f"{head.weight.shape[0]}")
    dev, dtype = head.weight.device, head.weight.dtype
    if (ref.logit_scale, ref.softcap) == (head.logit_scale, head.softcap):
        return dict(ref_hidden=ref.hidden.to(dev, dtype), ref_weight=ref.weight.to(dev, dtype),
                    ref_bias=None if ref.bias is None else ref.bias.to(dev, dtype))
    with torch.no_grad(), _autocast_off(ref.hidden):
        scored = sequence_logps(hidden=ref.hidden, weight=ref.weight, bias=ref.bias, logit_scale=ref.logit_scale,
                                softcap=ref.softcap, labels=batch.labels.to(ref.weight.device),
                                seq_ids=batch.seq_ids.to(ref.weight.device), ignore_index=batch.ignore_index,
                                shift=True, num_sequences=batch.num_sequences,
                                temperature=loss_kwargs.get("temperature", 1.0))
    return dict(ref_logps=scored.logps.to(dev))
