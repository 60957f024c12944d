"""Test session setup: Triton kernels run through the interpreter on CPU tensors.

On a machine with a GPU, run with TRITON_INTERPRET=0 to exercise the compiled kernels instead.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
