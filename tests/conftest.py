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


def interpreter_create_dot_widening_bf16():
    """Work around a Triton 3.9 interpreter bug: it keeps bf16 as raw uint16 bits and tl.dot multiplies
    those integers. Returns a replacement for InterpreterBuilder.create_dot that widens bf16 operands to
    fp32 exactly (bits << 16): products of bf16 values are exact in fp32, as on tensor cores. The kernels
    themselves are unchanged. (scripts/gpu_check.py --smoke installs it too.)"""
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    return lambda self, a, b, d, *args: create_dot(self, widen(a), widen(b), d, *args)


@pytest.fixture(autouse=True)
def _interpreter_bf16_dot(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", interpreter_create_dot_widening_bf16())
