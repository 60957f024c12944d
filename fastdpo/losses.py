"""The DPO loss family on per-sequence log-probabilities, with TRL 1.16's formulas.

Every loss works on four [B] tensors of summed sequence log-probabilities: the policy's
log pi(y_c), log pi(y_r) and the reference's log pi_ref(y_c), log pi_ref(y_r) for the chosen (c)
and rejected (r) completion of each pair. Notation used in the docstrings:

    rho_c = log pi(y_c) - log pi_ref(y_c)        rho_r = log pi(y_r) - log pi_ref(y_r)
    s_c = f'(rho_c), s_r = f'(rho_r)             (f-divergence scores, see below; s = rho by default)
    Delta = s_c - s_r                            |y| = number of scored tokens, clamped to >= 1
    eps = label_smoothing                        lsig = log(sigmoid(.)),  sig = sigmoid(.)

Per-pair losses are returned; the training loss is their mean, exactly as in TRL, where several
loss types combine as  sum_k w_k * mean_i loss_k[i]  (here: per pair, sum_k w_k * loss_k[i]).

f-divergences (``f_divergence_type``, TRL's option of that name; "Beyond Reverse KL: Generalizing
Direct Preference Optimization with Diverse Divergence Constraints", arXiv:2309.16240) replace the
log-ratios by s = f'(u) at u = pi / pi_ref = exp(rho), only in the losses built on Delta:

    reverse_kl        s = rho                          (standard DPO, the default)
    forward_kl        s = 1 - exp(-rho)
    js_divergence     s = log 2 + lsig(rho)
    alpha_divergence  s = (exp((alpha - 1) * rho) - 1) / (alpha - 1), the exponent clamped at 80
                      (TRL's parameterisation: the paper's alpha is 1 - alpha; |alpha - 1| < 1e-6
                      falls back to reverse_kl)

Rewards are TRL's: beta * rho (detached), whatever the loss or f-divergence; for SimPO, CPOTrainer's
beta * log pi(y) / |y|.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .validate import check_bool, check_real

__all__ = [
    "F_DIVERGENCE_TYPES",
    "LOSS_PARAMS",
    "LOSS_TYPES",
    "LossConfig",
    "LossTerms",
    "check_loss_config",
    "preference_loss",
]


class LossTerms(NamedTuple):
    losses: Tensor  # [B] per-pair loss (the training loss is losses.mean())
    chosen_rewards: Tensor  # [B] detached, beta * (log pi(y_c) - log pi_ref(y_c))
    rejected_rewards: Tensor  # [B] detached, beta * (log pi(y_r) - log pi_ref(y_r))


class LossConfig(NamedTuple):
    """A validated loss configuration, as returned by `check_loss_config`."""

    loss_types: tuple[str, ...]
    loss_weights: tuple[float, ...]
    needs_reference: bool  # ref_chosen_logps / ref_rejected_logps must be given
    needs_lengths: bool  # chosen_lengths / rejected_lengths must be given
    params: dict[str, object]  # every loss parameter, defaults filled in


class _Batch(NamedTuple):
    """What a loss function sees: inputs in the compute dtype and the configuration."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor  # zeros when reference-free
    ref_rejected_logps: Tensor
    chosen_lengths: Tensor | None  # raw token counts, in the compute dtype
    rejected_lengths: Tensor | None
    chosen_scores: Tensor  # f'(rho_c)
    rejected_scores: Tensor  # f'(rho_r)
    beta: float
    label_smoothing: float
    params: dict[str, object]

    @property
    def chosen_logratios(self) -> Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def delta(self) -> Tensor:
        return self.chosen_scores - self.rejected_scores


def _per_token(values: Tensor, lengths: Tensor) -> Tensor:
    """values / |y|, with zero-length sequences counted as one token (as TRL clamps)."""
    return values / lengths.clamp(min=1)


def _conservative_logistic(z: Tensor, eps: float) -> Tensor:
    """-(1 - eps) * lsig(z) - eps * lsig(-z): the logistic loss with label smoothing eps."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


# ----------------------------------------------------------------------------------------------
# The losses. Each takes a _Batch and returns [B] per-pair losses.


def _sigmoid(b: _Batch) -> Tensor:
    """DPO: "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
    arXiv:2305.18290, with the conservative-DPO label smoothing of Mitchell, "A note on DPO with
    noisy preferences & relationship to IPO" (2023):

        loss = -(1 - eps) * lsig(beta * Delta) - eps * lsig(-beta * Delta)

    TRL 1.16 itself ignores label_smoothing here (it equals this loss at eps = 0); earlier TRL
    releases and CPOTrainer apply it as above.
    """
    return _conservative_logistic(b.beta * b.delta, b.label_smoothing)


def _hinge(b: _Batch) -> Tensor:
    """SLiC hinge loss: "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    arXiv:2305.10425 (as used in "Statistical Rejection Sampling Improves Preference
    Optimization", arXiv:2309.06657):

        loss = max(0, 1 - beta * Delta)
    """
    return torch.relu(1 - b.beta * b.delta)


def _length_normalised_delta(b: _Batch) -> Tensor:
    return _per_token(b.chosen_scores, b.chosen_lengths) - _per_token(b.rejected_scores, b.rejected_lengths)


def _ipo(b: _Batch) -> Tensor:
    """IPO: "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv:2310.12036, Eq. 17, length-normalised as TRL does (beta is the paper's tau):

        loss = (s_c / |y_c| - s_r / |y_r| - 1 / (2 * beta)) ** 2
    """
    return (_length_normalised_delta(b) - 1 / (2 * b.beta)) ** 2


def _exo_pair(b: _Batch) -> Tensor:
    """EXO (pairwise): "Towards Efficient Exact Optimization of Language Model Alignment",
    arXiv:2402.00856, Eq. 16: KL(q || p) between q = softmax of the rewards over {y_c, y_r}
    and the smoothed label distribution p = (1 - eps, eps), with 0 < eps < 1:

        loss = sig(z) * (lsig(z) - log(1 - eps)) + sig(-z) * (lsig(-z) - log(eps)),  z = beta * Delta
    """
    z = b.beta * b.delta
    eps = b.label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def _nca_pair(b: _Batch) -> Tensor:
    """NCA (pairwise): "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    arXiv:2402.05369:

        loss = -lsig(beta * rho_c) - 0.5 * lsig(-beta * rho_c) - 0.5 * lsig(-beta * rho_r)
    """
    chosen = b.beta * b.chosen_logratios
    rejected = b.beta * b.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _robust(b: _Batch) -> Tensor:
    """Robust DPO: "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    arXiv:2403.00409, with eps in [0, 0.5) the probability that a label is flipped:

        loss = (-(1 - eps) * lsig(beta * Delta) + eps * lsig(-beta * Delta)) / (1 - 2 * eps)
    """
    z = b.beta * b.delta
    eps = b.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(b: _Batch) -> Tensor:
    """BCO (pairwise): "Binary Classifier Optimization for Large Language Model Alignment",
    arXiv:2404.04656:

        loss = -lsig(beta * rho_c - delta) - lsig(-(beta * rho_r - delta))

    delta is the `bco_delta` parameter (default 0, which is TRL 1.16: it has no reward shift).
    TRL releases before 1.0 used a running mean of past rewards as delta; this function keeps no
    state, so a caller wanting that keeps the running mean itself and passes it as `bco_delta`
    (a float or a 0-d tensor, treated as a constant).
    """
    delta = b.params["bco_delta"]
    if isinstance(delta, Tensor):
        delta = delta.detach().to(b.chosen_logps)
    chosen = b.beta * b.chosen_logratios - delta
    rejected = b.beta * b.rejected_logratios - delta
    return -F.logsigmoid(chosen) - F.logsigmoid(-rejected)


def _sppo_hard(b: _Batch) -> Tensor:
    """SPPO with hard win probabilities (1 for the chosen, 0 for the rejected): "Self-Play
    Preference Optimization for Language Model Alignment", arXiv:2405.00675, Eq. 4.7:

        loss = (rho_c - 1 / (2 * beta)) ** 2 + (rho_r + 1 / (2 * beta)) ** 2
    """
    half = 0.5 / b.beta
    return (b.chosen_logratios - half) ** 2 + (b.rejected_logratios + half) ** 2


def _aot(b: _Batch) -> Tensor:
    """AOT (paired): "Distributional Preference Alignment of LLMs via Optimal Transport",
    arXiv:2406.05882. The batch's policy and reference log-ratio margins are sorted separately
    and matched by rank (so losses[i] belongs to rank i, not to pair i; only the mean is
    meaningful):

        d = sort(log pi(y_c) - log pi(y_r)) - sort(log pi_ref(y_c) - log pi_ref(y_r))
        loss = -(1 - eps) * lsig(beta * d) - eps * lsig(-beta * d)
    """
    policy = torch.sort(b.chosen_logps - b.rejected_logps).values
    reference = torch.sort(b.ref_chosen_logps - b.ref_rejected_logps).values
    return _conservative_logistic(b.beta * (policy - reference), b.label_smoothing)


def _aot_unpaired(b: _Batch) -> Tensor:
    """AOT (unpaired): "Distributional Preference Alignment of LLMs via Optimal Transport",
    arXiv:2406.05882. Chosen and rejected log-ratios are sorted separately and matched by rank
    (losses[i] belongs to rank i):

        d = sort(rho_c) - sort(rho_r)
        loss = -(1 - eps) * lsig(beta * d) - eps * lsig(-beta * d)
    """
    d = torch.sort(b.chosen_logratios).values - torch.sort(b.rejected_logratios).values
    return _conservative_logistic(b.beta * d, b.label_smoothing)


def _apo_zero(b: _Batch) -> Tensor:
    """APO-zero: "Anchored Preference Optimization and Contrastive Revisions: Addressing
    Underspecification in Alignment", arXiv:2408.06266, Eq. 7 (raise the chosen likelihood,
    lower the rejected one):

        loss = 1 - sig(beta * rho_c) + sig(beta * rho_r)
    """
    return 1 - torch.sigmoid(b.beta * b.chosen_logratios) + torch.sigmoid(b.beta * b.rejected_logratios)


def _apo_down(b: _Batch) -> Tensor:
    """APO-down: "Anchored Preference Optimization and Contrastive Revisions: Addressing
    Underspecification in Alignment", arXiv:2408.06266, Eq. 8 (lower both likelihoods, the
    rejected one more):

        loss = sig(beta * rho_c) + 1 - sig(beta * (rho_c - rho_r))
    """
    chosen = b.chosen_logratios
    return torch.sigmoid(b.beta * chosen) + 1 - torch.sigmoid(b.beta * (chosen - b.rejected_logratios))


def _discopop(b: _Batch) -> Tensor:
    """DiscoPOP (log-ratio modulated loss): "Discovering Preference Optimization Algorithms with
    and for Large Language Models", arXiv:2406.08414, Eq. 5, with tau = `discopop_tau`:

        z = beta * Delta,  m = sig(z / tau)
        loss = -lsig(z) * (1 - m) + exp(-z) * m

    exp(-z) * m is evaluated as exp(lsig(z / tau) - z): the same value, but finite where
    exp(-z) overflows while m underflows.
    """
    z = b.beta * b.delta
    tau = b.params["discopop_tau"]
    return -F.logsigmoid(z) * torch.sigmoid(-z / tau) + torch.exp(F.logsigmoid(z / tau) - z)


def _sft(b: _Batch) -> Tensor:
    """SFT: the negative log-likelihood of the chosen completions, averaged over all chosen
    tokens of the batch (as used in RPO, "Iterative Reasoning Preference Optimization",
    arXiv:2404.19733, and MPO, arXiv:2411.10442). Like TRL, the batch value is repeated for
    every pair:

        loss_i = -sum_j log pi(y_c_j) / max(1, sum_j |y_c_j|)
    """
    nll = -b.chosen_logps.sum() / b.chosen_lengths.sum().clamp(min=1)
    return nll.expand_as(b.chosen_logps)


def _sigmoid_norm(b: _Batch) -> Tensor:
    """Length-normalised DPO (TRL's "sigmoid_norm"; as in "Tulu 3: Pushing Frontiers in Open
    Language Model Post-Training", arXiv:2411.15124):

        loss = -lsig(beta * (s_c / |y_c| - s_r / |y_r|))
    """
    return -F.logsigmoid(b.beta * _length_normalised_delta(b))


def _simpo(b: _Batch) -> Tensor:
    """SimPO: "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734, Eq. 6, as TRL's CPOTrainer computes it (no reference model; gamma is the
    target reward margin `gamma`, default 0.5 like TRL's simpo_gamma; label smoothing as in
    CPOTrainer):

        z = beta * (log pi(y_c) / |y_c| - log pi(y_r) / |y_r|) - gamma
        loss = -(1 - eps) * lsig(z) - eps * lsig(-z)
    """
    margin = _per_token(b.chosen_logps, b.chosen_lengths) - _per_token(b.rejected_logps, b.rejected_lengths)
    return _conservative_logistic(b.beta * margin - b.params["gamma"], b.label_smoothing)


# ----------------------------------------------------------------------------------------------
# Registry and configuration checks.

_SMOOTHING_HALF_OPEN = ("[0, 0.5)", lambda eps: 0.0 <= eps < 0.5)
_SMOOTHING_EXO = ("(0, 1)", lambda eps: 0.0 < eps < 1.0)


class _LossSpec(NamedTuple):
    fn: Callable[[_Batch], Tensor]
    uses_reference: bool = True
    uses_lengths: bool = False
    # (valid range as text, predicate) if the loss uses label_smoothing, else None
    smoothing: tuple[str, Callable[[float], bool]] | None = None
    # accepts a non-default f_divergence_type (TRL: losses built on the reward difference Delta)
    f_divergence: bool = False
    params: tuple[str, ...] = ()  # loss-specific entries of **params


_SPECS: dict[str, _LossSpec] = {
    "sigmoid": _LossSpec(_sigmoid, smoothing=_SMOOTHING_HALF_OPEN, f_divergence=True),
    "hinge": _LossSpec(_hinge, f_divergence=True),
    "ipo": _LossSpec(_ipo, uses_lengths=True, f_divergence=True),
    "exo_pair": _LossSpec(_exo_pair, smoothing=_SMOOTHING_EXO, f_divergence=True),
    "nca_pair": _LossSpec(_nca_pair),
    "robust": _LossSpec(_robust, smoothing=_SMOOTHING_HALF_OPEN, f_divergence=True),
    "bco_pair": _LossSpec(_bco_pair, params=("bco_delta",)),
    "sppo_hard": _LossSpec(_sppo_hard),
    "aot": _LossSpec(_aot, smoothing=_SMOOTHING_HALF_OPEN),
    "aot_unpaired": _LossSpec(_aot_unpaired, smoothing=_SMOOTHING_HALF_OPEN),
    "apo_zero": _LossSpec(_apo_zero),
    "apo_down": _LossSpec(_apo_down),
    "discopop": _LossSpec(_discopop, f_divergence=True, params=("discopop_tau",)),
    "sft": _LossSpec(_sft, uses_reference=False, uses_lengths=True, f_divergence=True),
    "sigmoid_norm": _LossSpec(_sigmoid_norm, uses_lengths=True, f_divergence=True),
    "simpo": _LossSpec(_simpo, uses_reference=False, uses_lengths=True, smoothing=_SMOOTHING_HALF_OPEN,
                       params=("gamma",)),
}

LOSS_TYPES: tuple[str, ...] = tuple(_SPECS)
F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Every loss-specific parameter accepted through **params, with its default.
LOSS_PARAMS: dict[str, object] = {
    "f_divergence_type": "reverse_kl",  # TRL DPOConfig.f_divergence_type
    "alpha": 0.5,  # TRL DPOConfig.f_alpha_divergence_coef, for alpha_divergence only
    "discopop_tau": 0.05,  # TRL DPOConfig.discopop_tau
    "gamma": 0.5,  # TRL CPOConfig.simpo_gamma
    "bco_delta": 0.0,  # reward shift of bco_pair (see _bco_pair)
}
_ALPHA_ONE_TOLERANCE = 1e-6  # TRL: alpha_divergence with |alpha - 1| below this is reverse_kl
_ALPHA_EXPONENT_MAX = 80.0  # TRL clamps (alpha - 1) * rho at 80 so exp() stays finite in fp32


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_loss_types(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} or a non-empty list of them, got {loss_type!r}")
    for t in types:
        if t not in _SPECS:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES} (or a list of them), got {t!r}")
    if "simpo" in types and not set(types) <= {"simpo", "sft"}:
        raise ValueError(
            f"loss_type 'simpo' has no reference model and can only be combined with 'sft', got {list(types)}"
        )
    return types


def _check_loss_weights(loss_weights: Sequence[float] | None, types: tuple[str, ...]) -> tuple[float, ...]:
    if loss_weights is None:
        return (1.0,) * len(types)
    weights = tuple(loss_weights)
    if len(weights) != len(types):
        raise ValueError(
            f"loss_weights must have one weight per loss_type: expected {len(types)} for {list(types)}, "
            f"got {len(weights)}"
        )
    for k, w in enumerate(weights):
        check_real(f"loss_weights[{k}]", w)
    return tuple(float(w) for w in weights)


def _check_label_smoothing(label_smoothing: float, types: tuple[str, ...]) -> None:
    check_real("label_smoothing", label_smoothing)
    users = [t for t in types if _SPECS[t].smoothing is not None]
    if not users and label_smoothing != 0:
        smoothing_types = [t for t in LOSS_TYPES if _SPECS[t].smoothing is not None]
        raise ValueError(
            f"label_smoothing must be 0.0 for loss_type {list(types)}, which does not use it (it is used by "
            f"{smoothing_types}), got {label_smoothing}"
        )
    for t in users:
        valid_range, is_valid = _SPECS[t].smoothing
        if not is_valid(label_smoothing):
            raise ValueError(f"label_smoothing must lie in {valid_range} for loss_type {t!r}, got {label_smoothing}")


def _check_params(params: dict[str, object], types: tuple[str, ...]) -> dict[str, object]:
    unknown = sorted(set(params) - set(LOSS_PARAMS))
    if unknown:
        raise ValueError(f"unknown loss parameter(s) {unknown}; expected some of {list(LOSS_PARAMS)}")
    resolved = {**LOSS_PARAMS, **params}

    f_div = resolved["f_divergence_type"]
    if f_div not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCE_TYPES}, got {f_div!r}")
    if f_div != "reverse_kl":
        unsupported = [t for t in types if not _SPECS[t].f_divergence]
        if unsupported:
            supported = [t for t in LOSS_TYPES if _SPECS[t].f_divergence]
            raise ValueError(
                f"f_divergence_type={f_div!r} is only supported for loss_type in {supported}; "
                f"expected 'reverse_kl' with {unsupported}"
            )

    used = {"f_divergence_type"} | {p for t in types for p in _SPECS[t].params}
    if f_div == "alpha_divergence":
        used.add("alpha")
    for name in params:
        if name not in used:
            raise ValueError(
                f"loss parameter {name!r} is not used by loss_type {list(types)} with f_divergence_type={f_div!r}"
            )

    check_real("alpha", resolved["alpha"])
    check_real("gamma", resolved["gamma"])
    check_real("discopop_tau", resolved["discopop_tau"], positive=True)
    delta = resolved["bco_delta"]
    if not (_is_real(delta) or (isinstance(delta, Tensor) and delta.ndim == 0 and delta.is_floating_point())):
        raise ValueError(f"bco_delta must be a finite real number or a 0-d floating tensor, got {delta!r}")
    return resolved


def check_loss_config(
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    **params: object,
) -> LossConfig:
    """Validate a loss configuration (the keyword arguments of `preference_loss`).

    Raises ValueError (TypeError for a value of the wrong type) naming the offending argument and what
    was expected. The rules:
      - beta: a finite number > 0 (TypeError for a str or bool, as for every numeric option).
      - loss_type: a name in LOSS_TYPES or a non-empty list of them; 'simpo' only with 'sft'.
      - loss_weights: None (all 1.0) or one finite number per loss type.
      - label_smoothing: must lie in [0, 0.5) for sigmoid, robust, aot, aot_unpaired and simpo,
        in (0, 1) for exo_pair (which needs it > 0, as in TRL). When none of the loss types uses
        it, it must be 0.0: a value that would be silently ignored is rejected instead.
      - params: names from LOSS_PARAMS only, and only those the chosen losses use (alpha only with
        f_divergence_type='alpha_divergence'); a non-default f_divergence_type only for the loss
        types TRL allows it with; discopop_tau > 0.

    The returned LossConfig tells whether reference log-probs and lengths will be needed.
    """
    check_real("beta", beta, positive=True)
    types = _check_loss_types(loss_type)
    weights = _check_loss_weights(loss_weights, types)
    _check_label_smoothing(label_smoothing, types)
    resolved = _check_params(params, types)
    check_bool("reference_free", reference_free)
    needs_reference = not reference_free and any(_SPECS[t].uses_reference for t in types)
    needs_lengths = any(_SPECS[t].uses_lengths for t in types)
    return LossConfig(types, weights, needs_reference, needs_lengths, resolved)


# ----------------------------------------------------------------------------------------------
# Tensor checks and the entry point.


def _check_logps(name: str, value: object, shape: torch.Size | None = None) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape [B], got {value!r:.80}")
    if value.ndim != 1 or (shape is not None and value.shape != shape):
        expected = "[B]" if shape is None else f"{list(shape)} (the shape of chosen_logps)"
        raise ValueError(f"{name} must have shape {expected}, got {list(value.shape)}")
    return value


def _check_lengths(name: str, value: object, shape: torch.Size, loss_types: tuple[str, ...]) -> Tensor:
    if value is None:
        users = [t for t in loss_types if _SPECS[t].uses_lengths]
        raise ValueError(f"{name} (token counts, integer tensor [B]) is required for loss_type {users}")
    if not isinstance(value, Tensor) or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of token counts, got {value!r:.80}")
    if value.shape != shape:
        raise ValueError(f"{name} must have shape {list(shape)} (the shape of chosen_logps), got {list(value.shape)}")
    return value


def _f_divergence_scores(logratios: Tensor, f_divergence_type: str, alpha: float) -> Tensor:
    """s = f'(exp(rho)) for the f-divergence (see the module docstring)."""
    if f_divergence_type == "forward_kl":
        return -torch.expm1(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence" and abs(alpha - 1) >= _ALPHA_ONE_TOLERANCE:
        return torch.expm1(((alpha - 1) * logratios).clamp(max=_ALPHA_EXPONENT_MAX)) / (alpha - 1)
    return logratios


def preference_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    **params: object,
) -> LossTerms:
    """Per-pair preference losses for B (chosen, rejected) pairs, with TRL 1.16's formulas.

    Args:
        chosen_logps, rejected_logps: [B] summed policy log-probs (differentiable).
        ref_chosen_logps, ref_rejected_logps: [B] summed reference log-probs. Required when a loss
            needs them (all but 'sft' and 'simpo') unless reference_free; when given they are
            also used for the rewards. Never differentiated (detached).
        chosen_lengths, rejected_lengths: [B] integer counts of scored tokens; required by 'ipo',
            'sigmoid_norm', 'simpo' and 'sft'. A count of 0 is treated as 1 (no NaN).
        beta: > 0; the temperature (DPO), regulariser tau (IPO) or reward scale (SimPO).
        loss_type: a name from LOSS_TYPES, or a list of names combined with loss_weights
            (default all 1.0): losses = sum_k loss_weights[k] * loss_k.
        label_smoothing: eps of the losses that use it (see check_loss_config for the ranges).
        reference_free: treat the reference log-probs as 0 (given ones are ignored).
        **params: loss-specific parameters, see LOSS_PARAMS: f_divergence_type, alpha,
            discopop_tau, gamma (SimPO margin), bco_delta.

    Returns:
        LossTerms(losses [B], chosen_rewards [B], rejected_rewards [B]). Computed in float32, or
        in float64 if an input is float64; the rewards are detached. NaN/inf inputs propagate.

    Raises:
        ValueError: for a bad configuration (see check_loss_config) or bad tensors (wrong
            dtype or shape, a missing reference or length tensor), naming the argument.
    """
    config = check_loss_config(
        beta=beta, loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing,
        reference_free=reference_free, **params,
    )
    chosen_logps = _check_logps("chosen_logps", chosen_logps)
    shape = chosen_logps.shape
    rejected_logps = _check_logps("rejected_logps", rejected_logps, shape)
    dtype = torch.promote_types(torch.promote_types(chosen_logps.dtype, rejected_logps.dtype), torch.float32)
    chosen, rejected = chosen_logps.to(dtype), rejected_logps.to(dtype)

    use_reference = not reference_free and "simpo" not in config.loss_types
    refs = []
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if ref is None and config.needs_reference:
            raise ValueError(f"{name} is required for loss_type {list(config.loss_types)} unless reference_free=True")
        if ref is None or not use_reference:
            refs.append(torch.zeros_like(chosen))
        else:
            refs.append(_check_logps(name, ref, shape).detach().to(dtype))
    ref_chosen, ref_rejected = refs

    lengths = [None, None]
    if config.needs_lengths:
        lengths = [
            _check_lengths(name, value, shape, config.loss_types).to(dtype)
            for name, value in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths))
        ]

    f_div, alpha = config.params["f_divergence_type"], config.params["alpha"]
    batch = _Batch(
        chosen_logps=chosen,
        rejected_logps=rejected,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_lengths=lengths[0],
        rejected_lengths=lengths[1],
        chosen_scores=_f_divergence_scores(chosen - ref_chosen, f_div, alpha),
        rejected_scores=_f_divergence_scores(rejected - ref_rejected, f_div, alpha),
        beta=float(beta),
        label_smoothing=float(label_smoothing),
        params=config.params,
    )
    losses = sum(w * _SPECS[t].fn(batch) for t, w in zip(config.loss_types, config.loss_weights))

    if "simpo" in config.loss_types:
        chosen_rewards = beta * _per_token(chosen, batch.chosen_lengths)
        rejected_rewards = beta * _per_token(rejected, batch.rejected_lengths)
    else:
        chosen_rewards = beta * batch.chosen_logratios
        rejected_rewards = beta * batch.rejected_logratios
    return LossTerms(losses, chosen_rewards.detach(), rejected_rewards.detach())
