"""Compile every fastdpo Triton kernel ahead of time for sm_80 and sm_90, no GPU needed.

    python scripts/compile_check.py [--json PATH]

For each kernel in each module's AOT_SPECS (fp32 and bf16 inputs at the shipped block sizes) it builds
PTX and cubin with triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)) and prints registers
per thread, spill stores/loads (ptxas -v) and static + dynamic shared memory. Exits 1 if anything spills
or fails to compile.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile real kernels even when the test session interprets them
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastdpo.kernels import linear_logps, segment_sum, sequence_logps  # noqa: E402

MODULES = (sequence_logps, segment_sum, linear_logps)
ARCHS = (80, 90)


def ptxas_usage(ptx, cc):
    """(registers, spill_stores, spill_loads) from `ptxas -v` (the ptxas Triton itself uses for `cc`)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
    result = subprocess.run([get_ptxas(cc).path, "-v", f"--gpu-name={arch}", f.name,
                             "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    if result.returncode:
        raise RuntimeError(result.stderr)
    info = result.stderr
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info).groups())
    return registers, stores, loads


def compile_all():
    rows = []
    for module in MODULES:
        for spec in module.AOT_SPECS:
            source = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"])
            options = {"num_warps": spec["num_warps"], "num_stages": spec.get("num_stages", 3)}
            for cc in ARCHS:
                compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)
                registers, stores, loads = ptxas_usage(compiled.asm["ptx"], cc)
                rows.append({"kernel": spec["name"], "arch": f"sm_{cc}", "num_warps": options["num_warps"],
                             "registers": registers, "spill_stores": stores, "spill_loads": loads,
                             "shared_bytes": compiled.metadata.shared,
                             "constexprs": {k: v for k, v in spec["constexprs"].items()}})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the table as JSON to this path")
    args = parser.parse_args()
    rows = compile_all()
    print(f"triton {triton.__version__}")
    print("| kernel | arch | warps | regs/thread | spill st/ld (B) | shared (B) | blocks |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        blocks = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith("BLOCK"))
        print(f"| {r['kernel']} | {r['arch']} | {r['num_warps']} | {r['registers']} | "
              f"{r['spill_stores']}/{r['spill_loads']} | {r['shared_bytes']} | {blocks} |")
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
