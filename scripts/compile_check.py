"""Compile every fastdpo Triton kernel ahead of time for sm_80 and sm_90, no GPU needed.

    python scripts/compile_check.py [--json PATH]

For each kernel variant in each module's AOT_SPECS (fp32 and bf16 inputs; with and without logit
transforms; row forward with and without write_grad; fused head with fp32 "ieee" and "tf32" dots and bf16,
at the shipped block sizes) it builds PTX and cubin with triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32)) and prints registers per thread and spill stores/loads (from the log of
the ptxas run Triton itself makes, in a fresh cache so that ptxas does run), shared memory, and the number
of 16-byte global loads/stores in the PTX (vectorised access). Exits 1 if anything spills or fails to
compile.
"""
import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile real kernels even when the test session interprets them
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastdpo-aot-")  # cached builds skip ptxas

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# by module path: fastdpo.kernels re-exports launcher functions under some of the same names
MODULES = [importlib.import_module(f"fastdpo.kernels.{name}") for name in ("sequence_logps", "segment_sum", "linear_logps")]
ARCHS = (80, 90)
VECTOR16 = re.compile(r"\b(?:ld|st)\.global(?:\.\w+)*\.v4\.(?:b32|f32|u32|s32)\b")  # 4 x 32 bit = 16 bytes


def compile_with_ptxas_log(source, cc, options):
    """(compiled kernel, registers, spill_stores, spill_loads), read from Triton's own `ptxas -v` log."""
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)
    text = log.getvalue()
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text).groups())
    return compiled, registers, stores, loads


def compile_all():
    rows = []
    for module in MODULES:
        for spec in module.AOT_SPECS:
            # the specialisation the JIT makes at run time: 16-byte aligned pointers, integers divisible by 16
            divisible = {(spec["fn"].arg_names.index(name),): [["tt.divisibility", 16]]
                         for name in spec.get("divisible", ())}
            source = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                               attrs=divisible)
            options = {"num_warps": spec["num_warps"], "num_stages": spec.get("num_stages", 3)}
            for cc in ARCHS:
                compiled, registers, stores, loads = compile_with_ptxas_log(source, cc, options)
                rows.append({"kernel": spec["name"], "arch": f"sm_{cc}", "num_warps": options["num_warps"],
                             "registers": registers, "spill_stores": stores, "spill_loads": loads,
                             "shared_bytes": compiled.metadata.shared,
                             "vector16_ldst": len(VECTOR16.findall(compiled.asm["ptx"])),
                             "constexprs": {k: v for k, v in spec["constexprs"].items()}})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the table as JSON to this path")
    args = parser.parse_args()
    rows = compile_all()
    print(f"triton {triton.__version__}")
    print("| kernel | arch | warps | regs/thread | spill st/ld (B) | shared (B) | 16-B ld/st | blocks |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        blocks = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith("BLOCK"))
        print(f"| {r['kernel']} | {r['arch']} | {r['num_warps']} | {r['registers']} | "
              f"{r['spill_stores']}/{r['spill_loads']} | {r['shared_bytes']} | {r['vector16_ldst']} | {blocks} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    spilled = [r["kernel"] + "@" + r["arch"] for r in rows if r["spill_stores"] or r["spill_loads"]]
    if spilled:
        print("SPILLS in: " + ", ".join(spilled))
        return 1
    print(f"{len(rows)} kernel builds, 0 spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
