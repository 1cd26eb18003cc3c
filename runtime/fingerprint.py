"""What this machine is, read with only the standard library: CPU model, cores, RAM, load.

Works on Linux (x86, ARM boards, Android/Termux), macOS and Windows; a field that cannot be read
on some OS is None rather than a failure, so the same `recover-lora bench` runs unchanged
wherever llama-cpp-python installs. runtime/records.py puts these into a record's identity.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _getprop(name: str) -> str | None:
    """Android system property (Termux); None elsewhere."""
    try:
        out = subprocess.run(["getprop", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cpu_model() -> str | None:
    if sys.platform == "darwin":
        return _sysctl("machdep.cpu.brand_string")
    cpuinfo = _read_text("/proc/cpuinfo")
    if cpuinfo:
        for key in ("model name", "Hardware", "Processor", "cpu model"):
            for line in cpuinfo.splitlines():
                if line.split(":")[0].strip() == key and ":" in line:
                    return line.split(":", 1)[1].strip()
    board = _read_text("/sys/firmware/devicetree/base/model")  # Raspberry Pi, Jetson
    if board:
        return board.strip("\x00\n ")
    soc = _getprop("ro.soc.model") if "ANDROID_ROOT" in os.environ else None
    return soc or platform.processor() or None


def physical_cores() -> int | None:
    if sys.platform == "darwin":
        value = _sysctl("hw.physicalcpu")
        return int(value) if value and value.isdigit() else None
    cpuinfo = _read_text("/proc/cpuinfo")
    if not cpuinfo:
        return None
    cores, physical_id = set(), "0"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            physical_id = value.strip()
        elif key.strip() == "core id":
            cores.add((physical_id, value.strip()))
    return len(cores) or None


def ram_bytes() -> int | None:
    if sys.platform == "darwin":
        value = _sysctl("hw.memsize")
        return int(value) if value and value.isdigit() else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def load_average() -> list[float] | None:
    """1/5/15-minute load: how busy the machine was while we measured (shared CI boxes)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None
