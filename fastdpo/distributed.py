"""The engines around a Hugging Face causal LM, as the model path meets them: wrappers to see through
(`unwrap_causal_lm`), the vocabulary-parallel LM head of a causal LM (`shard_lm_head`; the op itself,
fastdpo/parallel.py, knows no models), and the LM head's parameters as the loss reads them after the
model's forward (`HeadParameters`: FSDP2 shards, DeepSpeed ZeRO-3 partitions).

Under FSDP2 the head's group may have resharded the head by the time the loss reads it (the head in its own
`fully_shard` group with reshard_after_forward=True): the weight is a `DTensor` shard, all-gathered here by
an autograd function whose backward reduce-scatters the full gradient and averages it over the
data-parallel ranks, which is what FSDP2's own reduce-scatter would have done (DTensor's `full_tensor()`
backward keeps only the local rows of this rank's gradient: each rank would keep its own, unaveraged head
gradient). Under ZeRO-3 the weight is taken inside the head's forward (see HeadParameters).
"""
import sys

import torch

from .parallel import is_vocab_sharded
from .validate import require

__all__ = ["unwrap_causal_lm", "shard_lm_head", "is_vocab_parallel_head", "HeadParameters", "parameter_rows"]


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
    """torch's FSDPModule, or None while torch.distributed.fsdp is not imported (then no module is one: that
    import is never forced here)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return getattr(fsdp, "FSDPModule", None)


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
    mesh; torch's `fully_shard` itself fails on a head sharded on the same 1-D mesh). Returns `model`.
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


def _is_zero3_partitioned(param) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 partitions (whole only inside its module's forward)."""
    return getattr(param, "ds_id", None) is not None


def _is_fsdp2_shard(model, head, name) -> bool:
    """True for an FSDP2 shard (DTensor) of `head`'s parameter `name`; False for a plain tensor, a
    vocabulary-parallel head or a ZeRO-3 parameter; raises for a DTensor the loss cannot read."""
    param = getattr(head, name, None)
    if param is None or is_vocab_parallel_head(head) or not is_vocab_sharded(param):
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


def _check_fsdp2_grouping(model, head) -> None:
    """Refuse a head inside a non-root FSDP2 group of other modules that reshards after its forward: that
    forward ends before the loss reads the head's input, so the group's other parameters (the final norm)
    would be freed for the backward, whose pre-backward hook (on the group's unused logits) never fires."""
    groups = _fsdp2_groups_around(model, head)
    if not groups or groups[-1] is head:  # no FSDP2, or the head's own group (also [embed_tokens, lm_head])
        return
    try:  # torch's FSDP2 state (private): whether the group is the root, whether it reshards after forward
        state = groups[-1]._get_fsdp_state()
        resharded = any(group._reshard_after_forward for group in state._fsdp_param_groups)
        non_root = state._is_root is False  # None before the first forward: it will be the root
    except AttributeError:  # another torch version: nothing to check against
        return
    require(not (resharded and non_root),
            f"the LM head is in a non-root FSDP2 group ({type(groups[-1]).__name__}) with other modules that "
            f"reshards after its forward, which ends before the loss reads the head: those modules' parameters "
            f"would be freed for the backward. Give the LM head its own fully_shard group, keep it in the root "
            f"group, or pass reshard_after_forward=False for that group")


class HeadParameters:
    """The LM head's weight and bias as the fused loss reads them after the model's forward, whatever engine
    holds them. Checks at construction (before the forward) that they can be read; use as a context
    manager around the model's forward, then `read(head)` -> (weight, bias).

    * plain tensors (no engine, DDP, ZeRO-1/2, FSDP2 with the head's group still unsharded): as they are;
    * a vocabulary-parallel head (shard_lm_head): its DTensor shards, for the vocabulary-parallel op;
    * FSDP2 shards (the head's group resharded after its forward): all-gathered, gradient reduced as FSDP2
      reduces it (module docstring);
    * DeepSpeed ZeRO-3 partitions: taken while ZeRO-3 holds them gathered for the head's forward. The head
      returns them as its output, so ZeRO-3's module hooks see them as what the head computed: the gathered
      buffer stays alive (no copy) until the loss's backward has used it, ZeRO-3 gathers the head again for
      that backward and reduces its gradient into the partitioned gradient, once per backward. The model
      continues with the head's real (empty) output.
    """

    def __init__(self, model: torch.nn.Module, heads: list[torch.nn.Module]):
        self.model, self.heads, self.handles, self.taken = model, heads, [], {}
        self.zero3 = [head for head in heads
                      if any(_is_zero3_partitioned(getattr(head, n, None)) for n in ("weight", "bias"))]
        for head in heads:
            _check_fsdp2_grouping(model, head)
            for name in ("weight", "bias"):
                _is_fsdp2_shard(model, head, name)  # raises for what cannot be read

    def __enter__(self):
        for head in self.zero3:
            held = []

            def hand_out(module, args, output, held=held):  # before ZeRO-3's post-forward hooks
                held.append(output)
                return tuple(getattr(module, n).view_as(getattr(module, n)) for n in ("weight", "bias")
                             if getattr(module, n, None) is not None)

            def take(module, args, output, held=held):  # after them: what ZeRO-3 wrapped
                self.taken[module] = output
                return held.pop()

            self.handles += [head.register_forward_hook(hand_out, prepend=True), head.register_forward_hook(take)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def read(self, head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of `head` (one of the heads given, after the model's forward)."""
        if head in self.zero3:
            weight, *bias = self.taken[head]
            return weight, (bias[0] if bias else None)
        return tuple(_GatherDataParallelShards.apply(getattr(head, n)) if _is_fsdp2_shard(self.model, head, n)
                     else getattr(head, n, None) for n in ("weight", "bias"))


def parameter_rows(param: torch.Tensor) -> int:
    """Rows of a parameter, also while DeepSpeed ZeRO-3 holds it partitioned (then its shape is empty)."""
    return (param.ds_shape if _is_zero3_partitioned(param) else param.shape)[0]
