"""Pure Triton kernels and their launchers (no autograd, no models).

Installed as `fastdpo.kernels`. Every launcher has a PyTorch twin of the same name and signature in
`fastdpo.torch_ops`.
"""
from .linear_logps import linear_logps_backward, linear_logps_forward
from .segment_sum import segment_sum
from .sequence_logps import row_logps_backward, row_logps_forward

__all__ = ["row_logps_forward", "row_logps_backward", "segment_sum", "linear_logps_forward",
           "linear_logps_backward"]
