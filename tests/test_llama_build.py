"""runtime/llama_build.py: the llama-cpp-python build this machine gets, checked with the real compiler.

The AMX cases plan for a Sapphire Rapids CPU (`march="sapphirerapids"`), so they run on any x86-64
machine whose compiler knows that target; what they check is what the compiler does, not a mock.
"""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

import pytest

from recover_lora.runtime import llama_build
from recover_lora.runtime.llama_build import AMX_OFF_FLAGS, PROBE_SOURCE, amx_config_survives, compiler, native_macros, plan_build

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AMX is an x86-64 extension")
# What a compiler that models the whole 64-byte operand of ldtilecfg emits (GCC's builtin-based intrinsic, clang).
WHOLE_CONFIG_LOAD = '__asm__ volatile ("ldtilecfg %0" :: "m" (*(const tile_config *) &tc));'


def _header_declares_eight_bytes(cxx: str) -> bool:
    """Independent evidence: the compiler's own amxtileintrin.h loads the config through a `const void **` operand."""
    done = subprocess.run([cxx, "-mamx-tile", "-E", "-x", "c++", "-"], input="#include <immintrin.h>\n", capture_output=True, text=True)
    body = re.search(r"_tile_loadconfig\s*\(const void \*__config\)\s*\{([^}]*)\}", done.stdout)
    return bool(body) and "(const void **)" in body.group(1)


def test_the_probe_tells_a_dropped_config_from_a_kept_one():
    cxx = compiler()
    if amx_config_survives(cxx) is None:
        pytest.skip(f"{cxx} cannot target AMX")
    # The same stores, loaded by an asm that names all 64 bytes: kept by every optimiser.
    assert amx_config_survives(cxx, PROBE_SOURCE.replace("_tile_loadconfig(&tc);", WHOLE_CONFIG_LOAD)) is True
    # The compiler's own intrinsic: dropped exactly when its header declares an 8-byte operand.
    assert amx_config_survives(cxx) is (not _header_declares_eight_bytes(cxx))


def test_an_amx_cpu_gets_amx_left_out_exactly_where_the_compiler_drops_the_config():
    cxx = compiler()
    if amx_config_survives(cxx) is None:
        pytest.skip(f"{cxx} cannot target AMX")
    plan = plan_build(version="0.3.36", cxx=cxx, user_cmake_args="-DGGML_BLAS=OFF", march="sapphirerapids")
    assert plan.native_target_has_amx
    assert plan.cmake_args.startswith("-DGGML_BLAS=OFF")  # the user's own arguments come first and stay
    broken = not amx_config_survives(cxx)
    assert (AMX_OFF_FLAGS in plan.cmake_args) is broken
    assert plan.amx_in_build is (not broken)
    assert bool(plan.reasons) is broken


def test_the_amx_off_flags_win_over_march_native_as_cmake_orders_them():
    # CMake puts CMAKE_CXX_FLAGS before ggml's -march=native: the -mno-amx-* must still hold then.
    cxx = compiler()
    if not any("__AMX_TILE__" in m for m in native_macros(cxx, "sapphirerapids")):
        pytest.skip(f"{cxx} does not know the sapphirerapids target")
    done = subprocess.run([cxx, *AMX_OFF_FLAGS.split(), "-march=sapphirerapids", "-dM", "-E", "-x", "c++", "/dev/null"],
                          capture_output=True, text=True, check=True)
    assert "__AMX_INT8__" not in done.stdout and "__AMX_TILE__" not in done.stdout  # ggml's AMX code is under these
    assert "__AVX512VNNI__" in done.stdout  # the AVX-512 kernels stay


def test_the_key_follows_the_cpu_the_arguments_and_the_version():
    cxx = compiler()
    key = lambda **kw: plan_build(**{"version": "0.3.36", "cxx": cxx, "user_cmake_args": "", **kw}).key  # noqa: E731
    assert key(march="x86-64-v3") == key(march="x86-64-v3")
    assert key(march="x86-64-v3") != key(march="x86-64-v2")  # an AVX2 build is never reused on a CPU without it
    assert key(march="x86-64-v3") != key(march="x86-64-v3", user_cmake_args="-DGGML_VULKAN=ON")
    assert key(march="x86-64-v3") != key(march="x86-64-v3", version="0.3.35")


def test_a_kept_wheel_is_reused_without_a_build(tmp_path, monkeypatch):
    monkeypatch.setenv("RECOVER_LORA_CACHE", str(tmp_path))
    plan = plan_build(version="0.3.36", user_cmake_args="")
    folder = llama_build.wheel_dir(plan)
    folder.mkdir(parents=True)
    wheel = folder / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    wheel.write_bytes(b"kept")
    assert llama_build.build_wheel(plan, python="/nonexistent/python") == wheel  # pip is never called


def test_the_version_built_is_the_one_pyproject_pins():
    pyproject = Path(llama_build.__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    assert re.fullmatch(r"\d+\.\d+\.\d+", llama_build.pinned_version(pyproject))
