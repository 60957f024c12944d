"""Peer implementations of the DPO loss head, each used the way its library uses it in real training.

* TRL 1.16 `DPOTrainer` patches the model with `trl.trainer.utils.add_fused_lm_head`, which calls
  `trl.kernels.ChunkedLogProbFunction` (vocabulary chunks of `_CHUNKED_LOGPROB_CHUNK_SIZE` = 32768,
  token chunks of 4096). On Triton devices (CUDA/XPU) it projects only the positions with a label
  ("compact"); elsewhere it projects every position. The policy asks for the extra outputs the DPO
  trainer logs (entropy, mean logits, top-1), the reference for log-probs only.
* Liger-Kernel `LigerFusedLinearDPOLoss` (chunks of one pair, gradients computed during forward),
  eager and `compiled=True`.
* PyTorch `torch.nn.functional.linear_cross_entropy` with `LinearCrossEntropyOptions()` (its default
  chunking) and with `batch_chunk_size=256`, reduction="none" to get per-token log-probs.
* Apple's Cut Cross-Entropy (`cut-cross-entropy`): Triton GPU kernels; it filters out ignored positions.

Peers that project every position get the same -100 prompt labels, so every implementation computes
the same loss; they still pay the LM head for the prompt positions.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil
from typing import Callable

import torch
import torch.nn.functional as F

from heads import (BETA, IGNORE_INDEX, IMPLS, HeadInputs, Impl, dpo_loss_fn, masked_sequence_sum, module_missing,
                   register, shifted, train_step)


def all_impls() -> dict[str, Impl]:
    """Every implementation: fastdpo and the baseline (heads.py), then the peers registered below."""
    return IMPLS


def needs(module: str, pip_name: str, check: Callable = lambda device: None) -> Callable:
    """`unavailable(device)` of a peer built on an optional package: "not installed (...)" while the package
    is absent (the peers are imported lazily, in their build functions), else check(device)."""
    return lambda device: module_missing(module, pip_name) or check(device)


# --------------------------------------------------------------------------------------------------------
# TRL
TRL_DEFAULT_CHUNK = 32768


def _trl_kernels_missing(device):
    try:
        from trl.kernels import ChunkedLogProbFunction  # noqa: F401
    except ImportError as e:
        return f"this trl has no trl.kernels.ChunkedLogProbFunction (needs trl>=1.16): {e!r}"
    return None


def _trl_chunk_size():
    """The vocabulary chunk `add_fused_lm_head` passes (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE), read
    from the source: importing trl.trainer.utils costs ~5 s of imports per worker process."""
    path = os.path.join(os.path.dirname(importlib.util.find_spec("trl").origin), "trainer", "utils.py")
    try:
        with open(path) as f:
            m = re.search(r"^_CHUNKED_LOGPROB_CHUNK_SIZE\s*=\s*(\d+)", f.read(), re.M)
    except OSError:
        return TRL_DEFAULT_CHUNK
    return int(m.group(1)) if m else TRL_DEFAULT_CHUNK


def trl_sequence_logps(hidden, weight, targets, outputs, chunk_size):
    """Per-sequence log-probs the way `add_fused_lm_head`'s forward computes them ([S, T-1] inputs)."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.kernels.chunked_logprob import _use_triton

    mask = targets != IGNORE_INDEX
    if _use_triton(hidden.device):  # compact: only positions with a label go through the head
        per_token = ChunkedLogProbFunction.apply(hidden[mask], weight, None, targets[mask], 1.0, chunk_size,
                                                 None, 1.0, outputs)[0]
        per_token = per_token.new_zeros(mask.shape).masked_scatter(mask, per_token)
    else:
        per_token = ChunkedLogProbFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight, None,
                                                 targets.clamp(min=0).reshape(-1), 1.0, chunk_size, None, 1.0,
                                                 outputs)[0]
        per_token = per_token.view(mask.shape)
    return masked_sequence_sum(per_token, targets)


@register("trl_chunked", "TRL 1.16 ChunkedLogProbFunction", group="peer", scores="all (CPU) / completion (GPU)",
          roofline="trl_chunked", package="trl",
          unavailable=needs("trl", "pip install trl; check `pip install --dry-run trl` leaves torch alone",
                            _trl_kernels_missing))
def build_trl(inp: HeadInputs):
    h, rh, tgt = shifted(inp)
    chunk = _trl_chunk_size()
    policy_outputs = ("log_probs", "entropy", "mean_logits", "is_top1")  # what DPOTrainer requests
    return train_step(inp, dpo_loss_fn(lambda: trl_sequence_logps(h, inp.weight, tgt, policy_outputs, chunk),
                                       lambda: trl_sequence_logps(rh, inp.ref_weight, tgt, ("log_probs",), chunk)))


# --------------------------------------------------------------------------------------------------------
# Liger-Kernel


LIGER = ("liger_kernel", "pip install liger-kernel")


def _compiler_missing(device):
    if device == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        return "torch.compile on CPU needs a C++ compiler (g++)"
    return None


def _build_liger(inp: HeadInputs, compiled: bool):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    fn = LigerFusedLinearDPOLoss(beta=BETA, compiled=compiled, use_ref_model=True)
    h, rh, tgt = shifted(inp)
    return train_step(inp, lambda: fn(inp.weight, h, tgt, None, rh, inp.ref_weight, None)[0])


@register("liger", "Liger-Kernel LigerFusedLinearDPOLoss", group="peer", scores="all", roofline="liger",
          package="liger-kernel", unavailable=needs(*LIGER))
def build_liger(inp):
    return _build_liger(inp, compiled=False)


@register("liger_compiled", "Liger-Kernel, compiled=True", group="peer", scores="all", roofline="liger_compiled",
          package="liger-kernel", unavailable=needs(*LIGER, _compiler_missing))
def build_liger_compiled(inp):
    return _build_liger(inp, compiled=True)


# --------------------------------------------------------------------------------------------------------
# torch.nn.functional.linear_cross_entropy


def _torch_lce_missing(device, needs_chunk_size=False):
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy with LinearCrossEntropyOptions"
    if needs_chunk_size and "batch_chunk_size" not in inspect.signature(torch.nn.LinearCrossEntropyOptions).parameters:
        return "this torch's LinearCrossEntropyOptions has no batch_chunk_size"
    return None


def _build_torch_lce(inp: HeadInputs, **options):
    h, rh, tgt = shifted(inp)
    opts = torch.nn.LinearCrossEntropyOptions(**options)
    D = h.shape[-1]

    def logps(hidden, weight):
        nll = F.linear_cross_entropy(hidden.reshape(-1, D), weight, tgt.reshape(-1), reduction="none",
                                     ignore_index=IGNORE_INDEX, options=opts)
        return masked_sequence_sum(-nll.view(tgt.shape), tgt)

    return train_step(inp, dpo_loss_fn(lambda: logps(h, inp.weight), lambda: logps(rh, inp.ref_weight)))


@register("torch_lce", "torch F.linear_cross_entropy (default chunking)", group="peer", scores="all",
          roofline="torch_lce", unavailable=_torch_lce_missing)
def build_torch_lce(inp):
    return _build_torch_lce(inp)


@register("torch_lce_256", "torch F.linear_cross_entropy (batch_chunk_size=256)", group="peer", scores="all",
          roofline="torch_lce", unavailable=lambda device: _torch_lce_missing(device, needs_chunk_size=True))
def build_torch_lce_256(inp):
    return _build_torch_lce(inp, batch_chunk_size=256)


# --------------------------------------------------------------------------------------------------------
# Cut Cross-Entropy


def _cce_not_cuda(device):
    if device != "cuda":
        return "Triton GPU kernels only (no CPU path; its torch_compile fallback is plain full logits)"
    return None


@register("cce", "Cut Cross-Entropy (cce)", group="peer", scores="completion", roofline="cce",
          package="cut-cross-entropy",
          unavailable=needs("cut_cross_entropy", "pip install cut-cross-entropy", _cce_not_cuda))
def build_cce(inp: HeadInputs):
    from cut_cross_entropy import linear_cross_entropy

    tgt = inp.labels[:, 1:]

    def logps(hidden, weight):
        # shift=True: the loss of target labels[:, t + 1] sits in the last T - 1 columns
        nll = linear_cross_entropy(hidden, weight, inp.labels, shift=True, reduction="none")
        return masked_sequence_sum(-nll[:, -tgt.shape[-1]:], tgt)

    return train_step(inp, dpo_loss_fn(lambda: logps(inp.hidden, inp.weight),
                                       lambda: logps(inp.ref_hidden, inp.ref_weight)))
