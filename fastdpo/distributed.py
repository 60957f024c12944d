"""The engines around a Hugging Face causal LM, as the model path meets them: wrappers to see through, the
vocabulary-parallel LM head (`shard_lm_head`), and the LM head's parameters when FSDP2 shards them.

The model path reads the head's weight after the model's forward. Under FSDP2 the head's group may have
resharded it by then (the head in its own `fully_shard` group, or in any non-root group, with
reshard_after_forward=True): the weight is a `DTensor` shard and `head_parameter` all-gathers it. Its
backward reduce-scatters the full gradient and averages it over the data-parallel ranks, which is what
FSDP2's own reduce-scatter would have done (DTensor's `full_tensor()` backward keeps only the local rows of
this rank's gradient: each rank would keep its own, unaveraged head gradient).
"""
import torch

from .parallel import is_vocab_sharded
from .validate import require

__all__ = ["unwrap_causal_lm", "shard_lm_head", "is_vocab_parallel_head", "check_head_parameters", "head_parameter"]


def inner_module(module: torch.nn.Module) -> torch.nn.Module | None:
    """The module a wrapper runs: torch.compile's `_orig_mod`, DDP / DataParallel / DeepSpeed's `.module`."""
    for name in ("_orig_mod", "module"):
        inner = getattr(module, name, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return None


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside `model`'s wrappers (torch.compile, DDP, DeepSpeed, PEFT's
    `get_base_model()`). Only for reading config and modules: the forward is `model`'s own."""
    lm = model
    while True:
        if callable(getattr(lm, "get_base_model", None)):  # PEFT PeftModel
            lm = lm.get_base_model()
        elif inner_module(lm) is not None:
            lm = inner_module(lm)
        else:
            break
    if not hasattr(lm, "get_output_embeddings"):
        raise ValueError(f"{type(model).__name__} is not a Hugging Face causal LM (no get_output_embeddings())")
    return lm


def _fsdp2_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return None
    return FSDPModule


def _fsdp2_groups_around(model: torch.nn.Module, module: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 modules (fully_shard) among `module` and its ancestors inside `model`."""
    fsdp_module = _fsdp2_module_type()
    if fsdp_module is None:
        return []
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            parts = name.split(".") if name else []
            path = [model] + [model.get_submodule(".".join(parts[:k])) for k in range(1, len(parts) + 1)]
            return [m for m in path if isinstance(m, fsdp_module)]
    return []


def shard_lm_head(model, mesh):
    """Shard a Hugging Face causal LM's output layer along the vocabulary on the 1-D `mesh`, in place.

    The lm_head becomes a ColwiseParallel module: its weight (and bias) are DTensor parameters with
    placements (Shard(0),), which fastdpo.loss / fastdpo.model.model_loss route to the vocabulary-parallel
    head; the model's own forward still returns full logits (gathered). The rest of the model is untouched
    (replicated: every rank must run it on the same batch). Tied input/output embeddings are refused, and
    so is a model that FSDP2 already shards (shard the head first, on the vocabulary dimension of a 2-D
    mesh). Returns `model`.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    lm = unwrap_causal_lm(model)
    head, embedding = lm.get_output_embeddings(), lm.get_input_embeddings()
    require(embedding is None or head.weight is not embedding.weight,
            "the output embedding is tied to the input embedding (tie_word_embeddings=True); sharding it would "
            "shard the input embedding too: untie it first")
    require(not _fsdp2_groups_around(model, head),
            "shard_lm_head after fully_shard is not supported: call shard_lm_head first, on the vocabulary "
            "dimension of a 2-D (data-parallel x vocabulary) mesh, then fully_shard on the data-parallel one")
    name = next(name for name, module in lm.named_modules() if module is head)
    parallelize_module(lm, mesh, {name: ColwiseParallel(output_layouts=Replicate())})
    head.fastdpo_vocab_parallel = True
    return model


def is_vocab_parallel_head(module):
    """True for an output layer sharded by shard_lm_head: read its DTensor weight as is (never full_tensor():
    that would gather V x D on every rank, which the vocabulary-parallel head exists to avoid)."""
    return getattr(module, "fastdpo_vocab_parallel", False)


class _GatherDataParallelShards(torch.autograd.Function):
    """An FSDP2-sharded parameter (DTensor) -> its full value (plain tensor). Backward: every rank's gradient of
    the full value summed (reduce-scatter; all-reduce over replicated mesh dimensions) and divided by the
    number of ranks, as this rank's shard: FSDP2's own gradient reduction."""

    @staticmethod
    def forward(ctx, param):
        ctx.mesh, ctx.placements = param.device_mesh, param.placements
        return param.full_tensor()

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor, Partial

        summed = DTensor.from_local(grad.contiguous(), ctx.mesh, [Partial("sum")] * ctx.mesh.ndim, run_check=False)
        return summed.redistribute(ctx.mesh, ctx.placements) / ctx.mesh.size()


def check_head_parameters(model: torch.nn.Module, head: torch.nn.Module) -> None:
    """Raise, before `model`'s forward, if the loss could not read `head`'s parameters correctly after it
    (see head_parameter)."""
    for name in ("weight", "bias"):
        _is_fsdp2_shard(model, head, name)


def _is_fsdp2_shard(model, head, name) -> bool:
    """True for an FSDP2 shard (DTensor) of `head`'s parameter `name`; False for a plain tensor or a
    vocabulary-parallel head; raises for what the loss cannot read."""
    param = getattr(head, name, None)
    if param is None or is_vocab_parallel_head(head):
        return False
    if getattr(param, "ds_id", None) is not None:
        raise NotImplementedError("DeepSpeed ZeRO-3 partitions the LM head weight, which the fused LM-head loss "
                                  "reads outside the head's forward; use ZeRO-1/2 or FSDP2")
    if not is_vocab_sharded(param):  # a plain tensor
        return False
    from torch.distributed.tensor import Replicate, Shard

    require(bool(_fsdp2_groups_around(model, head)),
            f"the LM head's {name} is a DTensor ({param.placements}) but neither FSDP2 (fully_shard) nor "
            f"fastdpo.distributed.shard_lm_head manages it: shard the head with shard_lm_head (vocabulary "
            f"parallel) or fully_shard the model")
    require(all(p == Shard(0) or isinstance(p, Replicate) for p in param.placements),
            f"the LM head's {name} is FSDP2-sharded with placements {param.placements}; supported: Shard(0) on "
            f"the data-parallel mesh (HSDP: Replicate(), Shard(0))")
    return True


def head_parameter(model: torch.nn.Module, head: torch.nn.Module, name: str) -> torch.Tensor | None:
    """`head`'s parameter `name` ("weight" or "bias"), read after `model`'s forward, as the loss uses it.

    A plain tensor (DDP, FSDP2 with the head's group unsharded, no engine) as is; a vocabulary-parallel head's
    DTensor shard as is; an FSDP2 shard all-gathered, its gradient reduced as FSDP2 reduces it (module
    docstring). DeepSpeed ZeRO-3's partitioned parameters are refused; other DTensor layouts too.
    """
    param = getattr(head, name, None)
    return _GatherDataParallelShards.apply(param) if _is_fsdp2_shard(model, head, name) else param
