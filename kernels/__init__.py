"""Pure Triton kernels and their launchers (no autograd, no models).

Installed as `fastdpo.kernels`. Every launcher has a PyTorch twin of the same name and signature in
`fastdpo.torch_ops`.

The top-level name `kernels` belongs to Hugging Face's package, which transformers imports. When Python runs
in the repository root, this folder would shadow it; imported under that name, it hands the import over to the
installed `kernels` distribution (or raises ModuleNotFoundError when there is none) instead.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _load_installed_kernels():
        """Import the `kernels` package found on sys.path outside this repository and put it in sys.modules."""
        repository = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
        elsewhere = [entry for entry in sys.path
                     if os.path.realpath(entry or os.getcwd()) != repository]
        spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
        if spec is None:
            raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ folder is "
                                      "fastdpo.kernels, not a top-level package)", name="kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["kernels"]
            raise

    _load_installed_kernels()
else:
    from .linear_logps import linear_logps_backward, linear_logps_forward
    from .segment_sum import segment_sum
    from .sequence_logps import row_logps_backward, row_logps_forward

    __all__ = ["row_logps_forward", "row_logps_backward", "segment_sum", "linear_logps_forward",
               "linear_logps_backward"]
