"""A native crash inside a test (llama.cpp's AMX segfault, say) fails that test by name; the run goes on.

Runs pytest in a child on a file whose middle test segfaults, with this project's own pytest settings
(pyproject.toml's addopts: xdist workers), as `make test` runs them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
CRASHING = """\
import ctypes

def test_before():
    pass

def test_native_crash():
    ctypes.string_at(0)  # a read of address 0 in C: SIGSEGV, as inside ggml_backend_amx_mul_mat

def test_after():
    pass
"""


def test_a_segfault_fails_one_named_test_and_the_rest_run(tmp_path):
    if not PYPROJECT.is_file():
        pytest.skip("not a source checkout")
    (tmp_path / "test_crashing.py").write_text(CRASHING)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(PYPROJECT), "--rootdir", str(tmp_path), "-p", "no:cacheprovider",
         "-q", str(tmp_path / "test_crashing.py")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, stdin=subprocess.DEVNULL,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out  # tests failed: not 139 (the runner itself killed) nor 0
    assert re.search(r"FAILED .*test_crashing\.py::test_native_crash", out), out
    assert re.search(r"1 failed, 2 passed", out), out
