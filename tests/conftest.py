"""Test session setup: the device the float64-referenced tests run on, and the Triton interpreter on CPU.

FASTDPO_TEST_DEVICE=cpu (default): Triton kernels run through the interpreter (TRITON_INTERPRET=1) on CPU
tensors. FASTDPO_TEST_DEVICE=cuda: the tests that take the `device` fixture run compiled on CUDA tensors.
"""
import os

TEST_DEVICE = os.environ.get("FASTDPO_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"FASTDPO_TEST_DEVICE must be 'cpu' or 'cuda', got {TEST_DEVICE!r}")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402

if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("FASTDPO_TEST_DEVICE=cuda but torch sees no CUDA device")


@pytest.fixture
def device():
    """The torch.device of FASTDPO_TEST_DEVICE (build inputs on CPU with a seeded generator, then move)."""
    return torch.device(TEST_DEVICE)


def interpreter_bf16_fixes():
    """Work around two Triton 3.9 interpreter bugs with bf16, matching what a GPU does. Returns
    {InterpreterBuilder attribute: replacement}; the kernels themselves are unchanged.
    - tl.dot keeps bf16 as raw uint16 bits and multiplies those integers: widen bf16 operands to fp32
      exactly (bits << 16); products of bf16 values are exact in fp32, as on tensor cores.
    - fp32 -> bf16 casts truncate: round to nearest even, as the GPU's cvt.rn.bf16.f32 (and torch) do.
    (scripts/gpu_check.py --smoke installs them too.)"""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    create_dot, cast_impl = builder.create_dot, builder.cast_impl

    def widen(x):
        if x.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    def cast_rounding_to_nearest_even(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast_impl(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        rounded[np.isnan(src.data)] = 0x7FC0
        return interpreter.TensorHandle(rounded, tl.bfloat16)

    return {"create_dot": lambda self, a, b, d, *args: create_dot(self, widen(a), widen(b), d, *args),
            "cast_impl": cast_rounding_to_nearest_even}


@pytest.fixture(autouse=True)
def _interpreter_bf16(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    for name, replacement in interpreter_bf16_fixes().items():
        monkeypatch.setattr(interpreter.InterpreterBuilder, name, replacement)
