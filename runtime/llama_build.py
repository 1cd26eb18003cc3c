"""Build llama-cpp-python for this CPU and compiler, once, and install that build.

Why the project builds llama-cpp-python itself instead of `pip install llama-cpp-python`:

- llama-cpp-python compiles llama.cpp with `-march=native`. pip caches the wheel under a key that knows
  nothing about the CPU, so a wheel built on an AVX-512 machine is reused on an AVX2-only one (SIGILL),
  and one built before a fix is reused after it. Here the wheel is kept under a key made of the
  llama-cpp-python version, the CMake arguments and what `-march=native` means on this machine for
  this compiler (its predefined macros: the ISA extensions and the compiler version).
- On a CPU with AMX, `-march=native` compiles ggml's AMX matrix-multiplication kernels
  (ggml-cpu/amx/mmq.cpp). They load their tile configuration from a 64-byte struct on the stack
  with `_tile_loadconfig`. GCC up to at least 12 implements that intrinsic as inline assembly that
  declares an 8-byte memory operand, so the optimiser drops the stores of the rows and column
  widths before `ldtilecfg`: the kernels run on an empty tile configuration and every prompt batch
  (more than one row, so every decode after its prompt) faults inside `ggml_backend_amx_mul_mat`.
  `amx_config_survives` compiles the same pattern and reads the assembly; where the stores are
  gone, AMX is left out of the build (`-mno-amx-*`, which GCC honours before `-march=native`).
  ggml's other CPU kernels (AVX-512, and its weight repacking) stay. A compiler that keeps the
  stores keeps AMX.

This file runs before the package is installed (`make install` calls it with the system Python),
so it uses the standard library only.

    python3 runtime/llama_build.py key                       # the build key of this machine
    python3 runtime/llama_build.py install --python .venv/bin/python
    python3 runtime/llama_build.py show                      # what would be built, and why
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

PACKAGE = "llama-cpp-python"
# Written into the target environment's prefix after an install; runtime/ reads it back
# (records, self-test messages): which build is installed, and for which CPU.
BUILD_INFO_NAME = "recover-lora-llama-build.json"
CACHE_ENV = "RECOVER_LORA_CACHE"
AMX_OFF_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# Distinctive values for the tile-configuration probe: the rows of tile 0 and the bytes per row of tile 0.
_PROBE_ROWS, _PROBE_COLSB = 43, 58
PROBE_SOURCE = f"""
#include <immintrin.h>
struct tile_config {{ unsigned char palette_id, start_row, reserved[14]; unsigned short colsb[16]; unsigned char rows[16]; }};
void load_tile_config(void) {{
    alignas(64) tile_config tc = {{}};
    tc.palette_id = 1;
    tc.rows[0] = {_PROBE_ROWS};
    tc.colsb[0] = {_PROBE_COLSB};
    _tile_loadconfig(&tc);
}}
"""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def pinned_version(pyproject: Path | None = None) -> str:
    """The exact llama-cpp-python version pyproject.toml pins (`llama-cpp-python==X`)."""
    pyproject = pyproject or repo_root() / "pyproject.toml"
    match = re.search(r'"llama-cpp-python==([^"; ]+)"', pyproject.read_text(encoding="utf-8"))
    if not match:
        raise SystemExit(f"{pyproject} does not pin llama-cpp-python with '=='; pin the version this project is tested with")
    return match.group(1)


def compiler() -> str:
    """The C++ compiler CMake will pick: $CXX, else c++."""
    return os.environ.get("CXX") or "c++"


def native_macros(cxx: str, march: str = "native") -> list[str]:
    """The compiler's predefined macros for this machine's CPU (`-march=native`; or another `march`), sorted.

    They name the ISA extensions the build will use (`__AVX512F__`, `__AMX_TILE__`,
    `__ARM_FEATURE_DOTPROD`, ...) and the compiler's version, so a change of CPU or of compiler
    changes the build key. Where the compiler knows no native target (some Arm toolchains take
    `-mcpu=native`), the next spelling is tried.
    """
    for flag in (f"-march={march}", f"-mcpu={march}", None):
        command = [cxx, *( [flag] if flag else [] ), "-dM", "-E", "-x", "c++", os.devnull]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return sorted(line for line in done.stdout.splitlines() if line.startswith("#define "))
    raise SystemExit(f"the C++ compiler '{cxx}' does not run; install one (Debian: apt-get install g++) or set CXX")


def has_macro(macros: list[str], name: str) -> bool:
    return any(line.split()[1:2] == [name] for line in macros)


def amx_config_survives(cxx: str, source: str = PROBE_SOURCE) -> bool | None:
    """Does `cxx` keep a stack tile configuration's stores alive across `_tile_loadconfig`?

    Compiles ggml's pattern (zeroed struct, palette, rows, column widths, then the intrinsic) at -O3
    and looks for the two distinctive values in the assembly. None: the compiler cannot target AMX.

    Example:
        amx_config_survives("g++")  # False with Debian 12's GCC 12.2: rows and colsb are dropped
    """
    with tempfile.TemporaryDirectory(prefix="recover-lora-amx-") as tmp:
        path = Path(tmp) / "probe.cpp"
        path.write_text(source, encoding="utf-8")
        asm = Path(tmp) / "probe.s"
        try:
            done = subprocess.run([cxx, "-O3", "-mamx-tile", "-S", "-o", str(asm), str(path)], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0 or not asm.exists():
            return None
        code = "\n".join(line for line in asm.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith((".file", ".ident", "#")))
    return all(re.search(rf"(?<![\w.]){value}(?![\w.])", code) for value in (_PROBE_ROWS, _PROBE_COLSB))


@dataclass
class BuildPlan:
    """What `install` builds: the version, the CMake arguments and why they are what they are."""

    version: str
    cmake_args: str
    compiler: str
    compiler_version: str
    native_target_has_amx: bool
    amx_config_survives: bool | None
    amx_in_build: bool
    reasons: list[str] = field(default_factory=list)
    cpu_flags: list[str] = field(default_factory=list)
    key: str = ""


def cpu_flags() -> list[str]:
    """The CPU's feature flags as the OS lists them (/proc/cpuinfo 'flags' or 'Features'); [] elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return sorted(set(value.split()))
    return []


def plan_build(
    version: str | None = None, cxx: str | None = None, user_cmake_args: str | None = None, march: str = "native"
) -> BuildPlan:
    """The build this machine gets: the user's CMAKE_ARGS, plus AMX left out where the compiler breaks it.

    `march` plans for another CPU than this one (tests; what a Sapphire Rapids machine would get).
    """
    version = version or pinned_version()
    cxx = cxx or compiler()
    user_cmake_args = os.environ.get("CMAKE_ARGS", "") if user_cmake_args is None else user_cmake_args
    macros = native_macros(cxx, march)
    version_line = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()
    target_has_amx = has_macro(macros, "__AMX_TILE__")
    survives = amx_config_survives(cxx) if target_has_amx else None
    args = shlex.split(user_cmake_args)
    reasons = []
    amx_in_build = target_has_amx
    if target_has_amx and survives is False:
        amx_in_build = False
        args += [f"-DCMAKE_C_FLAGS={AMX_OFF_FLAGS}", f"-DCMAKE_CXX_FLAGS={AMX_OFF_FLAGS}"]
        reasons.append(
            f"AMX left out: {cxx} drops the stores of a stack tile configuration before _tile_loadconfig, "
            "so ggml's AMX kernels would run on an empty configuration and crash"
        )
    cmake_args = shlex.join(args)
    plan = BuildPlan(
        version=version,
        cmake_args=cmake_args,
        compiler=cxx,
        compiler_version=version_line[0] if version_line else "",
        native_target_has_amx=target_has_amx,
        amx_config_survives=survives,
        amx_in_build=amx_in_build,
        reasons=reasons,
        cpu_flags=cpu_flags(),
    )
    digest = hashlib.sha256(json.dumps([version, cmake_args, macros], sort_keys=True).encode()).hexdigest()
    plan.key = f"{version}-{digest[:12]}"
    return plan


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "recover-lora"
    return Path(base)


def wheel_dir(plan: BuildPlan) -> Path:
    return cache_root() / "llama-cpp-python" / plan.key


def build_wheel(plan: BuildPlan, python: str) -> Path:
    """The wheel of `plan`, from the cache or built now (~4-7 min on 2 cores); never half-written."""
    target = wheel_dir(plan)
    wheels = sorted(target.glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{plan.key}.", dir=target.parent))
    env = dict(os.environ, CMAKE_ARGS=plan.cmake_args)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    print(f"building {PACKAGE} {plan.version} for this CPU (CMAKE_ARGS={plan.cmake_args or '(none)'}); takes minutes", flush=True)
    for reason in plan.reasons:
        print(f"  {reason}", flush=True)
    command = [python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", "--no-binary", PACKAGE,
               f"{PACKAGE}=={plan.version}", "-w", str(staging)]
    try:
        done = subprocess.run(command, env=env)
        wheels = sorted(staging.glob("llama_cpp_python-*.whl"))
        if done.returncode != 0 or not wheels:
            raise SystemExit(f"building {PACKAGE} {plan.version} failed (exit {done.returncode}); see pip's output above")
        (staging / "build.json").write_text(json.dumps(asdict(plan), indent=2), encoding="utf-8")
        staging.chmod(0o755)  # mkdtemp made it private
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(target.glob("llama_cpp_python-*.whl"))[0]


def install(python: str, plan: BuildPlan | None = None) -> BuildPlan:
    """Install this machine's build of llama-cpp-python into `python`'s environment, and record it there."""
    plan = plan or plan_build()
    wheel = build_wheel(plan, python)
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)])
    if done.returncode != 0:
        raise SystemExit(f"installing {wheel} failed (exit {done.returncode})")
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, check=True).stdout.strip()
    info = Path(prefix) / BUILD_INFO_NAME
    tmp = info.with_name(f".{info.name}.tmp")
    tmp.write_text(json.dumps({**asdict(plan), "wheel": str(wheel)}, indent=2), encoding="utf-8")
    os.replace(tmp, info)
    return plan


def installed_build_info(prefix: str | os.PathLike | None = None) -> dict | None:
    """The build record `install` left in this (or `prefix`'s) environment; None if it was installed otherwise."""
    path = Path(prefix or sys.prefix) / BUILD_INFO_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("key", help="print this machine's build key")
    sub.add_parser("show", help="print the build plan as JSON")
    install_parser = sub.add_parser("install", help="build (or reuse) and install llama-cpp-python")
    install_parser.add_argument("--python", required=True, help="the Python of the environment to install into")
    args = parser.parse_args(argv)
    plan = plan_build()
    if args.command == "key":
        print(plan.key)
    elif args.command == "show":
        print(json.dumps(asdict(plan), indent=2))
    else:
        install(args.python, plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
