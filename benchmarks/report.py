"""Markdown tables, results.json and PNG charts from the collected benchmark results.

`results` (what run.py collects and results.json stores):
  env: machine/version facts
  heads: {"dtype", "configs": {name: HeadConfig.to_dict()}, "impls": {name: {"label", "group", "scores"}},
          "cells": {impl: {config: worker result}}, "reference": {config: {"loss"}}}
  e2e: {"datasets": {dataset: worker result with "layouts"}}
  roofline: roofline.projection(); roofline_measured (CUDA only): {impl: {config: achieved figures}}
"""
from __future__ import annotations

import json
import os

from e2e import LAYOUT_LABELS, LAYOUTS
from heads import module_missing

BASELINE = "full_logits"


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _fmt(x):
    """ms or MB: three significant digits below 10, whole numbers above."""
    return f"{x:.3g}" if x < 10 else f"{x:.0f}"


def _rel_diff(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def _ok(cell):
    return cell is not None and cell.get("status") == "ok"


# ------------------------------------------------------------------------------------------------------
# loss head
def head_cells(heads):
    return heads.get("cells", {})


def rel_err(cell, ref):
    if not _ok(cell) or ref is None or "loss" not in ref:
        return None
    return _rel_diff(cell["loss"], ref["loss"])


def _spread(cell):
    """'(min-max)' of a cell's per-round medians, when it has more than one round."""
    if cell.get("rounds", 1) < 2:
        return ""
    return f" ({_fmt(cell['ms_min'])}–{_fmt(cell['ms_max'])})"


def head_table(heads) -> str:
    configs = list(heads["configs"])
    cells = head_cells(heads)
    header = (["implementation", "LM head scores"] + [f"{c}: ms (min–max) / MB" for c in configs]
              + ["loss err vs fp64"])
    rows = []
    for name, meta in heads["impls"].items():
        row = [meta["label"], meta["scores"]]
        errs = []
        for c in configs:
            cell = cells.get(name, {}).get(c)
            if _ok(cell):
                row.append(f"{_fmt(cell['ms'])}{_spread(cell)} / {_fmt(cell['peak_mb'])}")
                e = rel_err(cell, heads.get("reference", {}).get(c))
                if e is not None:
                    errs.append(e)
            elif cell is None:
                row.append("—")
            else:
                row.append(cell.get("status", "?"))
        row.append(f"{max(errs):.1e}" if errs else "—")
        rows.append(row)
    return md_table(header, rows)


def best_peer(cells, config, key):
    """(impl, value) of the peer with the lowest `key` for `config`, or None."""
    best = None
    for name, per_cfg in cells.items():
        cell = per_cfg.get(config)
        if per_cfg.get("_group") != "peer" or not _ok(cell):
            continue
        if best is None or cell[key] < best[1]:
            best = (name, cell[key])
    return best


def within_noise(cell, peer) -> bool:
    """True when the larger round-to-round spread (max - min) of the two cells exceeds the gap between their
    medians: the ordering of the two is not a result of this run."""
    spread = max(cell.get("ms_max", cell["ms"]) - cell.get("ms_min", cell["ms"]),
                 peer.get("ms_max", peer["ms"]) - peer.get("ms_min", peer["ms"]))
    return spread > abs(cell["ms"] - peer["ms"])


def ratio_rows(heads) -> list[dict]:
    """fastdpo implementations against the baseline and the best peer of the same run, per config."""
    cells = {n: {**c, "_group": heads["impls"][n]["group"]} for n, c in head_cells(heads).items()
             if n in heads["impls"]}
    out = []
    for name, meta in heads["impls"].items():
        if meta["group"] != "fastdpo":
            continue
        for c in heads["configs"]:
            cell = cells.get(name, {}).get(c)
            if not _ok(cell):
                continue
            base = cells.get(BASELINE, {}).get(c)
            row = {"impl": name, "config": c}
            if _ok(base):
                row["time_vs_baseline"] = cell["ms"] / base["ms"]
                row["mem_vs_baseline"] = cell["peak_mb"] / max(base["peak_mb"], 1e-9)
            fast, lean = best_peer(cells, c, "ms"), best_peer(cells, c, "peak_mb")
            if fast:
                row["fastest_peer"], row["time_vs_fastest_peer"] = fast[0], cell["ms"] / fast[1]
                row["within_noise"] = within_noise(cell, cells[fast[0]][c])
            if lean:
                row["leanest_peer"], row["mem_vs_leanest_peer"] = lean[0], cell["peak_mb"] / max(lean[1], 1e-9)
            out.append(row)
    return out


def ratio_table(heads) -> str:
    rows = []
    x = lambda v: "—" if v is None else f"{v:.2f}x"  # noqa: E731
    for r in ratio_rows(heads):
        rows.append([r["impl"], r["config"], x(r.get("time_vs_baseline")), x(r.get("mem_vs_baseline")),
                     f"{x(r.get('time_vs_fastest_peer'))} ({r.get('fastest_peer', '—')})"
                     + (", within noise" if r.get("within_noise") else ""),
                     f"{x(r.get('mem_vs_leanest_peer'))} ({r.get('leanest_peer', '—')})"])
    return md_table(["fastdpo", "config", "time / baseline", "memory / baseline", "time / fastest peer",
                     "memory / leanest peer"], rows)


def loss_error_table(heads) -> str:
    """Per config: the loss error of fastdpo and the baseline against float64, and what summing the float64
    per-token log-probs per sequence costs alone, by fastdpo's segment_sum and by fp32 torch.sum."""
    refs, cells = heads.get("reference", {}), head_cells(heads)
    e = lambda v: "—" if v is None else f"{v:.1e}"  # noqa: E731
    rows = []
    for c, ref in refs.items():
        if "loss_segment_sum_fp32" not in ref:
            continue
        rows.append([c, f"{ref['loss']:.6g}", e(rel_err(cells.get("fastdpo", {}).get(c), ref)),
                     e(rel_err(cells.get(BASELINE, {}).get(c), ref)),
                     e(_rel_diff(ref["loss_segment_sum_fp32"], ref["loss"])),
                     e(_rel_diff(ref["loss_torch_sum_fp32"], ref["loss"]))])
    if not rows:
        return ""
    return md_table(["config", "float64 loss", "fastdpo", "baseline", "fp64 log-probs as fp32, fastdpo segment_sum",
                     "fp64 log-probs, fp32 torch.sum"], rows)


def notes(heads) -> list[str]:
    out = []
    for name, meta in heads["impls"].items():
        seen = set()
        for c, cell in head_cells(heads).get(name, {}).items():
            if cell and cell.get("status") != "ok" and cell.get("note") and cell["note"] not in seen:
                seen.add(cell["note"])
                out.append(f"- {meta['label']}: {cell['status']}: {cell['note']}")
    return out


# ------------------------------------------------------------------------------------------------------
# end to end
def e2e_table(e2e) -> str:
    """One row per data set x layout; ratios against the run's baseline layout (TRL's own training_step)."""
    rows = []
    for ds, res in e2e.get("datasets", {}).items():
        if not _ok(res):
            rows.append([ds, "—", res.get("status", "?"), res.get("note", ""), "", "", "", "", "", ""])
            continue
        base_name = res.get("baseline", "trl")
        base = res["layouts"].get(base_name)
        for layout in LAYOUTS:
            r = res["layouts"].get(layout)
            if r is None:
                continue
            if not _ok(r):
                rows.append([ds, layout, r.get("status"), r.get("note", ""), "", "", "", "", "", ""])
                continue
            times = r.get("times_ms") or [r["ms"]]
            spread = f"{_fmt(min(times))}–{_fmt(max(times))}"
            ratio = f"{r['ms'] / base['ms']:.2f}x / {r['peak_mb'] / max(base['peak_mb'], 1e-9):.2f}x" if _ok(base) else "—"
            err = f"{_rel_diff(r['loss'], base['loss']):.1e}" if _ok(base) else "—"
            attn = f"{r['attention_gflop']:.2f}" if "attention_gflop" in r else "—"
            if "attention_gflop_dense_mask" in r:
                attn += f" ({r['attention_gflop_dense_mask']:.2f})"
            rows.append([ds, layout, f"{_fmt(r['ms'])} ({spread})", f"{r['peak_mb']:.0f}", f"{r['tokens_per_s']:.0f}",
                         f"{r['computed_tokens']} ({r['computed_tokens'] / res['data_tokens']:.2f})", attn, ratio, err,
                         len(times)])
    return md_table(["data set", "layout", "ms / step (min–max)", "peak MB", "tokens/s", "tokens computed (/ data)",
                     "attention GFLOP / step (dense mask)", "time / memory vs TRL", "loss diff vs TRL", "rounds"], rows)


def e2e_shapes(e2e) -> str:
    rows = []
    for ds, res in e2e.get("datasets", {}).items():
        if _ok(res):
            rows.append([ds, res["pairs"], f"{res['mean_prompt']:.0f}", f"{res['mean_response']:.0f}",
                         f"{res['mean_prompt'] / max(res['mean_response'], 1e-9):.2f}", res["data_tokens"]])
    return md_table(["data set", "pairs / step", "mean prompt", "mean response", "prompt:response",
                     "data tokens / step"], rows)


# ------------------------------------------------------------------------------------------------------
# roofline
def roofline_tables(proj) -> str:
    s, gpu = proj["shape"], proj["gpu"]
    head = (f"Projection for {gpu['name']} ({gpu['bw'] / 1e12:.2f} TB/s HBM, {gpu['flops'] / 1e12:.0f} TFLOP/s dense "
            f"bf16), Llama-3-8B LM head (D = {s['hidden']}, V = {s['vocab']}), bf16 inputs; one DPO loss-head step "
            f"= {s['pairs']} pairs x {s['n_all'] // (2 * s['pairs'])} tokens ({s['n_all']} positions, "
            f"{s['n_completion']} with a target).")
    rows = []
    for r in proj["algorithms"]:
        t = r["per_token"]
        rows.append([r["label"], r["scores"], f"{t['policy_fwd_mflop']:.0f} / {t['policy_fwd_kb']:.0f}",
                     f"{t['policy_bwd_mflop']:.0f} / {t['policy_bwd_kb']:.0f}",
                     f"{t['ref_fwd_mflop']:.0f} / {t['ref_fwd_kb']:.0f}",
                     f"{r['gflop'] / 1e3:.1f}", f"{r['gb']:.1f}", f"{r['compute_ms']:.1f}", f"{r['memory_ms']:.1f}",
                     f"**{r['floor_ms']:.1f}** ({r['bound']})",
                     f"{r['tile_memory_ms']:.0f}" if r["tile_gb"] > r["gb"] * 1.01 else "—"])
    algo = md_table(["algorithm", "positions through the head", "policy fwd MFLOP / KB per position",
                     "policy bwd MFLOP / KB", "ref fwd MFLOP / KB", "TFLOP / step", "GB / step", "compute ms",
                     "memory ms", "floor ms", "tile-level memory ms (no L2 reuse)"], rows)
    krows = [[k["kernel"], f"{k['mflop_per_token']:.0f}", f"{k['kb_per_token']:.0f}", f"{k['tile_kb_per_token']:.0f}",
              f"{k['floor_us_per_1k_tokens']:.0f}", f"{k['tile_us_per_1k_tokens']:.0f}", k["bound"]]
             for k in proj["kernels"]]
    kern = md_table(["fastdpo kernel", "MFLOP / token", "KB / token (compulsory)", "KB / token (tile loads)",
                     "floor µs / 1k tokens", "tile-level µs / 1k tokens", "bound (compulsory)"], krows)
    return "\n\n".join([head, algo, "Per fastdpo kernel, per token it processes (same step):", kern])


def anchor_table(anchor) -> str:
    a, gpu = anchor["anchor"], anchor["gpu"]
    rows = [[r["algorithm"], r["variant"], f"{r['vd_per_token']:.0f}", f"{r['gb']:.1f}", f"{r['floor_ms']:.1f}",
             f"{r['cublas_gemm_ms']:.1f}", f"{r['other_gb']:.1f}",
             f"{r['projected_ms'][0]:.1f}-{r['projected_ms'][1]:.1f}"] for r in anchor["modes"]]
    head = (f"Projection, not measured. Policy LM head forward + backward (no reference), {a['tokens']} tokens, "
            f"D = {a['hidden']}, V = {a['vocab']}, bf16, {gpu['name']} ({gpu['bw'] / 1e12:.1f} TB/s datasheet, "
            f"{gpu['copy_bw'] / 1e12:.1f} measured copy; {gpu['flops'] / 1e12:.0f} TFLOP/s bf16 measured). Each mode "
            f"at cuBLAS's rate at these shapes: the source of the anchor (Liger-Kernel PR #1356) timed the three "
            f"cuBLAS GEMMs alone at {a['cublas_3_gemms_ms']} ms ({anchor['cublas_tflops']:.0f} TFLOP/s), plus the "
            f"other passes' bytes at HBM bandwidth. Anchor: QuACK {a['quack_ms']} ms ({anchor['quack_tflops']:.0f} "
            f"TFLOP/s on 6VD). today: the code at issue 17's start; fixed: fp32 logits, no grad_weight round trip.")
    return head + "\n\n" + md_table(["fastdpo head mode", "variant", "FLOPs per token (x V·D)", "GB (compulsory)",
                                      "floor ms", "GEMMs at cuBLAS's rate, ms", "other passes GB",
                                      "projected ms (4.8-4.3 TB/s)"], rows)


def measured_roofline_table(measured) -> str:
    rows = []
    for impl, per_cfg in measured.items():
        for c, m in per_cfg.items():
            rows.append([impl, c, f"{m['gbps']:.0f} / {m['peak_gbps']:.0f}", f"{m['tflops']:.1f} / {m['peak_tflops']:.0f}",
                         f"{m['floor_ms']:.3g}", f"{100 * m['of_roofline']:.0f}%"])
    return md_table(["implementation", "config", "achieved GB/s / peak", "achieved TFLOP/s / peak",
                     "roofline floor ms", "of roofline"], rows)


# ------------------------------------------------------------------------------------------------------
# whole report
def env_lines(env) -> list[str]:
    keys = ["date", "machine", "cpu", "cores", "gpu", "python", "torch", "threads", "transformers", "triton",
            "fastdpo", "commit", "trl", "liger-kernel", "cut-cross-entropy", "matplotlib", "load_before",
            "load_after", "wall_s"]
    return [f"- {k}: {env[k]}" for k in keys if env.get(k) not in (None, "")]


def markdown(results) -> str:
    env = results["env"]
    parts = ["# fastdpo benchmarks", "", *env_lines(env), ""]
    if env.get("warning"):
        parts += [f"> **{env['warning']}**", ""]
    heads = results.get("heads")
    if heads and heads.get("cells"):
        cfgs = "; ".join(f"{n} = {c['description']}" for n, c in heads["configs"].items())
        rounds = heads.get("rounds", 1)
        parts += [f"## DPO loss head ({heads['dtype']}, {env.get('device')})", "",
                  "One step = policy LM head forward + backward + reference head forward (no_grad), sigmoid loss, "
                  f"beta 0.1. Each cell: median ms over {rounds} interleaved round{'s' if rounds > 1 else ''} "
                  "(min–max of the per-round medians) / median peak extra memory MB; in each round every "
                  "implementation x config ran once in its own fresh process, in an order rotated every round. "
                  f"Configs: {cfgs}.", "",
                  f"Memory: {heads.get('memory_method', '')}, peak over warm-up and timed steps (after a tiny-shape "
                  "priming step, so lazy imports are not counted).", "",
                  head_table(heads), "",
                  "fastdpo scores only completion positions (labels = -100 on the prompt, by design); the peers "
                  "marked 'all' run the LM head on every position, prompt included, as they do in real use (same "
                  "loss: prompt labels are -100 for them too). 'loss err' = max relative difference of the loss from "
                  "float64 over the configs.", ""]
        rt = ratio_rows(heads)
        if rt:
            parts += ["Ratios (same run; < 1 is better for fastdpo; 'within noise': the round-to-round spread of "
                      "fastdpo or the fastest peer exceeds the gap between them, so the ordering is not a result):",
                      "", ratio_table(heads), ""]
        lt = loss_error_table(heads)
        if lt:
            parts += ["Loss error against float64 (relative), and where it comes from: the last two columns sum the "
                      "same float64 per-token log-probs, rounded to fp32, per sequence by fastdpo's segment_sum (the "
                      "PyTorch twin accumulates in float64; the Triton kernel lane-wise then as a tree) and by fp32 "
                      "torch.sum. A sequential fp32 sum loses ~4e-4 over 512 tokens (each rounding error scales "
                      "with the running sum, thousands of nats) and the DPO margin, a difference of differences of "
                      "such sums, amplifies it: the reason the twin's segment_sum accumulates in float64.", "",
                      lt, ""]
        n = notes(heads)
        if n:
            parts += ["Not measured:", "", *n, ""]
    if results.get("roofline_measured"):
        parts += ["## Measured against the roofline", "", measured_roofline_table(results["roofline_measured"]), ""]
    e2e = results.get("e2e")
    if e2e:
        parts += ["## End-to-end DPO training step", ""]
        if e2e.get("datasets"):
            pre = e2e.get("preset", {})
            parts += [f"Tiny Llama from config (vocab {pre.get('vocab')}, hidden {pre.get('hidden')}, "
                      f"{pre.get('layers')} layers, {pre.get('dtype')}, random init), one `training_step` (forward + "
                      "backward + reference forward, no optimizer update: every layout sees the same weights and "
                      "must give the same loss), layouts timed in interleaved rounds. Layouts: "
                      + "; ".join(f"`{k}` = {v}" for k, v in LAYOUT_LABELS.items()) + ". tokens/s counts the data "
                      "(prompt twice + chosen + rejected per pair); packing is collation (data preparation), not timed.", "",
                      e2e_shapes(e2e), "", e2e_table(e2e), ""]
    if results.get("roofline_anchor"):
        parts += ["## fastdpo head modes at the published H200 anchor (projection, not measured)", "",
                  anchor_table(results["roofline_anchor"]), ""]
    if results.get("roofline"):
        parts += ["## Roofline projection (H100, not measured)", "", roofline_tables(results["roofline"]), "",
                  "Compulsory bytes: each pass reads its operands once and writes its outputs once; tile-level: "
                  "what the fused kernels' tile loops load and store with no L2 reuse (weight re-read per token tile, "
                  "hidden per vocab tile, fp32 accumulators read-modify-written per inner tile), an upper bound. "
                  "CCE is counted dense (its gradient filter skips tiles). See benchmarks/roofline.py.", ""]
    if results.get("charts"):
        parts += ["## Charts", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in results["charts"]]
        parts.append("")
    if results.get("chart_note"):
        parts += [results["chart_note"], ""]
    return "\n".join(parts)


def write_json(results, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)


# ------------------------------------------------------------------------------------------------------
# charts
def charts(results, out_dir) -> tuple[list[str], str | None]:
    """PNG charts; returns (paths, note when matplotlib is missing)."""
    missing = module_missing("matplotlib", "pip install -e .[bench]")
    if missing:
        return [], f"Charts skipped: matplotlib {missing}."
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    paths = []
    heads = results.get("heads") or {}
    cells = head_cells(heads)
    if cells:
        count = {}
        for c in heads["configs"].values():
            count[c["vocab"]] = count.get(c["vocab"], 0) + 1
        # one panel per vocabulary size that has a curve (2+ configs); all of them when none has
        vocabs = sorted(v for v, n in count.items() if n > 1) or sorted(count)
        fig, axes = plt.subplots(1, len(vocabs), figsize=(7 * len(vocabs), 5.5), squeeze=False)
        for ax, V in zip(axes[0], vocabs):
            cfgs = sorted((c for c in heads["configs"].values() if c["vocab"] == V), key=lambda c: c["tokens"])
            for name, meta in heads["impls"].items():
                pts = [(c["tokens"], cells[name][c["name"]]["peak_mb"]) for c in cfgs
                       if _ok(cells.get(name, {}).get(c["name"]))]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=meta["label"],
                            linestyle="-" if meta["group"] == "fastdpo" else "--")
            ax.set_xlabel("tokens per step (2B sequences x length)")
            ax.set_ylabel("peak extra memory (MB)")
            ax.set_title(f"loss-head memory, V = {V} ({heads['dtype']}, {results['env'].get('device')})")
            ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.05 + 0.03 * ((len(labels) + 1) // 2), 1, 1))
        save(fig, "memory_vs_tokens.png")
    e2e = (results.get("e2e") or {}).get("datasets", {})
    if any(_ok(r) for r in e2e.values()):
        ds = [d for d, r in e2e.items() if _ok(r)]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / len(LAYOUTS)
        for i, layout in enumerate(LAYOUTS):
            vals = [e2e[d]["layouts"].get(layout, {}).get("pairs_per_s", 0) if _ok(e2e[d]["layouts"].get(layout))
                    else 0 for d in ds]
            ax.bar([k + i * width for k in range(len(ds))], vals, width, label=LAYOUT_LABELS[layout])
        ax.set_xticks([k + width * (len(LAYOUTS) - 1) / 2 for k in range(len(ds))], ds)
        ax.set_ylabel("pairs / s")
        ax.set_title(f"end-to-end DPO step throughput by layout ({results['env'].get('device')})")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        save(fig, "throughput_by_layout.png")
    return paths, None
