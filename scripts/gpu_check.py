"""Compiled-GPU check of fastdpo's LM head: one command, under 6 minutes on one H100/H200.

    python scripts/gpu_check.py OUT_DIR            # on a CUDA machine: compiled Triton, cuBLAS
    python scripts/gpu_check.py OUT_DIR --smoke    # CPU, Triton interpreter, tiny shapes (what the tests run)

Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md, both rewritten as soon as each section finishes:
  environment   versions, device, shapes
  ceilings      measured here: a large bf16 cuBLAS matmul (TFLOP/s) and a large device copy (GB/s)
  correctness   every head mode (and the logits form) against float64: fp32 / bf16, V = 32000, 50257,
                128256, D = 4096, plus a transforms case; log-probs, grad_hidden, grad_weight
  determinism   two identical runs per mode, bitwise
  kernels       TFLOP/s of each head GEMM and GB/s of each row kernel (fraction of the ceilings), fused kernels
  head_step     one DPO head step (policy fwd + bwd, reference fwd) per head mode beside Liger-Kernel, TRL's
                chunked log-prob, torch's chunked cross-entropy and Cut Cross-Entropy (missing: "not installed")
  host_syncs    synchronising CUDA calls per step (torch.cuda.set_sync_debug_mode), per mode and fastdpo.loss
  packed_attention  the packed-batch attention (CUDA: one varlen call) against SDPA with a dense [T, T] mask:
                errors of output and q/k/v gradients, fwd + bwd times, plain / sliding window / softcap
--smoke numbers are CPU/interpreter numbers, labelled so: never GPU figures. Exit status 1 if a correctness or
determinism check fails or a section raises.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {"fp32": 1e-5, "bf16": 1e-2}
MODES = ("stored", "recompute", "fused")
PEERS = ("liger", "trl_chunked", "torch_lce", "torch_lce_256", "cce")
FULL = dict(device="cuda", vocabs=(32000, 50257, 128256), hidden=4096, check_rows=256, kernel_rows=4096,
            ceiling_n=8192, copy_bytes=2 << 30, repeats=10, head_config="G")
SMOKE = dict(device="cpu", vocabs=(64, 131, 257), hidden=16, check_rows=8, kernel_rows=16,
             ceiling_n=256, copy_bytes=1 << 22, repeats=1, head_config="q1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="directory for gpu_check.json and gpu_check.md (created)")
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    parser.add_argument("--backend", choices=("triton", "torch"), default="triton",
                        help="fastdpo backend of the checks (default triton: compiled on GPU, interpreted with --smoke)")
    return parser.parse_args(argv)


def setup(smoke):
    """Environment before triton is imported: the interpreter (with the bf16 fixes of tests/conftest.py) for --smoke."""
    sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")]
    os.environ["TRITON_INTERPRET"] = "1" if smoke else "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if smoke:
        from triton.runtime import interpreter

        from conftest import interpreter_bf16_fixes
        for name, replacement in interpreter_bf16_fixes().items():
            setattr(interpreter.InterpreterBuilder, name, replacement)


class Report:
    """Sections of results, each written to JSON and markdown as soon as it finishes."""

    def __init__(self, out_dir, smoke):
        self.out_dir, self.smoke, self.sections, self.failed = out_dir, smoke, {}, []
        os.makedirs(out_dir, exist_ok=True)

    def run(self, name, fn, *args):
        start = time.perf_counter()
        try:
            rows = fn(*args)
        except Exception:
            rows = [{"error": traceback.format_exc(limit=6)}]
            self.failed.append(name)
        self.failed += [f"{name}: {row}" for row in rows if row.get("ok") is False]
        self.sections[name] = {"seconds": round(time.perf_counter() - start, 2), "rows": rows}
        self.write()
        print(f"[gpu_check] {name}: {len(rows)} rows, {self.sections[name]['seconds']} s", flush=True)

    def write(self):
        with open(os.path.join(self.out_dir, "gpu_check.json"), "w") as f:
            json.dump({"smoke": self.smoke, "failed": self.failed, "sections": self.sections}, f, indent=1)
        label = ("**--smoke: CPU + Triton interpreter, tiny shapes. These are not GPU numbers.**" if self.smoke
                 else "Measured on the GPU named under environment.")
        lines = ["# fastdpo gpu_check", "", label, ""]
        for name, section in self.sections.items():
            lines += [f"## {name} ({section['seconds']} s)", "", markdown_table(section["rows"]), ""]
        lines += ["Failures: " + ("none" if not self.failed else "; ".join(map(str, self.failed)))]
        with open(os.path.join(self.out_dir, "gpu_check.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


def markdown_table(rows):
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v).replace("\n", "<br>").replace("|", "/")
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                     + ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows])


# ------------------------------------------------------------------------------------------------ helpers

def synchronize(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, repeats, warmup=True):
    """Median wall time of fn() in ms over `repeats` runs (synchronised), after one warm-up run if `warmup`."""
    if warmup:
        fn()
        synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def head_problem(N, M, D, V, dtype, device, seed, with_bias=False):
    """hidden [N, D], weight [V, D] (bias [V]), targets / seq_index [N] with M scored tokens in 8 sequences."""
    import torch
    g = torch.Generator(device).manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, device=device).to(dtype)
    weight = (torch.randn(V, D, generator=g, device=device) * (2.0 / D ** 0.5)).to(dtype)
    bias = torch.randn(V, generator=g, device=device).to(dtype) if with_bias else None
    seq_index = torch.randint(0, 8, (N,), generator=g, device=device)
    seq_index[torch.randperm(N, generator=g, device=device)[:N - M]] = -1
    targets = torch.where(seq_index >= 0, torch.randint(0, V, (N,), generator=g, device=device), -1)
    return hidden, weight, bias, targets, seq_index


def float64_head(hidden, weight, bias, targets, seq_index, upstream, transforms):
    """float64 (logps [8], grad_hidden, grad_weight) of upstream . logps (tests/reference.py's head)."""
    import torch

    from reference import head_logits_f64
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    z = head_logits_f64(h, w, None if bias is None else bias.double(), **transforms)
    scored = seq_index >= 0
    logp = torch.log_softmax(z, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    logps = torch.zeros(8, dtype=torch.float64, device=z.device).index_add(0, seq_index[scored], logp[scored])
    grad_h, grad_w = torch.autograd.grad(logps, [h, w], upstream.double())
    return logps.detach(), grad_h, grad_w


def run_head(hidden, weight, bias, targets, seq_index, upstream, mode, transforms, backend, fp32_precision="ieee"):
    """(logps, grad_hidden, grad_weight) of fastdpo's head in `mode` ("logits": the logits form on X)."""
    import torch

    from fastdpo.ops import linear_sequence_logps, logits_sequence_logps
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if mode == "logits":
        logits = h @ w.t() if bias is None else torch.addmm(bias, h, w.t())
        logps, _ = logits_sequence_logps(logits, targets, seq_index, 8, backend=backend, **transforms)
    else:
        logps, _ = linear_sequence_logps(h, w, bias, targets, seq_index, 8, backend=backend, head_mode=mode,
                                         fp32_precision=fp32_precision, **transforms)
    grad_h, grad_w = torch.autograd.grad(logps, [h, w], upstream)
    return logps.detach(), grad_h, grad_w


# ------------------------------------------------------------------------------------------------ sections

def environment(cfg, smoke):
    import torch
    import triton
    row = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if cfg["device"] == "cuda" else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
           "mode": "smoke (CPU, Triton interpreter)" if smoke else "compiled GPU",
           "shapes": {k: v for k, v in cfg.items() if k != "device"}}
    return [row]


def ceilings(cfg):
    """Achievable peaks measured here: bf16 matmul n^3, and a device copy (read + write bytes)."""
    import torch
    device, n = cfg["device"], cfg["ceiling_n"]
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = time_ms(lambda: a @ b, device, cfg["repeats"])
    src = torch.empty(cfg["copy_bytes"] // 2, device=device, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, cfg["repeats"])
    return [{"what": f"bf16 matmul {n}^3", "ms": ms, "TFLOP/s": 2 * n ** 3 / ms / 1e9},
            {"what": f"device copy {cfg['copy_bytes'] >> 20} MiB", "ms": copy_ms,
             "GB/s": 2 * cfg["copy_bytes"] / copy_ms / 1e6}]


def correctness(cfg):
    import torch

    from reference import rel_err
    device, D, M = cfg["device"], cfg["hidden"], cfg["check_rows"]
    cases = [(V, dt, {}) for V in cfg["vocabs"] for dt in ("fp32", "bf16")]
    cases += [(cfg["vocabs"][-1], dt, {"logit_scale": 0.5, "softcap": 30.0, "temperature": 0.9}) for dt in TOL]
    rows = []
    for i, (V, dt, transforms) in enumerate(cases):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
        hidden, weight, bias, targets, seq_index = head_problem(M + M // 4, M, D, V, dtype, device, seed=i,
                                                                with_bias=bool(transforms))
        upstream = torch.randn(8, device=device)
        want = float64_head(hidden, weight, bias, targets, seq_index, upstream, transforms)
        for mode in ("logits",) + MODES:
            got = run_head(hidden, weight, bias, targets, seq_index, upstream, mode, transforms, cfg["backend"])
            errs = [rel_err(a, e) for a, e in zip(got, want)]
            rows.append({"V": V, "D": D, "dtype": dt, "transforms": transforms or "-", "mode": mode,
                         "logps": errs[0], "grad_hidden": errs[1], "grad_weight": errs[2],
                         "tol": TOL[dt], "ok": max(errs) <= TOL[dt]})
        del want
    V = cfg["vocabs"][0]  # TF32 is a permission: its error is reported, not bounded
    hidden, weight, bias, targets, seq_index = head_problem(M, M, D, V, torch.float32, device, seed=99)
    upstream = torch.randn(8, device=device)
    want = float64_head(hidden, weight, bias, targets, seq_index, upstream, {})
    got = run_head(hidden, weight, bias, targets, seq_index, upstream, "stored", {}, cfg["backend"],
                   fp32_precision="tf32")
    errs = [rel_err(a, e) for a, e in zip(got, want)]
    rows.append({"V": V, "D": D, "dtype": "fp32, fp32_precision=tf32", "mode": "stored", "logps": errs[0],
                 "grad_hidden": errs[1], "grad_weight": errs[2], "tol": "reported only"})
    return rows


def determinism(cfg):
    import torch
    device, D, M, V = cfg["device"], cfg["hidden"], cfg["check_rows"], cfg["vocabs"][-1]
    hidden, weight, bias, targets, seq_index = head_problem(M + M // 4, M, D, V, torch.bfloat16, device, seed=7)
    upstream = torch.randn(8, device=device)
    rows = []
    for mode in ("logits",) + MODES:
        first, second = (run_head(hidden, weight, bias, targets, seq_index, upstream, mode, {}, cfg["backend"])
                         for _ in range(2))
        same = all(torch.equal(a, b) for a, b in zip(first, second))
        rows.append({"mode": mode, "V": V, "dtype": "bf16", "bitwise_equal": same, "ok": same})
    return rows


def kernels(cfg):
    """Each GEMM of the head and each row kernel alone at M scored rows, bf16."""
    import torch

    from fastdpo.ops import resolve_backend
    device, D, M, V, reps = cfg["device"], cfg["hidden"], cfg["kernel_rows"], cfg["vocabs"][-1], cfg["repeats"]
    impl = resolve_backend(cfg["backend"], torch.device(device))
    hidden, weight, _, _, _ = head_problem(M, M, D, V, torch.bfloat16, device, seed=3)
    targets = torch.randint(0, V, (M,), device=device)
    rows_index, grad_rows = torch.arange(M, device=device), torch.randn(M, device=device)
    logits = hidden @ weight.t()
    _, lse, _ = impl.row_logps_forward(logits, targets)
    item, mvd = logits.element_size(), M * V * D
    work = {  # name: (fn, FLOPs, bytes moved)
        "GEMM X = H W^T": (lambda: hidden @ weight.t(), 2 * mvd, None),
        "GEMM grad_hidden = U W": (lambda: logits @ weight, 2 * mvd, None),
        "GEMM grad_weight = U^T H": (lambda: logits.t() @ hidden, 2 * mvd, None),
        "row_logps_forward": (lambda: impl.row_logps_forward(logits, targets), None, M * V * item),
        "row_logps_forward write_grad": (lambda: impl.row_logps_forward(logits, targets, write_grad=True), None,
                                         2 * M * V * item),
        "row_logps_backward in place": (lambda: impl.row_logps_backward(logits, targets, lse, grad_rows, out=logits),
                                        None, 2 * M * V * item),
        "fused linear_logps_forward": (lambda: impl.linear_logps_forward(hidden, weight, None, rows_index, targets),
                                       2 * mvd, None),
        "fused linear_logps_backward": (lambda: impl.linear_logps_backward(
            hidden, weight, None, rows_index, targets, lse, grad_rows, needs_hidden_grad=True,
            needs_weight_grad=True, needs_bias_grad=False), 4 * mvd, None),
    }
    rows = []
    for name, (fn, flops, nbytes) in work.items():
        ms = time_ms(fn, device, reps)
        row = {"kernel": name, "M": M, "V": V, "D": D, "ms": ms}
        if flops:
            row["TFLOP/s (useful FLOPs)"] = flops / ms / 1e9
        if nbytes:
            row["GB/s"] = nbytes / ms / 1e6
        rows.append(row)
    return rows


def head_step(cfg):
    """One DPO head step per fastdpo head mode (ops level, shared scored-row index) and per peer."""
    import torch

    import heads
    import peers
    from fastdpo.logps import token_targets
    from fastdpo.ops import linear_sequence_logps
    device = cfg["device"]
    config = heads.get_config(cfg["head_config"])
    inp = heads.make_inputs(config, torch.bfloat16, device)
    D = config.hidden

    def fastdpo_step(mode):
        def loss():
            plan = token_targets(inp.labels, None, vocab_size=config.vocab, ignore_index=heads.IGNORE_INDEX,
                                 shift=True)
            rows = torch.nonzero(plan.seq_index >= 0).squeeze(1)  # built once, shared with the reference
            logps = lambda h, w: linear_sequence_logps(h.reshape(-1, D), w, None, *plan[:3], head_mode=mode,
                                                       rows=rows, backend=cfg["backend"])[0]
            policy = logps(inp.hidden, inp.weight)
            with torch.no_grad():
                ref = logps(inp.ref_hidden, inp.ref_weight)
            return heads.dpo_sigmoid(policy, ref)
        return heads.train_step(inp, loss)

    steps = {f"fastdpo head_mode={mode}": (lambda mode=mode: fastdpo_step(mode)) for mode in ("auto",) + MODES}
    steps["fastdpo.loss (public API, defaults)"] = lambda: peers.all_impls()["fastdpo"].build(inp)
    for name in PEERS:
        impl = peers.all_impls().get(name)
        steps[impl.label if impl else name] = impl or None
    expected = heads.reference_losses(inp)["loss"]
    rows = []
    for name, build in steps.items():
        row = {"implementation": name, "config": config.describe()}
        reason = build.unavailable(device) if isinstance(build, heads.Impl) else (None if build else "not registered")
        if reason:
            rows.append({**row, "status": reason})
            continue
        try:
            step = build.build(inp) if isinstance(build, heads.Impl) else build()
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if device == "cuda" else 0
            loss = step()  # also the warm-up
            ms = time_ms(step, device, cfg["repeats"], warmup=False)
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if device == "cuda" else None
            rows.append({**row, "status": "ok", "ms": ms, "peak_extra_MiB": peak,
                         "loss_rel_err_vs_float64": abs(loss - expected) / abs(expected)})
        except Exception as e:  # a peer that breaks on this machine is recorded, not fatal
            rows.append({**row, "status": f"error: {e!r}"[:300]})
        inp.zero_grad()
    return rows


def host_syncs(cfg):
    """Synchronising CUDA calls in one step, counted by torch.cuda.set_sync_debug_mode("warn")."""
    import torch

    import fastdpo
    import heads
    from fastdpo.ops import linear_sequence_logps
    if cfg["device"] != "cuda":
        return [{"what": "host syncs", "status": "not measurable on CPU (CUDA sync debug mode only)"}]
    config = heads.get_config(cfg["head_config"])
    inp = heads.make_inputs(config, torch.bfloat16, "cuda")
    hidden, weight, bias, targets, seq_index = head_problem(1024, 768, config.hidden, config.vocab,
                                                            torch.bfloat16, "cuda", seed=5)
    hidden.requires_grad_()

    def head(mode):
        logps, _ = linear_sequence_logps(hidden, weight, bias, targets, seq_index, 8, head_mode=mode)
        logps.sum().backward()

    def public_loss():
        fastdpo.loss(hidden=inp.hidden, weight=inp.weight, ref_hidden=inp.ref_hidden, ref_weight=inp.ref_weight,
                     labels=inp.labels).loss.backward()

    calls = {f"linear_sequence_logps fwd + bwd, head_mode={m}": (lambda m=m: head(m)) for m in ("auto",) + MODES}
    calls["fastdpo.loss fwd + bwd (policy + reference)"] = public_loss
    rows = []
    for name, fn in calls.items():
        fn()  # warm-up: compilation and allocator growth are not per-step syncs
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        rows.append({"what": name, "host_syncs": len(syncs)})
    return rows


def packed_attention(cfg):
    """fastdpo.attention's packed path (CUDA: one varlen call per layer; CPU: per-segment SDPA) against SDPA with
    the dense [R, 1, T, T] mask on the same shared-layout batch (8 pairs, UltraFeedback-like lengths; GQA), plain,
    with a sliding window and with a softcap (flash-attn only): outputs and q/k/v gradients, and fwd + bwd times."""
    import torch
    import torch.nn.functional as F
    from fastdpo.attention import attention_work, bool_mask, segment_plan, segment_varlen, varlen_kernel
    from fastdpo.packing import pack_pairs

    device, smoke = cfg["device"], cfg["device"] == "cpu"
    prompt, response, heads, kv_heads, head_dim = (12, 20, 4, 2, 16) if smoke else (168, 400, 32, 8, 128)
    dtype = torch.float32 if smoke else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    lengths = lambda n: [int(v) for v in torch.randint(n // 2, 3 * n // 2, (8,), generator=g)]  # noqa: E731
    batch = pack_pairs([[1] * n for n in lengths(prompt)], [[2] * n for n in lengths(response)],
                       [[3] * n for n in lengths(response)], shared_prompt=True)
    plan = segment_plan(batch, device)
    R, T = batch.input_ids.shape
    q, k, v = (torch.randn(R * T, h, head_dim, generator=g).to(device, dtype).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    upstream = torch.randn(R * T, heads, head_dim, generator=g).to(device, dtype)
    kernel = varlen_kernel(torch.device(device))
    name = "per-segment SDPA" if kernel is None else kernel.__name__.strip("_").replace("_kernel", "")
    rows = []
    for window, softcap in ((None, None), (256 if not smoke else 8, None), (None, 30.0)):
        if softcap is not None and (kernel is None or "torch" in name):
            rows.append({"path": name, "window": window, "softcap": softcap, "ok": None,
                         "note": "softcap needs flash-attn's flash_attn_varlen_func (not installed)"})
            continue

        def dense():  # [R, 1, T, T] mask; softcap case in float32 math (SDPA has no score transform)
            mask = bool_mask(batch.to(device), window)
            qd, kd, vd = (x.view(R, T, -1, head_dim).transpose(1, 2) for x in (q, k, v))
            kd, vd = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (kd, vd))
            if softcap is None:
                out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)
            else:
                s = (qd.float() @ kd.float().transpose(-1, -2)) * head_dim ** -0.5
                s = (softcap * torch.tanh(s / softcap)).masked_fill(~mask, float("-inf"))
                out = (s.softmax(-1) @ vd.float()).to(dtype)
            return out.transpose(1, 2).reshape(R * T, heads, head_dim)

        def packed():
            return segment_varlen(q, k, v, plan, window=window, softcap=softcap)

        results = {}
        for label, fn in (("dense", dense), ("packed", packed)):
            for x in (q, k, v):
                x.grad = None
            out = fn()
            out.backward(upstream)
            results[label] = [out.detach().float()] + [x.grad.float() for x in (q, k, v)]
        errors = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                  for a, b in zip(results["packed"], results["dense"])]
        step = lambda fn: lambda: fn().backward(upstream)  # noqa: E731
        dense_ms = time_ms(step(dense), device, cfg["repeats"])
        packed_ms = time_ms(step(packed), device, cfg["repeats"])
        work = attention_work(plan, window)
        rows.append({"path": name, "window": window, "softcap": softcap, "rows x T": f"{R} x {T}",
                     "rel_err out/dq/dk/dv": "/".join(f"{e:.1e}" for e in errors),
                     "ok": max(errors) < (1e-5 if smoke else 2e-2), "dense_ms": dense_ms, "packed_ms": packed_ms,
                     "speedup": dense_ms / packed_ms, "entries dense/segments": work["dense_mask"] / work["segments"]})
    return rows


def main(argv=None):
    args = parse_args(argv)
    setup(args.smoke)
    import torch
    cfg = {**(SMOKE if args.smoke else FULL), "backend": args.backend}
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --smoke for the CPU end-to-end run)")
    report = Report(args.out_dir, args.smoke)
    report.run("environment", environment, cfg, args.smoke)
    for name, fn in (("ceilings", ceilings), ("correctness", correctness), ("determinism", determinism),
                     ("kernels", kernels), ("head_step", head_step), ("host_syncs", host_syncs),
                     ("packed_attention", packed_attention)):
        report.run(name, fn, cfg)
    print(f"[gpu_check] wrote {args.out_dir}/gpu_check.json and .md; failures: {report.failed or 'none'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
