"""Test session setup: Triton kernels run through the interpreter on CPU tensors.

On a machine with a GPU, run with TRITON_INTERPRET=0 to exercise the compiled kernels instead.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import triton.language as tl  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter_bf16_dot(monkeypatch):
    """Work around a Triton 3.9 interpreter bug: it keeps bf16 as raw uint16 bits and tl.dot multiplies
    those integers. Widen bf16 dot operands to fp32 exactly (bits << 16): products of bf16 values are
    exact in fp32, as on tensor cores. The kernels themselves are unchanged."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, a, b, d, *args: create_dot(self, widen(a), widen(b), d, *args))
