"""Roofline projection (no GPU needed): bytes moved and FLOPs of one DPO loss-head step, per algorithm.

A step = policy LM head forward + backward and reference LM head forward, on `n_all` positions of which
`n_completion` have a target. Each algorithm is written as the list of passes it makes over memory
(`Pass`: FLOPs, compulsory HBM bytes, and for the tiled fused kernels the bytes the tiles request).

* **compulsory bytes**: every operand of a pass read once, every output written once (ideal on-chip
  reuse within a pass). The floor time is max(compulsory bytes / HBM bandwidth, FLOPs / dense peak).
* **tile bytes** (fastdpo fused, CCE): what the tile loops load/store with *no* L2 reuse between
  tiles (weight re-read per token tile, hidden re-read per vocab tile, fp32 accumulator
  read-modify-writes). An upper bound on HBM traffic; L2 (50 MB on H100) serves part of it.
* GEMMs run by cuBLAS (full logits, TRL, Liger, torch) are counted at compulsory bytes.
* Elementwise FLOPs (exp, max, ...) are not counted: at 2 bytes per logit they are far below the
  memory time on H100.

* The H200 anchor (`anchor_projection`): each head mode's matrix FLOPs at cuBLAS's rate at that shape, as the
  anchor's source measured it (three GEMMs in 18.9 ms), plus its other passes' bytes at HBM bandwidth.

Everything here is a projection from the algorithms' structure, not a measurement.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from fastdpo.kernels import linear_logps

# H100 SXM5: HBM3 3.35 TB/s, dense bf16 tensor-core 989 TFLOP/s (no sparsity)
H100 = {"name": "H100 SXM", "bw": 3.35e12, "flops": 989e12}
# peak figures to put a measured CUDA run against its roofline: (words that must all appear in
# torch.cuda.get_device_name(), HBM B/s, dense bf16 FLOP/s), first match wins
GPU_PEAKS = [
    (("H100", "PCIe"), 2.0e12, 756e12), (("H100", "NVL"), 3.9e12, 835e12), (("H200",), 4.8e12, 989e12),
    (("H100",), 3.35e12, 989e12), (("GH200",), 4.0e12, 989e12), (("A100", "80GB"), 2.0e12, 312e12),
    (("A100",), 1.56e12, 312e12), (("L40S",), 0.864e12, 362e12), (("L4",), 0.3e12, 121e12),
    (("A10",), 0.6e12, 125e12),
]

# Llama-3-8B LM head; the step: 8 pairs x 1024 tokens, half of them completion
LLAMA3_8B = dict(vocab=128256, hidden=4096)
DEFAULT_STEP = dict(pairs=8, seq_len=1024, completion_fraction=0.5)

# tile shapes that the projections assume (bf16)
# (BLOCK_M, BLOCK_V) per pass of the fused kernels, the bf16 tiles that ship in kernels/linear_logps.py
FASTDPO_BLOCKS = {name: per_flavour["16-bit"][:2] for name, per_flavour in linear_logps.BLOCKS.items()}
CCE_BLOCKS = (128, 128)
TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768  # trl.kernels.chunked_logprob / add_fused_lm_head
TORCH_LCE_CHUNK = 1024  # rows per chunk assumed for torch's chunked linear_cross_entropy on GPU
FP32 = 4


@dataclass(frozen=True)
class Shape:
    n_all: int  # positions in the batch (every position of every sequence)
    n_completion: int  # positions with a target
    vocab: int
    hidden: int
    elem: int = 2  # bytes per input element (bf16)
    pairs: int = 8

    @classmethod
    def step(cls, pairs, seq_len, completion_fraction, vocab, hidden, elem=2):
        n_all = 2 * pairs * seq_len
        return cls(n_all, int(round(n_all * completion_fraction)), vocab, hidden, elem, pairs)


@dataclass
class Pass:
    phase: str  # "policy fwd", "policy bwd", "ref fwd"
    what: str
    flops: float = 0.0
    bytes: float = 0.0
    tile_bytes: float | None = None  # None: same as bytes

    @property
    def requested(self) -> float:
        return self.bytes if self.tile_bytes is None else self.tile_bytes


def gemm(phase, what, m, n, k, s: Shape, out_elem=None, accumulate=False) -> Pass:
    """C[m, n] (+)= A[m, k] @ B[k, n] with inputs in the input dtype."""
    out_elem = s.elem if out_elem is None else out_elem
    out = m * n * out_elem * (2 if accumulate else 1)
    return Pass(phase, what, 2.0 * m * n * k, (m * k + k * n) * s.elem + out)


def elementwise(phase, what, n_elems, read, write) -> Pass:
    """A pass over n_elems logits reading `read` and writing `write` bytes per element."""
    return Pass(phase, what, 0.0, n_elems * (read + write))


# ------------------------------------------------------------------------------------------------------
# algorithms
def full_logits(s: Shape, n=None) -> list[Pass]:
    """logits = h @ W.T, logits.float(), log_softmax, gather (plain PyTorch; every position)."""
    n = s.n_all if n is None else n
    V, D, b = s.vocab, s.hidden, s.elem
    nv = n * V
    out = []
    for phase in ("policy fwd", "ref fwd"):
        out += [gemm(phase, "logits GEMM", n, V, D, s),
                elementwise(phase, "logits.float()", nv, b, FP32),
                elementwise(phase, "log_softmax", nv, FP32, FP32)]
    out += [elementwise("policy bwd", "gather backward (zeros + scatter)", nv, 0, FP32),
            elementwise("policy bwd", "log_softmax backward", nv, 2 * FP32, FP32),
            elementwise("policy bwd", ".float() backward", nv, FP32, b),
            gemm("policy bwd", "grad_hidden GEMM", n, D, V, s),
            gemm("policy bwd", "grad_weight GEMM", V, D, n, s)]
    return out


def fastdpo_logits(s: Shape) -> list[Pass]:
    """The model's LM head GEMMs on every position + fastdpo's logits-form kernels (kernels/sequence_logps.py):
    forward reads the completion rows once; backward reads them and writes grad_logits (zeros elsewhere)."""
    V, D, b = s.vocab, s.hidden, s.elem
    na, nc = s.n_all, s.n_completion
    out = []
    for phase in ("policy fwd", "ref fwd"):
        out += [gemm(phase, "logits GEMM (model LM head)", na, V, D, s),
                elementwise(phase, "row_logps_forward", nc * V, b, 0)]
    out += [Pass("policy bwd", "row_logps_backward", 0.0, nc * V * 2 * b + (na - nc) * V * b),
            gemm("policy bwd", "grad_hidden GEMM", na, D, V, s),
            gemm("policy bwd", "grad_weight GEMM", V, D, na, s)]
    return out


def _splits(n_outer_tiles, n_inner_tiles, cap, target=264):
    """Split count of kernels/linear_logps.py (_splits; 2 programs per SM of an H100)."""
    s = max(1, min(math.ceil(target / max(n_outer_tiles, 1)), n_inner_tiles, cap))
    per = math.ceil(n_inner_tiles / s)
    return math.ceil(n_inner_tiles / per)


def fastdpo_fused_passes(s: Shape, n=None, blocks=FASTDPO_BLOCKS) -> list[Pass]:
    """kernels/linear_logps.py: forward one kernel (2VD/token); backward two launches, each recomputing the
    logits tile: grad_hidden (outer token tiles, dz @ W) and grad_weight (outer vocab tiles, dz^T @ h),
    fp32 accumulators owned per program and read-modify-written per inner tile."""
    n = s.n_completion if n is None else n
    V, D, b = s.vocab, s.hidden, s.elem
    (fm, fv), (hm, hv), (wm, wv) = blocks["fwd"], blocks["bwd_hidden"], blocks["bwd_weight"]
    nvd = n * V * D
    hw = (n + V) * D * b  # read hidden and weight once
    fwd_splits = _splits(math.ceil(n / fm), math.ceil(V / fv), linear_logps.MAX_FWD_SPLITS)
    h_splits = _splits(math.ceil(n / hm), math.ceil(V / hv), linear_logps.MAX_BWD_SPLITS)
    w_splits = _splits(math.ceil(V / wv), math.ceil(n / wm), linear_logps.MAX_BWD_SPLITS)
    partials = 4 * FP32 * n * fwd_splits * 2  # [4, splits, M] written, then merged
    out = []
    for phase in ("policy fwd", "ref fwd"):
        out.append(Pass(phase, "linear_logps_forward", 2.0 * nvd, hw + partials,
                        tile_bytes=nvd * b * (1 / fm + 1 / fv) + partials))
    # grad_hidden: per (token tile, vocab tile): h + W tiles (recompute), W tile again (dz @ W), fp32 RMW
    out.append(Pass("policy bwd", "backward: grad_hidden pass", 4.0 * nvd,
                    hw + n * D * (FP32 * h_splits * 2 + b),
                    tile_bytes=nvd * (b / hv + 2 * b / hm + 2 * FP32 / hv) + n * D * b))
    # grad_weight: per (vocab tile, token tile): W + h tiles (recompute), h tile again (dz^T @ h), fp32 RMW
    out.append(Pass("policy bwd", "backward: grad_weight pass", 4.0 * nvd,
                    hw + V * D * (FP32 * w_splits * 2 + b),
                    tile_bytes=nvd * (2 * b / wv + b / wm + 2 * FP32 / wm) + V * D * b))
    return out


def fastdpo_fused(s: Shape) -> list[Pass]:
    return fastdpo_fused_passes(s)


def fastdpo_gemm_core(s: Shape, store: bool, chunks: int = 1, with_reference: bool = True,
                      fixed: bool = False) -> list[Pass]:
    """fastdpo/head.py, head_mode "stored" (store=True) or "recompute": cuBLAS GEMMs on the scored rows in
    `chunks` chunks and the row kernels (kernels/sequence_logps.py) between them. Forward: Z = H W^T is written,
    the row kernel reads it (stored: and writes U = d logp / dZ in the input dtype). Backward: recompute only
    without store (GEMM + row_logps_backward in place), then grad_hidden = g (U W) and grad_weight = U^T (g H),
    the latter accumulated in fp32 across chunks. Policy 6VD (stored) / 8VD (recompute); reference 2VD.
    fixed=False: the code of issue 17's start (Z in the input dtype; one chunk's grad_weight goes bf16 -> fp32 ->
    bf16, 12 bytes per element); fixed=True: after its deliverables 1-2 (Z in fp32 out of the GEMM, read by the
    row kernel; grad_weight written once in its final dtype)."""
    n, V, D, b = s.n_completion, s.vocab, s.hidden, s.elem
    nv, z_elem = n * V, FP32 if fixed else b

    def logits(phase, what):  # the GEMM, and the fp32 output's extra bytes as their own pass
        wider = [elementwise(phase, "  Z written in fp32 (extra bytes)", nv, 0, FP32 - b)] if fixed else []
        return [gemm(phase, what, n, V, D, s)] + wider

    out = logits("policy fwd", "Z = H W^T") + [
        elementwise("policy fwd", "row_logps_forward" + (" + write U" if store else ""), nv, z_elem,
                    b if store else 0)]
    if not store:
        out += logits("policy bwd", "recompute Z = H W^T") + [
            elementwise("policy bwd", "row_logps_backward (U)", nv, z_elem, b)]
    out += [gemm("policy bwd", "grad_hidden = g (U W)", n, D, V, s),
            gemm("policy bwd", "grad_weight = U^T (g H)", V, D, n, s)]
    if chunks > 1:
        out.append(elementwise("policy bwd", "grad_weight fp32 accumulation across chunks", chunks * V * D, FP32,
                               FP32))
    elif not fixed:
        out.append(elementwise("policy bwd", "grad_weight bf16 -> fp32 -> bf16 (one chunk)", V * D, b + FP32,
                               FP32 + b))
    if with_reference:
        out += logits("ref fwd", "Z = H W^T") + [elementwise("ref fwd", "row_logps_forward", nv, z_elem, 0)]
    return out


def trl_chunked(s: Shape, compact=True) -> list[Pass]:
    """trl.kernels.ChunkedLogProbFunction: cuBLAS GEMM into a [4096, 32768] tile buffer (written to and read
    back from HBM: 268 MB in bf16, larger than L2), a fold kernel; backward recomputes each tile, turns it
    into dz in place and runs two fp32-accumulating addmms. On CUDA only completion positions ("compact")."""
    n = s.n_completion if compact else s.n_all
    V, D, b = s.vocab, s.hidden, s.elem
    nv, t_chunks, v_chunks = n * V, math.ceil(n / TRL_TOKEN_CHUNK), math.ceil(V / TRL_VOCAB_CHUNK)
    w_reads, h_reads = V * D * b * t_chunks, n * D * b * v_chunks
    out = []
    for phase in ("policy fwd", "ref fwd"):
        out += [Pass(phase, "tile GEMMs -> HBM tile", 2.0 * nv * D, w_reads + h_reads + nv * b),
                elementwise(phase, "fold kernel (online lse)", nv, b, 0)]
    out += [Pass("policy bwd", "recompute tile GEMMs", 2.0 * nv * D, w_reads + h_reads + nv * b),
            elementwise("policy bwd", "tile -> dz in place", nv, b, b),
            Pass("policy bwd", "grad_hidden addmm (fp32 acc)", 2.0 * nv * D,
                 nv * b + w_reads + 2 * n * D * FP32 * v_chunks),
            Pass("policy bwd", "grad_weight addmm (fp32 acc)", 2.0 * nv * D,
                 nv * b + h_reads + 2 * V * D * FP32 * t_chunks)]
    return out


def liger(s: Shape, compiled=False) -> list[Pass]:
    """LigerFusedLinearDPOLoss: chunks of one pair (2 sequences); per chunk the logits are materialised
    and torch.func.grad_and_value computes the gradients during forward (no recompute). Eager: the
    full-logits elementwise chain per chunk; compiled: one fused elementwise read + one dz write."""
    V, D, b = s.vocab, s.hidden, s.elem
    n, chunks = s.n_all, s.pairs
    nv = n * V
    wb = V * D * b
    out = [Pass("policy fwd", "logits GEMM per chunk", 2.0 * nv * D, chunks * wb + n * D * b + nv * b),
           Pass("ref fwd", "ref logits GEMM per chunk", 2.0 * nv * D, chunks * wb + n * D * b + nv * b)]
    if compiled:
        out += [elementwise("policy fwd", "fused lse + gather + logits mean", nv, b, 0),
                elementwise("ref fwd", "fused lse + gather", nv, b, 0),
                elementwise("policy bwd", "fused dz", nv, b, b)]
    else:
        for phase in ("policy fwd", "ref fwd"):
            out += [elementwise(phase, "logits.float()", nv, b, FP32),
                    elementwise(phase, "log_softmax", nv, FP32, FP32)]
        out += [elementwise("policy fwd", "logits mean (metrics)", nv, b, 0),
                elementwise("policy bwd", "gather backward", nv, 0, FP32),
                elementwise("policy bwd", "log_softmax backward", nv, 2 * FP32, FP32),
                elementwise("policy bwd", ".float() backward", nv, FP32, b)]
    out += [Pass("policy bwd", "grad_input GEMM per chunk", 2.0 * nv * D, nv * b + chunks * wb + n * D * b),
            Pass("policy bwd", "grad_weight GEMM per chunk + accumulate", 2.0 * nv * D,
                 nv * b + n * D * b + chunks * 4 * wb)]
    return out


def torch_lce(s: Shape, chunk=TORCH_LCE_CHUNK) -> list[Pass]:
    """torch F.linear_cross_entropy with LinearCrossEntropyOptions and reduction="none" (per-token log-probs,
    as a DPO loss needs): forward computes per-chunk logits (fp32 buffer) and lse only, the backward
    recomputes each chunk, forms dz, runs grad_input and grad_weight GEMMs (fp32 weight-grad accumulator).
    Every position."""
    V, D, b = s.vocab, s.hidden, s.elem
    n = s.n_all
    nv, chunks = n * V, math.ceil(n / chunk)
    wb = V * D * b
    logits = lambda phase, what: Pass(phase, what, 2.0 * nv * D, chunks * wb + n * D * b + nv * FP32)
    out = []
    for phase in ("policy fwd", "ref fwd"):
        out += [logits(phase, "logits GEMM per chunk (fp32 buffer)"), elementwise(phase, "lse", nv, FP32, 0)]
    out += [logits("policy bwd", "recompute logits GEMM per chunk"),
            elementwise("policy bwd", "dz", nv, FP32, b),
            Pass("policy bwd", "grad_input GEMM per chunk", 2.0 * nv * D, nv * b + chunks * wb + n * D * b),
            Pass("policy bwd", "grad_weight GEMM per chunk (fp32 acc)", 2.0 * nv * D,
                 nv * b + n * D * b + chunks * 2 * V * D * FP32)]
    return out


def cce(s: Shape, blocks=CCE_BLOCKS) -> list[Pass]:
    """Cut Cross-Entropy: forward lse kernel with logits tiles in SRAM (+ indexed dot for the target logit);
    backward one kernel recomputing each tile and atomically adding dz @ C and dz^T @ E in fp32. Dense
    upper bound: its gradient filtering skips tiles whose softmax is below eps. Completion positions only."""
    n = s.n_completion
    V, D, b = s.vocab, s.hidden, s.elem
    bm, bv = blocks
    nvd = n * V * D
    hw = (n + V) * D * b
    out = []
    for phase in ("policy fwd", "ref fwd"):
        out += [Pass(phase, "lse kernel", 2.0 * nvd, hw + n * FP32, tile_bytes=nvd * b * (1 / bm + 1 / bv)),
                Pass(phase, "indexed dot (target logit)", 2.0 * n * D, 2 * n * D * b)]
    out.append(Pass("policy bwd", "backward kernel (recompute, dE and dC atomics)", 6.0 * nvd,
                    hw + 2 * (n + V) * D * FP32 + (n + V) * D * b,
                    tile_bytes=nvd * (2 * b / bm + 2 * b / bv + 2 * FP32 / bm + 2 * FP32 / bv)))
    return out


ALGORITHMS = {
    "fastdpo_stored": ("fastdpo head_mode='stored' (GEMMs + row kernels, U kept)", "completion",
                       lambda s: fastdpo_gemm_core(s, store=True)),
    "fastdpo_recompute": ("fastdpo head_mode='recompute' (GEMMs + row kernels)", "completion",
                          lambda s: fastdpo_gemm_core(s, store=False)),
    "fastdpo_fused": ("fastdpo head_mode='fused' (kernels/linear_logps.py)", "completion", fastdpo_fused),
    "fastdpo_logits": ("LM head GEMM + fastdpo logits kernels (kernels/sequence_logps.py)", "all (kernel: completion)",
                       fastdpo_logits),
    "full_logits": ("full logits, fp32 log_softmax + gather", "all", full_logits),
    "trl_chunked": ("TRL 1.16 ChunkedLogProbFunction (CUDA: compact)", "completion", trl_chunked),
    "liger": ("Liger LigerFusedLinearDPOLoss (eager)", "all", liger),
    "liger_compiled": ("Liger LigerFusedLinearDPOLoss (compiled)", "all", lambda s: liger(s, compiled=True)),
    "torch_lce": (f"torch F.linear_cross_entropy (chunks of {TORCH_LCE_CHUNK} rows)", "all", torch_lce),
    "cce": ("Cut Cross-Entropy (dense, no filtering)", "completion", cce),
}


# ------------------------------------------------------------------------------------------------------
# summaries
@dataclass
class Cost:
    flops: float
    bytes: float
    requested: float
    phases: dict = field(default_factory=dict)  # phase -> (flops, bytes)

    def floor_s(self, bw, peak) -> float:
        return max(self.bytes / bw, self.flops / peak)

    def bound(self, bw, peak) -> str:
        return "memory" if self.bytes / bw > self.flops / peak else "compute"


def cost(passes: list[Pass]) -> Cost:
    phases = {}
    for p in passes:
        f, by = phases.get(p.phase, (0.0, 0.0))
        phases[p.phase] = (f + p.flops, by + p.bytes)
    return Cost(sum(p.flops for p in passes), sum(p.bytes for p in passes), sum(p.requested for p in passes),
                phases)


def algorithm_cost(name: str, s: Shape) -> Cost:
    return cost(ALGORITHMS[name][2](s))


def step_table(s: Shape, gpu=H100) -> list[dict]:
    """One row per algorithm for a whole DPO loss-head step."""
    rows = []
    for key, (label, scores, fn) in ALGORITHMS.items():
        c = cost(fn(s))
        fwd_f, fwd_b = c.phases.get("policy fwd", (0, 0))
        bwd_f, bwd_b = c.phases.get("policy bwd", (0, 0))
        ref_f, ref_b = c.phases.get("ref fwd", (0, 0))
        rows.append({
            "algorithm": key, "label": label, "scores": scores,
            "gflop": c.flops / 1e9, "gb": c.bytes / 1e9, "tile_gb": c.requested / 1e9,
            "per_token": {  # per position of the batch (n_all), so algorithms compare directly
                "policy_fwd_mflop": fwd_f / s.n_all / 1e6, "policy_fwd_kb": fwd_b / s.n_all / 1e3,
                "policy_bwd_mflop": bwd_f / s.n_all / 1e6, "policy_bwd_kb": bwd_b / s.n_all / 1e3,
                "ref_fwd_mflop": ref_f / s.n_all / 1e6, "ref_fwd_kb": ref_b / s.n_all / 1e3,
            },
            "compute_ms": c.flops / gpu["flops"] * 1e3, "memory_ms": c.bytes / gpu["bw"] * 1e3,
            "tile_memory_ms": c.requested / gpu["bw"] * 1e3,
            "floor_ms": c.floor_s(gpu["bw"], gpu["flops"]) * 1e3, "bound": c.bound(gpu["bw"], gpu["flops"]),
        })
    return rows


def kernel_table(s: Shape, gpu=H100) -> list[dict]:
    """fastdpo's kernels on their own, per token they process."""
    rows = []
    V, b = s.vocab, s.elem
    n = s.n_completion
    logits_fwd = Pass("fwd", "row_logps_forward", 0.0, n * V * b)
    logits_bwd = Pass("bwd", "row_logps_backward", 0.0, n * V * 2 * b)
    for kname, p in [("sequence_logps forward (logits form)", logits_fwd),
                     ("sequence_logps backward (logits form)", logits_bwd)] + [
            ("linear_logps " + p.what.replace("linear_logps_", "").replace("backward: ", "backward, "), p)
            for p in fastdpo_fused_passes(s) if p.phase != "ref fwd"]:
        compulsory, tiles = Cost(p.flops, p.bytes, p.requested), Cost(p.flops, p.requested, p.requested)
        rows.append({"kernel": kname, "mflop_per_token": p.flops / n / 1e6, "kb_per_token": p.bytes / n / 1e3,
                     "tile_kb_per_token": p.requested / n / 1e3,
                     "floor_us_per_1k_tokens": compulsory.floor_s(gpu["bw"], gpu["flops"]) / n * 1e9,
                     "tile_us_per_1k_tokens": tiles.floor_s(gpu["bw"], gpu["flops"]) / n * 1e9,
                     "bound": compulsory.bound(gpu["bw"], gpu["flops"])})
    return rows


def projection(vocab=LLAMA3_8B["vocab"], hidden=LLAMA3_8B["hidden"], elem=2, gpu=H100, **step) -> dict:
    step = {**DEFAULT_STEP, **step}
    s = Shape.step(step["pairs"], step["seq_len"], step["completion_fraction"], vocab, hidden, elem)
    return {"gpu": gpu, "shape": s.__dict__, "step": step, "algorithms": step_table(s, gpu),
            "kernels": kernel_table(s, gpu)}


# Published anchor (shared/peers-cpu.md; Liger-Kernel PR #1356): fused linear cross-entropy forward + backward,
# H200, bf16, 4096 tokens, D = 4096, V = 128256: QuACK 16.78 ms; the same source timed the three cuBLAS GEMMs of
# that step alone (Z = H W^T, dZ W, dZ^T H) at 18.9 ms: cuBLAS's rate at these shapes.
# H200: 4.8 TB/s HBM (datasheet); bf16 matmul 790 TFLOP/s and copies 4.3 TB/s as measured on random data on the
# device kind this project is lent (.library/device/KINDS.md, 8192^3 through PyTorch; datasheet 989 TFLOP/s).
H200 = {"name": "H200", "bw": 4.8e12, "flops": 790e12, "copy_bw": 4.3e12}
ANCHOR = dict(tokens=4096, vocab=128256, hidden=4096, quack_ms=16.78, cublas_3_gemms_ms=18.9)
# (head mode, variant) -> policy forward + backward passes at the anchor (no reference)
ANCHOR_MODES = {
    ("fastdpo_stored", "today"): lambda s: fastdpo_gemm_core(s, store=True, with_reference=False),
    ("fastdpo_stored", "fixed"): lambda s: fastdpo_gemm_core(s, store=True, with_reference=False, fixed=True),
    ("fastdpo_recompute", "today"): lambda s: fastdpo_gemm_core(s, store=False, with_reference=False),
    ("fastdpo_recompute", "fixed"): lambda s: fastdpo_gemm_core(s, store=False, with_reference=False, fixed=True),
    ("fastdpo_fused", "Triton kernels at cuBLAS's rate: a lower bound"):
        lambda s: [p for p in fastdpo_fused_passes(s) if p.phase != "ref fwd"],
}


def anchor_projection(gpu=H200) -> dict:
    """Each fastdpo head mode at the anchor's shape (policy forward + backward, every token scored), projected
    from cuBLAS's measured rate at these shapes (not from QuACK's own GEMMs): matrix FLOPs at the rate of the
    source's three cuBLAS GEMMs, plus the bytes of the other passes at HBM bandwidth (datasheet 4.8 TB/s to the
    4.3 TB/s measured copy). `today`: the code at issue 17's start; `fixed`: after its deliverables 1-2. The
    fused mode's Triton kernels at cuBLAS's rate are a lower bound. Projections, not measurements."""
    a = ANCHOR
    s = Shape(a["tokens"], a["tokens"], a["vocab"], a["hidden"], elem=2, pairs=1)
    vd_flops = a["tokens"] * a["vocab"] * a["hidden"]
    cublas_rate = 6 * vd_flops / (a["cublas_3_gemms_ms"] / 1e3)  # FLOP/s of the three GEMMs (6VD)
    rows = []
    for (key, variant), fn in ANCHOR_MODES.items():
        passes = fn(s)
        c = cost(passes)
        gemm_ms = c.flops / cublas_rate * 1e3
        other = sum(p.bytes for p in passes if not p.flops)  # row kernels, fp32 traffic: outside the GEMMs
        rows.append({"algorithm": key, "variant": variant, "vd_per_token": c.flops / vd_flops, "gb": c.bytes / 1e9,
                     "floor_ms": c.floor_s(gpu["bw"], gpu["flops"]) * 1e3, "cublas_gemm_ms": gemm_ms,
                     "other_gb": other / 1e9,
                     "projected_ms": (gemm_ms + other / gpu["bw"] * 1e3, gemm_ms + other / gpu["copy_bw"] * 1e3)})
    return {"gpu": gpu, "anchor": a, "cublas_tflops": cublas_rate / 1e12,
            "quack_tflops": 6 * vd_flops / (a["quack_ms"] / 1e3) / 1e12, "modes": rows}


def measured_against_roofline(algorithm: str, s: Shape, ms: float, gpu_name: str) -> dict:
    """Achieved GB/s and TFLOP/s of a measured step (compulsory bytes and FLOPs of its algorithm)."""
    bw, peak = gpu_peaks(gpu_name)
    c = algorithm_cost(algorithm, s)
    t = ms / 1e3
    return {"gbps": c.bytes / t / 1e9, "tflops": c.flops / t / 1e12, "floor_ms": c.floor_s(bw, peak) * 1e3,
            "of_roofline": c.floor_s(bw, peak) / t, "peak_gbps": bw / 1e9, "peak_tflops": peak / 1e12}


def gpu_peaks(name: str):
    """(HBM B/s, dense bf16 FLOP/s) for a CUDA device name; H100 SXM figures when it is not listed."""
    words = set(name.upper().replace("-", " ").split())
    for keys, bw, peak in GPU_PEAKS:
        if all(k.upper() in words for k in keys):
            return bw, peak
    return H100["bw"], H100["flops"]


def shape_for(cfg, elem: int) -> Shape:
    """Shape of a benchmark HeadConfig."""
    return Shape(cfg.tokens, cfg.completion_tokens, cfg.vocab, cfg.hidden, elem, cfg.pairs)


if __name__ == "__main__":
    print(json.dumps(projection(), indent=1))
