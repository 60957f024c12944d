"""The repository's kernels/ folder ships as fastdpo.kernels and never shadows Hugging Face's `kernels` package
(which transformers imports) when Python runs in the repository root."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_repository_root(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_root_on_sys_path_imports_transformers_and_fastdpo_kernels():
    res = run_in_repository_root("-c", "import transformers.activations, fastdpo.kernels, kernels, os; "
                                 "print(os.path.realpath(kernels.__file__)); print(fastdpo.kernels.segment_sum)")
    assert res.returncode == 0, res.stderr[-3000:]
    top_level_kernels = res.stdout.splitlines()[0]
    assert not top_level_kernels.startswith(os.path.realpath(REPO) + os.sep), top_level_kernels


def test_top_level_kernels_is_missing_when_not_installed():
    """-S leaves site-packages (and the installed `kernels`) off sys.path: only the repository's folder is left."""
    res = run_in_repository_root("-S", "-c", f"import sys; sys.path.insert(0, {REPO!r}); import kernels")
    assert "ModuleNotFoundError: No module named 'kernels'" in res.stderr, res.stderr[-3000:]


def test_python_m_pytest_collects_from_the_root():
    res = run_in_repository_root("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "tests collected" in res.stdout, res.stdout[-2000:]
