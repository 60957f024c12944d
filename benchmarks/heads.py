"""Loss-head micro-benchmark: configurations, inputs and the implementation registry.

One *DPO loss step* = policy LM head forward + backward, reference LM head forward under no_grad,
sigmoid DPO loss with beta 0.1. Every implementation receives the same `HeadInputs` (hidden states
before the LM head, the two head weights, Hugging Face style unshifted labels with -100 on the
prompt) and returns a zero-argument `step()` that runs one full step (backward included) and returns
the detached loss.

Implementations register themselves with `@register(...)`: fastdpo (`fastdpo`: the default call, head_mode
"auto"; `fastdpo_stored` / `_recompute` / `_fused`: `fastdpo.loss(head_mode=...)`; `fastdpo_logits`: on
materialised logits) and the plain baseline here, the peers (TRL,
Liger-Kernel, torch's linear_cross_entropy, Cut Cross-Entropy) in benchmarks/peers.py, whose `all_impls()`
returns the complete registry.
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import fastdpo
from fastdpo import torch_ops

BETA = 0.1
IGNORE_INDEX = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------------
# configurations
@dataclass(frozen=True)
class HeadConfig:
    name: str
    pairs: int  # B: the batch holds 2B sequences (B chosen, then B rejected)
    seq_len: int  # tokens per sequence (prompt + completion)
    prompt_len: int  # prompt tokens per sequence (labels -100)
    vocab: int
    hidden: int = 256

    @property
    def sequences(self) -> int:
        return 2 * self.pairs

    @property
    def tokens(self) -> int:
        """Tokens through the LM head when every position is scored."""
        return self.sequences * self.seq_len

    @property
    def completion_tokens(self) -> int:
        """Positions with a target (what fastdpo scores): labels[t + 1] != -100."""
        return self.sequences * (self.seq_len - self.prompt_len)

    def describe(self) -> str:
        return (f"{self.pairs} pair{'s' if self.pairs > 1 else ''} x {self.seq_len} tok "
                f"({self.prompt_len} prompt), V={self.vocab}, D={self.hidden}")

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens": self.tokens, "completion_tokens": self.completion_tokens}


# The default run (`python benchmarks/run.py`, minutes on 2 cores): one DPO head step at two vocabulary sizes,
# 1 pair x 256 tokens (128 prompt). A/B/C are the configurations of shared/peers-cpu.md; D extends the
# memory-vs-tokens chart (--full runs A-D).
HEAD_CONFIGS = {
    "h32k": HeadConfig("h32k", pairs=1, seq_len=256, prompt_len=128, vocab=32000),
    "h128k": HeadConfig("h128k", pairs=1, seq_len=256, prompt_len=128, vocab=128256),
    "A": HeadConfig("A", pairs=2, seq_len=256, prompt_len=128, vocab=32000),
    "B": HeadConfig("B", pairs=2, seq_len=256, prompt_len=128, vocab=128256),
    "C": HeadConfig("C", pairs=1, seq_len=1024, prompt_len=512, vocab=128256),
    "D": HeadConfig("D", pairs=1, seq_len=2048, prompt_len=1024, vocab=128256),
}
DEFAULT_CONFIGS = ("h32k", "h128k")
FULL_CONFIGS = ("A", "B", "C", "D")
# --device cuda adds the Llama-3-8B head (the shapes of the roofline projection)
GPU_CONFIGS = {"G": HeadConfig("G", pairs=4, seq_len=1024, prompt_len=512, vocab=128256, hidden=4096)}
# memory sweep (issue: memory must grow with tokens, not tokens x vocabulary): 1-8 pairs of 2 x 512 tokens
# (256 prompt), V = 32000 and 128256: `run.py --configs m32k-1024,...,m128k-4096 --impls fastdpo,full_logits`
SWEEP_CONFIGS = {f"m{vocab // 1000}k-{1024 * pairs}": HeadConfig(f"m{vocab // 1000}k-{1024 * pairs}", pairs=pairs,
                                                                   seq_len=512, prompt_len=256, vocab=vocab)
                 for vocab in (32000, 128256) for pairs in (1, 2, 4, 8)}
# --quick: CI smoke shapes (seconds in total)
QUICK_CONFIGS = {
    "q1": HeadConfig("q1", pairs=1, seq_len=32, prompt_len=16, vocab=512, hidden=32),
    "q2": HeadConfig("q2", pairs=2, seq_len=32, prompt_len=16, vocab=1024, hidden=32),
}


def get_config(name: str) -> HeadConfig:
    return {**HEAD_CONFIGS, **GPU_CONFIGS, **SWEEP_CONFIGS, **QUICK_CONFIGS}[name]


# --------------------------------------------------------------------------------------------------------
# inputs
@dataclass
class HeadInputs:
    hidden: torch.Tensor  # [2B, T, D], requires grad (policy)
    weight: torch.Tensor  # [V, D], requires grad (policy LM head)
    ref_hidden: torch.Tensor  # [2B, T, D]
    ref_weight: torch.Tensor  # [V, D]
    labels: torch.Tensor  # [2B, T] int64, unshifted, -100 on the prompt

    def zero_grad(self):
        self.hidden.grad = None
        self.weight.grad = None


def make_inputs(cfg: HeadConfig, dtype, device, seed: int = 0) -> HeadInputs:
    """Deterministic random inputs (same values for every implementation, generated in fp32 on the CPU
    then cast, so the float64 reference sees exactly the benchmarked values)."""
    g, cpu = torch.Generator("cpu").manual_seed(seed), torch.device("cpu")
    S, T, D, V = cfg.sequences, cfg.seq_len, cfg.hidden, cfg.vocab
    weight = torch.randn(V, D, generator=g, device=cpu) * (1.28 / D ** 0.5)  # logits ~ N(0, 1.28^2) at any D
    ref_weight = weight + 0.5 * weight.std() * torch.randn(V, D, generator=g, device=cpu)
    hidden = torch.randn(S, T, D, generator=g, device=cpu)
    ref_hidden = hidden + 0.1 * torch.randn(S, T, D, generator=g, device=cpu)
    labels = torch.randint(0, V, (S, T), generator=g, device=cpu)
    labels[:, : cfg.prompt_len] = IGNORE_INDEX

    def put(x, grad=False):
        x = x.to(device=device, dtype=dtype).contiguous()
        return x.requires_grad_(grad)

    return HeadInputs(hidden=put(hidden, True), weight=put(weight, True), ref_hidden=put(ref_hidden),
                      ref_weight=put(ref_weight), labels=labels.to(device))


# --------------------------------------------------------------------------------------------------------
# shared helpers for the implementations
def shifted(inp: HeadInputs):
    """Hidden states at positions 0..T-2 and the targets they are scored against (labels[:, 1:])."""
    return inp.hidden[:, :-1], inp.ref_hidden[:, :-1], inp.labels[:, 1:]


def masked_sequence_sum(per_token, targets):
    """Sum of per-token log-probs over the positions with a target; per_token [S, T-1] -> [S] fp32."""
    return (per_token.float() * (targets != IGNORE_INDEX)).sum(-1)


def token_logps(logits, targets):
    """log_softmax(logits) at the targets (ignored positions read class 0), in the dtype of `logits`."""
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def logits_logps(logits, targets):
    """The classic TRL path from logits [S, T-1, V]: fp32 log_softmax, gather, masked sum -> [S]."""
    return masked_sequence_sum(token_logps(logits.float(), targets), targets)


def dpo_sigmoid(policy_logps, ref_logps, beta: float = BETA):
    """TRL's sigmoid DPO loss from per-sequence log-probs [2B] (B chosen then B rejected)."""
    pc, pr = policy_logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def dpo_loss_fn(policy_logps: Callable, ref_logps: Callable) -> Callable:
    """loss() from per-sequence log-probs: policy_logps() with autograd, ref_logps() under no_grad."""

    def loss():
        policy = policy_logps()
        with torch.no_grad():
            ref = ref_logps()
        return dpo_sigmoid(policy, ref)

    return loss


def train_step(inp: HeadInputs, loss_fn: Callable):
    """Wrap a loss closure into a full training step (fresh grads, backward, detached loss)."""

    def step():
        inp.zero_grad()
        loss = loss_fn()
        loss.backward()
        return float(loss.detach())

    return step


def module_missing(module: str, pip_name: str) -> str | None:
    """The reason "not installed (<pip_name>)" when an optional package is absent, else None (no import)."""
    if importlib.util.find_spec(module) is None:
        return f"not installed ({pip_name})"
    return None


# --------------------------------------------------------------------------------------------------------
# registry
@dataclass(frozen=True)
class Impl:
    name: str
    label: str
    group: str  # "fastdpo", "baseline" or "peer"
    scores: str  # which positions go through the LM head: "completion" or "all"
    build: Callable  # (HeadInputs) -> step() -> float loss
    unavailable: Callable  # (device: str) -> reason string, or None when it can run
    roofline: str  # algorithm key in benchmarks/roofline.py
    package: str | None = None  # distribution name to report the version of


# filled by @register here and in peers.py; peers.all_impls() returns it complete
IMPLS: dict[str, Impl] = {}


def register(name, label, *, group, scores, roofline, package=None, unavailable=None):
    def deco(build):
        IMPLS[name] = Impl(name, label, group, scores, build, unavailable or (lambda device: None), roofline,
                           package)
        return build

    return deco


# --------------------------------------------------------------------------------------------------------
# fastdpo and the plain baseline
HEAD_MODES = ("stored", "recompute", "fused")  # fastdpo.loss(head_mode=...); "auto" is the default call


def _fused_loss(inp: HeadInputs, **options):
    return fastdpo.loss(hidden=inp.hidden, weight=inp.weight, ref_hidden=inp.ref_hidden, ref_weight=inp.ref_weight,
                        labels=inp.labels, beta=BETA, **options).loss


@register("fastdpo", "fastdpo (hidden, weight; head_mode='auto', the default)", group="fastdpo",
          scores="completion", roofline="fastdpo_stored")
def build_fastdpo(inp: HeadInputs):
    return train_step(inp, lambda: _fused_loss(inp))


def _register_head_mode(mode):
    @register(f"fastdpo_{mode}", f"fastdpo, head_mode='{mode}'", group="fastdpo", scores="completion",
              roofline=f"fastdpo_{mode}")
    def build(inp: HeadInputs):
        return train_step(inp, lambda: _fused_loss(inp, head_mode=mode))


for _mode in HEAD_MODES:
    _register_head_mode(_mode)


@register("fastdpo_logits", "fastdpo on materialised logits", group="fastdpo", scores="completion",
          roofline="fastdpo_logits")
def build_fastdpo_logits(inp: HeadInputs):
    def loss():
        logits = inp.hidden @ inp.weight.T  # what the model's LM head returns: every position
        with torch.no_grad():
            ref_logits = inp.ref_hidden @ inp.ref_weight.T
        return fastdpo.loss(logits=logits, ref_logits=ref_logits, labels=inp.labels, beta=BETA).loss

    return train_step(inp, loss)


@register("full_logits", "full logits, fp32 log_softmax + gather (baseline)", group="baseline", scores="all",
          roofline="full_logits")
def build_full_logits(inp: HeadInputs):
    h, rh, tgt = shifted(inp)
    return train_step(inp, dpo_loss_fn(lambda: logits_logps(h @ inp.weight.T, tgt),
                                       lambda: logits_logps(rh @ inp.ref_weight.T, tgt)))


def reference_losses(inp: HeadInputs) -> dict:
    """float64 loss on the same inputs (accuracy column; not timed), and the same float64 per-token log-probs
    rounded to fp32 and summed per sequence by fastdpo's segment_sum and by fp32 torch.sum: how much of an
    implementation's loss error comes from its per-sequence sum alone."""
    h, rh, tgt = shifted(inp)
    mask = tgt != IGNORE_INDEX

    def per_token(hidden, weight):  # [S, T-1] float64, one sequence at a time: bounded memory at large V
        w = weight.double()
        return torch.stack([token_logps(h_row.double() @ w.T, t_row) * m_row
                            for h_row, t_row, m_row in zip(hidden, tgt, mask)])

    def segment_sum_fp32(tok):  # fastdpo's per-sequence sum (ops -> segment_sum) of fp32 per-token values
        seq_index = torch.where(mask, torch.arange(tok.shape[0], device=tok.device).unsqueeze(1), -1).reshape(-1)
        return torch_ops.segment_sum(tok.float().reshape(1, -1), seq_index, tok.shape[0])[0]

    with torch.no_grad():
        policy, ref = per_token(h, inp.weight), per_token(rh, inp.ref_weight)
        return {"loss": float(dpo_sigmoid(policy.sum(-1), ref.sum(-1))),
                "loss_segment_sum_fp32": float(dpo_sigmoid(segment_sum_fp32(policy), segment_sum_fp32(ref))),
                "loss_torch_sum_fp32": float(dpo_sigmoid(policy.float().sum(-1), ref.float().sum(-1)))}
