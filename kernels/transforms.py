"""Logit transforms shared by every kernel: z = softcap(logit_scale * x) / temperature.

softcap(y) = c * tanh(y / c) (Gemma 2's final soft-capping); without softcap z = logit_scale * x /
temperature. Device helpers work on fp32 tiles; `transform_scalars` validates and packs the options
for a launch.
"""
import math
import numbers

import triton
import triton.language as tl

FP32_PRECISIONS = ("ieee", "tf32")


@triton.jit
def _tanh_parts(u):
    """(tanh(u), 1 - tanh(u)^2) in fp32 from e = exp(-2|u|) <= 1: no overflow, no inf/inf, saturates to
    +-1 / 0 at large |u|, NaN stays NaN. tanh has absolute error ~2e-7; 1 - tanh^2 = 4e / (1 + e)^2 keeps
    full relative accuracy where tanh saturates (no 1 - t*t cancellation)."""
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0.0, -t, t), 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def transformed_logits(x, logit_scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """z for raw fp32 logits x (any shape)."""
    y = x * logit_scale
    if HAS_SOFTCAP:
        t, _ = _tanh_parts(y / softcap)
        return t * (softcap * inv_temp)
    return y * inv_temp


@triton.jit
def transformed_logits_and_slope(x, logit_scale, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """(z, dz/dx) for raw fp32 logits x: dz/dx = logit_scale / temperature (* 1 - tanh^2 with softcap)."""
    y = x * logit_scale
    if HAS_SOFTCAP:
        t, sech2 = _tanh_parts(y / softcap)
        return t * (softcap * inv_temp), sech2 * (logit_scale * inv_temp)
    return y * inv_temp, tl.zeros_like(x) + logit_scale * inv_temp  # a tile either way (compiled returns)


def transform_scalars(logit_scale, softcap, temperature):
    """Validated kernel scalars (logit_scale, softcap (1.0 when None), 1 / temperature) as floats.

    Raises ValueError naming the option: logit_scale must be finite, softcap None or finite > 0,
    temperature finite > 0.
    """
    for name, value in (("logit_scale", logit_scale), ("softcap", softcap), ("temperature", temperature)):
        if value is None and name == "softcap":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return float(logit_scale), 1.0 if softcap is None else float(softcap), 1.0 / float(temperature)


def check_fp32_precision(fp32_precision):
    """Refuse anything but "ieee" (exact fp32 products) or "tf32" (TF32 tensor cores allowed)."""
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    return fp32_precision
