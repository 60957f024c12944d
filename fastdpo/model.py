"""DPO loss straight from a Hugging Face causal LM and a PackedBatch, without materialising logits.

    batch = fastdpo.packing.pack_pairs(prompts, chosen, rejected, max_tokens=2048, shared_prompt=True)
    out = fastdpo.model.model_loss(policy, batch, ref_model=ref, beta=0.1)
    out.loss.backward()

The backbone (``get_decoder()``) is run with ``use_cache=False`` to get the last hidden states; the LM head
weight/bias and the config's logit transforms (``final_logit_softcapping`` -> softcap, ``logit_scale`` /
``logits_scaling``) go to ``fastdpo.loss`` in its fused form.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from .logps import SequenceLogps, sequence_logps
from .packing import PackedBatch, flash_attn_varlen_kwargs, flex_block_mask

__all__ = ["model_loss", "model_sequence_logps", "forward_hidden", "attention_inputs", "lm_head_params",
           "unwrap_causal_lm"]

_SDPA_LIKE = ("sdpa",)
_EAGER_LIKE = ("eager",)


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside `model` (PEFT's PeftModel -> get_base_model())."""
    lm = model
    if hasattr(lm, "get_base_model") and callable(lm.get_base_model):
        lm = lm.get_base_model()
    if not hasattr(lm, "get_output_embeddings"):
        raise ValueError(f"{type(model).__name__} is not a Hugging Face causal LM (no get_output_embeddings())")
    return lm


def _backbone(lm: torch.nn.Module) -> torch.nn.Module:
    dec = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if dec is None or dec is lm:
        for name in ("model", "transformer", "gpt_neox", "base_model"):
            cand = getattr(lm, name, None)
            if isinstance(cand, torch.nn.Module) and cand is not lm:
                dec = cand
                break
        else:
            raise ValueError(f"cannot find the decoder backbone of {type(lm).__name__} (get_decoder() / .model)")
    return dec


def _text_config(lm):
    cfg = lm.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def lm_head_params(model: torch.nn.Module) -> dict[str, Any]:
    """{"weight", "bias", "logit_scale", "softcap"} of a causal LM's output layer and config."""
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(lm).__name__} has no output embedding (get_output_embeddings() returned {head!r})")
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ValueError("adapters on the output embedding (lm_head) are not supported by the fused LM-head loss")
    weight = head.weight
    if weight.dim() != 2:
        raise ValueError(f"output embedding weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    bias = getattr(head, "bias", None)
    cfg = _text_config(lm)
    logit_scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        logit_scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        logit_scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3: c * tanh(logits / c)
    return {"weight": weight, "bias": bias, "logit_scale": logit_scale,
            "softcap": float(softcap) if softcap else None}


def attention_inputs(model: torch.nn.Module, batch: PackedBatch) -> dict[str, Any]:
    """Keyword arguments describing the packed attention for the model's attention implementation.

    Transformers returns a 4-D attention_mask untouched (masking_utils._preprocess_mask_arguments), so:
    sdpa -> boolean mask (True = attend); eager -> additive float mask (eager *adds* the mask to the
    scores, a boolean mask would be silently wrong); flex_attention -> BlockMask; flash-attention ->
    no mask, varlen cu_seqlens over the flattened rows (non-shared layout only).

    A custom mask also bypasses transformers' sliding-window masks, so sliding windows are applied here:
    models with ``config.layer_types`` get a {layer_type: mask} mapping (Gemma 2/3, Qwen2, ...), models
    with a global ``config.sliding_window`` (Mistral) get a windowed mask.
    """
    lm = unwrap_causal_lm(model)
    cfg = _text_config(lm)
    impl = getattr(cfg, "_attn_implementation", None) or getattr(lm.config, "_attn_implementation", None)
    impl = impl or "eager"
    emb = lm.get_input_embeddings().weight
    dev = emb.device
    if "flash" in impl:  # flash-attn applies sliding windows itself
        kw = flash_attn_varlen_kwargs(batch.to(dev), hf_names=True)  # raises for the shared layout
        return {"attention_mask": None, **kw}
    if impl in _SDPA_LIKE:
        make = lambda w: batch.bool_mask(w).to(dev)  # noqa: E731
    elif impl in _EAGER_LIKE:
        dtype = emb.dtype if emb.dtype.is_floating_point else torch.float32
        make = lambda w: batch.eager_mask(dtype, w).to(dev)  # noqa: E731
    elif impl == "flex_attention":
        make = lambda w: flex_block_mask(batch, device=dev, sliding_window=w)  # noqa: E731
    else:
        raise ValueError(
            f"attn_implementation={impl!r} is not supported for packed batches; use 'sdpa', 'eager', "
            "'flex_attention' or a flash-attention implementation"
        )
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        supported = {"full_attention", "sliding_attention"}
        unknown = set(layer_types) - supported
        if unknown:
            raise ValueError(f"layer types {sorted(unknown)} are not supported for packed batches")
        if "sliding_attention" in layer_types:
            if window is None:
                raise ValueError("config.layer_types has sliding_attention layers but no sliding_window")
            mapping = {"full_attention": make(None)} if "full_attention" in layer_types else {}
            mapping["sliding_attention"] = make(window)
            return {"attention_mask": mapping}
        return {"attention_mask": make(None)}
    return {"attention_mask": make(window)}


def _check_ids(lm: torch.nn.Module, batch: PackedBatch, what: str) -> None:
    emb = lm.get_input_embeddings()
    n_in = emb.weight.shape[0] if emb is not None else None
    ids = batch.input_ids
    if int(ids.min()) < 0:
        raise ValueError(f"input_ids contain a negative token id {int(ids.min())}")
    if n_in is not None and int(ids.max()) >= n_in:
        raise ValueError(f"input_ids contain token id {int(ids.max())} outside the {what}'s vocabulary "
                         f"(input embedding size {n_in})")
    V = lm.get_output_embeddings().weight.shape[0]
    lab = batch.labels[batch.labels != batch.ignore_index]
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= V):
        bad = int(lab.max()) if int(lab.max()) >= V else int(lab.min())
        raise ValueError(f"labels contain token id {bad} outside the {what}'s vocabulary (vocab size {V})")


def forward_hidden(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Last hidden states [R, T, D] of the model's backbone for a packed batch (final norm applied)."""
    lm = unwrap_causal_lm(model)
    backbone = _backbone(lm)
    dev = lm.get_input_embeddings().weight.device
    kw = attention_inputs(lm, batch)
    out = backbone(
        input_ids=batch.input_ids.to(dev),
        position_ids=batch.position_ids.to(dev),
        use_cache=False,
        **kw,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if hidden.shape[:2] != batch.input_ids.shape:
        raise RuntimeError(f"backbone returned hidden states of shape {tuple(hidden.shape)} for a batch of "
                           f"shape {tuple(batch.input_ids.shape)}")
    return hidden


def model_sequence_logps(model: torch.nn.Module, batch: PackedBatch, *, backend: str = "auto",
                         temperature: float = 1.0) -> SequenceLogps:
    """Per-sequence log-probs (logps [2B] float32, TRL order, and n_tokens [2B]) of a packed batch's responses.

    Runs the backbone (:func:`forward_hidden`) and scores the labels with ``fastdpo.sequence_logps`` in the fused
    form from the LM head and the config's logit transforms (:func:`lm_head_params`): logits are never
    materialised. The result is on the model's device. Gradient mode is the caller's: wrap in ``torch.no_grad()``
    for a reference model.
    """
    if not isinstance(batch, PackedBatch):
        raise ValueError(f"batch must be a fastdpo.packing.PackedBatch (from pack_pairs), got {type(batch).__name__}")
    lm = unwrap_causal_lm(model)
    head = lm_head_params(lm)
    _check_ids(lm, batch, "model")
    batch = batch.to(head["weight"].device)
    return sequence_logps(hidden=forward_hidden(lm, batch), labels=batch.labels, seq_ids=batch.seq_ids,
                          ignore_index=batch.ignore_index, shift=True, num_sequences=batch.num_sequences,
                          temperature=temperature, backend=backend, **head)


@contextlib.contextmanager
def _adapters_disabled(model):
    if hasattr(model, "disable_adapter") and callable(model.disable_adapter):  # PEFT PeftModel
        with model.disable_adapter():
            yield
    elif getattr(model, "_hf_peft_config_loaded", False) and hasattr(model, "disable_adapters"):
        # transformers' PeftAdapterMixin (model.load_adapter(...))
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()
    else:
        raise ValueError(
            f"ref_adapter_disabled=True needs a PEFT model with disable_adapter() or a transformers model with a "
            f"loaded adapter (got {type(model).__name__} without adapters)"
        )


def model_loss(
    model: torch.nn.Module,
    batch: PackedBatch,
    *,
    ref_model: torch.nn.Module | None = None,
    ref_logps: torch.Tensor | None = None,
    ref_adapter_disabled: bool = False,
    backend: str = "auto",
    **loss_kwargs,
):
    """DPO-family loss of a Hugging Face causal LM on a packed batch -> fastdpo.DPOOutput.

    Reference: at most one of ``ref_model`` (another model, run under no_grad), ``ref_logps``
    (precomputed [2B] float32 per-sequence log-probs, TRL order), ``ref_adapter_disabled=True`` (the same
    PEFT model with adapters disabled, under no_grad); none for ``reference_free=True`` or reference-free
    loss types (fastdpo.loss raises if the loss needs one).
    Remaining keyword arguments (beta, loss_type, label_smoothing, temperature, ...) go to fastdpo.loss.
    """
    import fastdpo  # the package's public loss (fastdpo/dpo.py)

    if not isinstance(batch, PackedBatch):
        raise ValueError(f"batch must be a fastdpo.packing.PackedBatch (from pack_pairs), got {type(batch).__name__}")
    n_ref = (ref_model is not None) + (ref_logps is not None) + bool(ref_adapter_disabled)
    if n_ref > 1:
        raise ValueError("pass only one of ref_model, ref_logps, ref_adapter_disabled=True")
    for k in ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias", "labels", "seq_ids", "logits",
              "ref_logits", "shift", "logit_scale", "softcap", "num_sequences", "ignore_index"):
        if k in loss_kwargs:
            raise ValueError(f"model_loss sets {k!r} itself; do not pass it")

    lm = unwrap_causal_lm(model)
    head = lm_head_params(lm)
    _check_ids(lm, batch, "model")
    dev = head["weight"].device
    if batch.input_ids.device != dev:
        batch = batch.to(dev)

    common = dict(labels=batch.labels, seq_ids=batch.seq_ids, ignore_index=batch.ignore_index, shift=True,
                  num_sequences=batch.num_sequences, backend=backend)
    ref_kw: dict[str, Any] = {}
    if ref_model is not None:
        ref_lm = unwrap_causal_lm(ref_model)
        ref_head = lm_head_params(ref_lm)
        if ref_head["weight"].shape[0] != head["weight"].shape[0]:
            raise ValueError(f"ref_model vocabulary size {ref_head['weight'].shape[0]} != model vocabulary size "
                             f"{head['weight'].shape[0]}")
        _check_ids(ref_lm, batch, "ref_model")
        with torch.no_grad():
            if (ref_head["logit_scale"], ref_head["softcap"]) == (head["logit_scale"], head["softcap"]):
                ref_hidden = forward_hidden(ref_lm, batch).to(dev)  # ref_model may live on another device
                ref_kw = dict(ref_hidden=ref_hidden, ref_weight=ref_head["weight"].detach().to(dev),
                              ref_bias=None if ref_head["bias"] is None else ref_head["bias"].detach().to(dev))
            else:  # different logit transforms: score the reference on its own
                ref = model_sequence_logps(ref_lm, batch, backend=backend,
                                           temperature=loss_kwargs.get("temperature", 1.0))
                ref_kw = dict(ref_logps=ref.logps.to(dev))
    elif ref_adapter_disabled:
        with torch.no_grad(), _adapters_disabled(model):
            ref_hidden = forward_hidden(lm, batch)
        ref_kw = dict(ref_hidden=ref_hidden, ref_weight=head["weight"].detach(),
                      ref_bias=None if head["bias"] is None else head["bias"].detach())
    elif ref_logps is not None:
        if isinstance(ref_logps, torch.Tensor) and ref_logps.shape != (batch.num_sequences,):
            raise ValueError(f"ref_logps must have shape [{batch.num_sequences}] (2 x {batch.num_pairs} pairs, "
                             f"chosen first), got {tuple(ref_logps.shape)}")
        ref_kw = dict(ref_logps=ref_logps)

    hidden = forward_hidden(lm, batch)
    transforms = {}
    if head["logit_scale"] != 1.0:
        transforms["logit_scale"] = head["logit_scale"]
    if head["softcap"] is not None:
        transforms["softcap"] = head["softcap"]
    return fastdpo.loss(hidden=hidden, weight=head["weight"], bias=head["bias"], **ref_kw, **common,
                        **transforms, **loss_kwargs)
