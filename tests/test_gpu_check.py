"""scripts/gpu_check.py: --smoke end to end on CPU (Triton interpreter, tiny shapes, torch's default device "meta"
so that a tensor made without device= fails: the device-independence of every section), and the supervisor's
one-shot guarantees (a raising, crashing or hung row costs only itself; the deadline skips what is left)."""
import argparse
import json
import os
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_check  # noqa: E402

SECTIONS = ["environment", "compile_warmup", "ceilings", "anchor", "head_modes", "head_step", "kernels", "host_syncs",
            "correctness", "large_index", "nan_logits", "determinism", "packed_attention", "cuda_graph"]


def test_gpu_check_smoke_writes_every_section_and_passes(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, str(tmp_path), "--smoke"], capture_output=True, text=True,
                            timeout=900, cwd=tmp_path)  # from elsewhere than the root: no import relies on the cwd
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["smoke"] is True and report["failed"] == []
    sections = report["sections"]
    assert list(sections) == SECTIONS == [name for name, _ in gpu_check.SECTIONS]
    environment = sections["environment"][0]
    assert environment["default_device"] == "meta" and environment["mode"].startswith("smoke")
    # imported from this checkout through setup.py's package_dir mapping, whether installed or not
    assert environment["fastdpo"] == os.path.join(ROOT, "fastdpo")
    assert environment["fastdpo.kernels"] == os.path.join(ROOT, "kernels")
    warmup = sections["compile_warmup"][0]
    assert warmup["warmed"] == warmup["rows"] > 0 and warmup["errors"] == "-"
    checks = [row for row in sections["correctness"] if row["ok"] is not None]
    assert {row["mode"] for row in checks} == {"logits", "stored", "recompute", "fused"}
    assert {row["V"] for row in checks} == {64, 131, 257} and len(checks) == 32 and all(row["ok"] for row in checks)
    bf16 = [row for row in checks if row["dtype"] == "bf16"]
    assert all(row["tol"]["logps"] == gpu_check.BF16_LOGPS_TOL < 1e-2 for row in bf16)
    assert all(row["tol"]["grad_weight_l2"] < 1e-2 for row in bf16)  # 3x the bf16 rounding of the answer
    assert all(row["ms"] > 0 for name in ("anchor", "head_modes", "kernels") for row in sections[name]
               if row["status"] == "ok")
    steps = {row["row"]: row for row in sections["head_step"]}
    for mode in ("auto", "stored", "recompute", "fused"):
        assert steps[f"fastdpo head_mode={mode}"]["loss_rel_err_vs_float64"] < 1e-2
    assert all(row["ok"] for name in ("large_index", "nan_logits", "determinism") for row in sections[name])
    assert sum(1 for line in (tmp_path / "rows.jsonl").read_text().splitlines()
               if json.loads(line)["event"] == "start") == sum(len(rows) for rows in sections.values())
    assert [row["ok"] for row in sections["packed_attention"]] == [True, True, None]  # CPU: no softcap kernel
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "These are not GPU numbers" in markdown and all(f"## {name}" in markdown for name in SECTIONS)


TROUBLE = """
    import os, sys, time
    sys.path.insert(0, {scripts!r})
    import gpu_check

    ROWS = {{"raises": lambda: 1 / 0, "fine": lambda: {{"status": "ok", "value": 1.0}}, "dies": lambda: os._exit(7),
            "hangs": lambda: time.sleep(120), "after": lambda: {{"status": "ok", "value": 2.0}}}}
    gpu_check.SECTIONS = [("trouble", lambda cfg: [(name, ROWS[name]) for name in {rows!r}])]
    gpu_check.DEADLINE_GRACE_S = 3
    sys.exit(gpu_check.main())
"""


def run_trouble(tmp_path, rows, *options):
    """Run gpu_check's supervisor over a section of the given TROUBLE rows; -> (exit status, {row: result})."""
    program = tmp_path / "trouble.py"
    program.write_text(textwrap.dedent(TROUBLE.format(scripts=os.path.join(ROOT, "scripts"), rows=rows)))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(program), str(out), "--smoke", *options], capture_output=True,
                            text=True, timeout=300)
    report = json.loads((out / "gpu_check.json").read_text())
    return result.returncode, {row["row"]: row for row in report["sections"]["trouble"]}


def test_supervisor_records_raising_crashing_and_hung_rows_and_goes_on(tmp_path):
    status, rows = run_trouble(tmp_path, ["raises", "fine", "dies", "hangs", "after"], "--row-timeout-s", "3")
    assert status == 1 and list(rows) == ["raises", "fine", "dies", "hangs", "after"]
    assert rows["raises"]["status"].startswith("error") and "ZeroDivisionError" in rows["raises"]["status"]
    assert rows["fine"]["value"] == 1.0 and rows["after"]["value"] == 2.0
    assert rows["dies"]["status"] == "crashed: process exit status 7"
    assert rows["hangs"]["status"] == "crashed: hung: killed after --row-timeout-s=3"


def test_supervisor_kills_a_row_running_past_the_deadline_and_records_the_rest_as_skipped(tmp_path):
    start = time.time()
    status, rows = run_trouble(tmp_path, ["hangs", "fine"], "--budget-s", "12")
    assert status == 1 and time.time() - start < 60
    assert rows["hangs"]["status"] == "crashed: killed: past the --budget-s deadline"
    assert rows["fine"]["status"] == "skipped: past the --budget-s deadline"


def test_rows_past_the_deadline_are_recorded_as_skipped_and_recorded_rows_are_not_rerun(tmp_path, monkeypatch):
    calls = []
    section = lambda cfg: [(name, lambda name=name: calls.append(name) or {"status": "ok"}) for name in "abc"]
    monkeypatch.setattr(gpu_check, "SECTIONS", [("s", section)])
    args = argparse.Namespace(out_dir=str(tmp_path))
    cfg = {"smoke": False, "device": "cpu", "only": None, "deadline": time.time() + 600}
    gpu_check.append_line(args.out_dir, {"event": "row", "section": "s", "row": "a", "status": "ok"})
    assert gpu_check.run_child(args, cfg) == 0 and calls == ["b", "c"]  # "a" was recorded before: not rerun
    (tmp_path / gpu_check.ROWS_FILE).unlink()
    assert gpu_check.run_child(args, {**cfg, "deadline": time.time() - 1}) == 0 and calls == ["b", "c"]
    rows = gpu_check.finished_rows(gpu_check.read_lines(args.out_dir))
    assert [row["status"] for row in rows.values()] == ["skipped: past the --budget-s deadline"] * 3
    assert len(gpu_check.failures(list(rows.values()))) == 3


def test_the_gpu_configuration_lists_unique_rows_in_every_section():
    """The sections of the CUDA run enumerate their rows without touching the device (compile_warmup lists them
    too), and row names are unique within a section: rows.jsonl keys on (section, row)."""
    gpu_check.import_paths()
    cfg = {**gpu_check.config(smoke=False, backend="triton"), "only": None, "deadline": time.time() + 600}
    assert cfg["device"] == "cuda" and cfg["anchor_tokens"] * cfg["vocab"] * cfg["hidden"] == 4096 * 128256 * 4096
    assert cfg["large_rows"] * cfg["vocab"] > 2 ** 31
    for name, section in gpu_check.SECTIONS:
        names = [row_name for row_name, _ in section(cfg)]
        assert names and len(names) == len(set(names)), name
