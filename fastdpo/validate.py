"""Argument checks shared by the public entry points.

Rule: TypeError when an argument is not of an accepted Python type (a str or bool where a number is
expected, a list where a tensor is expected), ValueError when the type is right but the value is not
(a range, a tensor dtype, shape or device). Every message names the argument and what was expected.
"""
import math
import numbers

import torch


def require(condition, message):
    """Raise ValueError(message) unless condition."""
    if not condition:
        raise ValueError(message)


def _describe(value):
    return f"{type(value).__name__} {value!r:.60}"


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")


def check_choice(name, value, choices):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {_describe(value)}")
    require(value in choices, f"{name} must be one of {choices}, got {value!r}")


def check_int(name, value, *, minimum=None, optional=False):
    """An int (or numpy integer), not a bool, >= minimum when given; None allowed if optional."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {_describe(value)}")
    require(minimum is None or value >= minimum, f"{name} must be an int >= {minimum}, got {value}")


def check_real(name, value, *, positive=False, optional=False):
    """A finite real number (int or float, not a bool), > 0 if positive; None allowed if optional."""
    if optional and value is None:
        return
    kind = "a positive finite number" if positive else "a finite number"
    if optional:
        kind += " or None"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {kind}, got {_describe(value)}")
    require(math.isfinite(value) and (value > 0 or not positive), f"{name} must be {kind}, got {value!r}")


def check_tensor(name, value, *, dtypes=None, floating=False, optional=False):
    """A torch.Tensor (TypeError otherwise) with a dtype in `dtypes` / floating point (ValueError)."""
    if optional and value is None:
        return
    if floating:
        expected = "a floating-point tensor"
    elif dtypes:
        expected = "an " + " or ".join(str(d).replace("torch.", "") for d in dtypes) + " tensor"
    else:
        expected = "a tensor"
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    require(not floating or value.is_floating_point(), f"{name} must be {expected}, got {value.dtype}")
    require(not dtypes or value.dtype in dtypes, f"{name} must be {expected}, got {value.dtype}")


def check_same_device(**tensors):
    """All given tensors (None entries skipped) on one device; the message names the first mismatch."""
    given = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = given[0]
    for name, tensor in given[1:]:
        require(tensor.device == first.device,
                f"{name} is on {tensor.device} but {first_name} is on {first.device}: "
                f"all tensors of one call must be on the same device")
