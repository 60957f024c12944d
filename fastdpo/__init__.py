from fastdpo.kernels import __doc__ as k
