"""A device fingerprint stored with every benchmark record: what ran the numbers.

Works on Linux (x86, ARM boards, Android/Termux), macOS and Windows with only the standard
library; a field that cannot be read on some OS is None rather than a failure, so the same
`recover-lora bench` runs unchanged wherever llama-cpp-python installs.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

# Back ends as llama.cpp names them in llama_print_system_info(); first found wins.
GPU_BACKEND_NAMES = ("CUDA", "Metal", "Vulkan", "ROCm", "HIP", "SYCL", "OpenCL", "CANN", "MUSA", "BLAS")


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


def llama_backend(system_info: str, gpu_offload: bool) -> str:
    """'CPU' or the GPU back end named in llama.cpp's system info ('Metal', 'CUDA', ...)."""
    if gpu_offload:
        for name in GPU_BACKEND_NAMES:
            if name.lower() in system_info.lower():
                return name
        return "GPU"
    return "CPU"


def device_fingerprint() -> dict:
    """Everything about this machine and llama.cpp build that a tokens/s number depends on.

    Example:
        device_fingerprint()["cpu_model"]  # 'Apple M2' / 'AMD EPYC' / 'Raspberry Pi 5 Model B Rev 1.0'
    """
    import llama_cpp

    from recover_lora.runtime.llama import default_threads

    system_info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()
    gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
    return {
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": physical_cores(),
        "cpu_cores_usable": default_threads(),
        "ram_bytes": ram_bytes(),
        "os": platform.system(),
        "os_release": platform.release(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "android": "ANDROID_ROOT" in os.environ,
        "python": platform.python_version(),
        "llama_cpp_python_version": getattr(llama_cpp, "__version__", None),
        "llama_cpp_system_info": system_info,
        "gpu_offload_supported": gpu_offload,
        "backend": llama_backend(system_info, gpu_offload),
    }
