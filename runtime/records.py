"""Bench records: their schema, the machine that made them, and the folder they are kept in.

`recover-lora bench` (runtime/bench.py) writes these records, `devices probe` stamps its profile
with the same machine identity, `devices calibrate` and the pipeline's report read the records
back: all through this module, so the schema, the identity and the folder are stated once.

Record schema (one JSON object per line, appended to `<results>/bench-<host>.jsonl`):

    schema_version    int, currently 1
    kind              "bench"
    run_id            hex id shared by every record of one invocation
    timestamp         UTC ISO-8601 time the record was made
    device            device_fingerprint(): machine_identity() (cpu_model, cpu_cores_logical,
                      ram_bytes, platform, machine), host, cpu_cores_{physical,usable}, os,
                      os_release, android, python, llama_cpp_python_version,
                      llama_cpp_system_info, gpu_offload_supported (what the build can do),
                      backend (what ran: "CPU", or the GPU back end when layers were offloaded),
                      cpu_isa (the CPU's SIMD / matrix flags), llama_cpp_build (key, cmake_args,
                      amx_in_build of runtime/llama_build.py's install; null if installed otherwise),
                      extra_buffer_types (llama.cpp's AMX / repacked weights used); a field that cannot be read on this OS is null
    load_average      [1, 5, 15-minute] load when the depth's measurements ended (null if unknown)
    variant           label, e.g. "gateup.gguf+adapter.gguf"; variant_index: its position
    baseline_variant  label of the first variant (ratios are against it)
    model             path, name, size_bytes, mtime, sha256 (null with --no-hash), architecture,
                      general_name, n_weights, tensor_types ({ggml type: tensor count})
    adapter           null, or path, name, size_bytes, mtime, sha256, rank, alpha, scale
    settings          threads, n_batch, n_ubatch, gpu_layers, flash_attn, extra_buffer_types, n_ctx, repeats, warmup,
                      interleaved (bool), timer ("wall_clock_llama_decode")
    depth, n_prompt, n_gen   ints (tokens)
    pp_tokens_per_s   {median, min, max, mean, samples: [...]}; tg_tokens_per_s likewise
    ratio_vs_baseline null for the first variant, else {"pp": stats, "tg": stats} of the
                      per-repeat ratios this variant / first variant (same repeat index)

Records made before `backend` meant what ran stored the build's GPU back end there even for
CPU runs; `BenchRecord.backend` reads both right, from settings.gpu_layers.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output, read_jsonl
from recover_lora.runtime.fingerprint import cpu_model, physical_cores, ram_bytes

SCHEMA_VERSION = 1
RECORD_KIND = "bench"

# Bench records and probe profiles go to one folder users can share. The default is the
# devices/ package's results/ (runtime/ and devices/ are sibling folders of the one namespace,
# installed or not), never a path relative to the working directory.
RESULTS_DIR_ENV = "RECOVER_LORA_RESULTS"
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parents[1] / "devices" / "results"

# The fields that set a machine's speed; `same_machine` compares these.
MACHINE_KEYS = ("cpu_model", "cpu_cores_logical", "ram_bytes")
# What profiles written before the identity had None stored for a field they could not read.
_LEGACY_UNKNOWN = ("unknown", 0)
CPU_BACKEND = "CPU"
# CPU flags that set llama.cpp's kernels: x86 SIMD / AMX, Arm NEON / dot product / i8mm / SVE / SME.
_ISA_FLAG = re.compile(r"^(sse4_2|avx\w*|fma|f16c|amx\w*|asimd\w*|neon|sve\w*|sme(?!p)\w*|i8mm|bf16|fphp|dotprod)$")
# GPU back ends as llama.cpp names them in llama_print_system_info(); first found wins.
GPU_BACKEND_NAMES = ("CUDA", "Metal", "Vulkan", "ROCm", "HIP", "SYCL", "OpenCL", "CANN", "MUSA", "BLAS")


def results_dir() -> Path:
    """Where probe profiles and bench records live: $RECOVER_LORA_RESULTS, else devices/results/."""
    return Path(os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR)


def default_results_path() -> Path:
    """<results>/bench-<host>.jsonl (host name reduced to safe file-name characters)."""
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()) or "host"
    return results_dir() / f"bench-{host}.jsonl"


# ---------------------------------------------------------------------------------------------
# Which machine, which back end


def machine_identity() -> dict:
    """What identifies this machine: CPU model, logical cores, RAM bytes, OS platform, architecture.

    A field that cannot be read here is None (never a placeholder), so `same_machine` can tell
    "unknown" from a value.

    Example:
        machine_identity()["cpu_model"]  # 'Apple M2' / 'AMD EPYC' / 'Raspberry Pi 5 Model B Rev 1.0' / None
    """
    return {
        "cpu_model": cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "ram_bytes": ram_bytes(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def backend_ran(gpu_layers: int, system_info: str) -> str:
    """The back end a run used: "CPU" unless layers were offloaded, else the GPU back end llama.cpp names.

    `runtime.llama.load_llama` refuses gpu_layers != 0 on a build without GPU offload, so a
    non-zero count means a GPU back end ran the offloaded layers.

    Example:
        backend_ran(0, "CUDA : ARCHS = 890 | CPU : AVX2 = 1")   # 'CPU'
        backend_ran(-1, "CUDA : ARCHS = 890 | CPU : AVX2 = 1")  # 'CUDA'
    """
    if gpu_layers == 0:
        return CPU_BACKEND
    for name in GPU_BACKEND_NAMES:
        if name.lower() in system_info.lower():
            return name
    return "GPU"


def device_fingerprint(gpu_layers: int = 0, extra_buffer_types: bool | None = None) -> dict:
    """Everything about this machine, its llama.cpp build and the back end used that tokens/s depends on.

    Args:
        gpu_layers: layers the measured run offloaded (0: a CPU run), for `backend`.
        extra_buffer_types: whether the measured runs used llama.cpp's extra CPU buffer types (AMX,
            repacked weights); None: this machine's choice (runtime/llama_selftest.py).

    Example:
        device_fingerprint(gpu_layers=0)["backend"]  # 'CPU'
    """
    import llama_cpp

    from recover_lora.runtime.llama import default_threads, resolved_extra_buffer_types
    from recover_lora.runtime.llama_build import cpu_flags, installed_build_info

    build = installed_build_info() or {}
    system_info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()
    return {
        **machine_identity(),
        "host": socket.gethostname(),
        "cpu_cores_physical": physical_cores(),
        "cpu_cores_usable": default_threads(),
        "os": platform.system(),
        "os_release": platform.release(),
        "android": "ANDROID_ROOT" in os.environ,
        "python": platform.python_version(),
        "llama_cpp_python_version": getattr(llama_cpp, "__version__", None),
        "llama_cpp_system_info": system_info,
        "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
        "backend": backend_ran(gpu_layers, system_info),
        # The CPU's vector / matrix extensions: every speed figure says what it was measured with.
        "cpu_isa": [f for f in cpu_flags() if _ISA_FLAG.match(f)],
        "llama_cpp_build": {k: build.get(k) for k in ("key", "cmake_args", "amx_in_build")} if build else None,
        "extra_buffer_types": resolved_extra_buffer_types() if extra_buffer_types is None else extra_buffer_types,
    }


def _known(value) -> bool:
    return value is not None and value != "" and value not in _LEGACY_UNKNOWN


def same_machine(a: dict | None, b: dict | None) -> bool:
    """Two fingerprints (a probe profile's or a bench record's `device`) name the same machine.

    The rule: every field of MACHINE_KEYS (CPU model, logical cores, RAM bytes) that both sides
    know must be equal, and at least one must be known on both. A field either side could not
    read (None, or "unknown" / 0 in profiles written before) is not compared: where the CPU model
    cannot be read, logical cores and RAM decide. With nothing to compare it is not the same.

    Example:
        same_machine({"cpu_model": None, "cpu_cores_logical": 2, "ram_bytes": 8e9},
                     {"cpu_model": "unknown", "cpu_cores_logical": 2, "ram_bytes": 8e9})  # True
    """
    if not a or not b:
        return False
    compared = [k for k in MACHINE_KEYS if _known(a.get(k)) and _known(b.get(k))]
    # str(): TOML profiles and JSON records may spell one number as int or float.
    return bool(compared) and all(str(a[k]) == str(b[k]) for k in compared)


# ---------------------------------------------------------------------------------------------
# Records on disk

_REQUIRED_FIELDS = {
    "schema_version": int,
    "kind": str,
    "run_id": str,
    "timestamp": str,
    "device": dict,
    "variant": str,
    "variant_index": int,
    "baseline_variant": str,
    "model": dict,
    "settings": dict,
    "depth": int,
    "n_prompt": int,
    "n_gen": int,
    "pp_tokens_per_s": dict,
    "tg_tokens_per_s": dict,
}
_STATS_KEYS = ("median", "min", "max", "mean", "samples")


def validate_record(record: dict) -> None:
    """Raise RecoverLoraError naming the first field that breaks schema v1."""
    if not isinstance(record, dict):
        raise RecoverLoraError(f"bench record must be a JSON object, got {type(record).__name__}")
    if record.get("schema_version") != SCHEMA_VERSION:
        raise RecoverLoraError(f"bench record schema_version={record.get('schema_version')!r}; this version reads {SCHEMA_VERSION}")
    for key, kind in _REQUIRED_FIELDS.items():
        if not isinstance(record.get(key), kind):
            raise RecoverLoraError(f"bench record field {key!r} is {record.get(key)!r}, expected {kind.__name__}")
    for key in ("path", "name", "size_bytes", "tensor_types", "architecture"):
        if key not in record["model"]:
            raise RecoverLoraError(f"bench record model has no {key!r}")
    for metric in ("pp_tokens_per_s", "tg_tokens_per_s"):
        stats = record[metric]
        if any(k not in stats for k in _STATS_KEYS) or not stats["samples"]:
            raise RecoverLoraError(f"bench record {metric} needs {', '.join(_STATS_KEYS)} with samples")
        if not stats["min"] <= stats["median"] <= stats["max"] or stats["min"] <= 0:
            raise RecoverLoraError(f"bench record {metric} has inconsistent statistics {stats}")
    for key in ("backend", "cpu_model", "llama_cpp_system_info", "llama_cpp_python_version"):
        if key not in record["device"]:
            raise RecoverLoraError(f"bench record device has no {key!r}")


def append_records(path: str | os.PathLike, records: Sequence[dict]) -> Path:
    """Append records as JSON lines; the file is rewritten atomically, so no half line is left."""
    for record in records:
        validate_record(record)
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    with atomic_output(path, force=True) as tmp:
        with open(tmp, "wb") as f:
            f.write(old)
            for record in records:
                f.write(json.dumps(record, sort_keys=True).encode("utf-8") + b"\n")
    return path


def read_records(path: str | os.PathLike) -> list[dict]:
    """Every record of one results file, each checked against the schema; a bad line is an error."""
    records = []
    for _, record in read_jsonl(path):
        validate_record(record)
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# The decode measurement of a record, as calibration reads it


@dataclass(frozen=True)
class BenchRecord:
    """One decode measurement of a bench record: what `devices calibrate` compares with the roofline."""

    model_path: str
    depth: int
    decode_tokens_per_s: float
    adapter_path: str | None = None
    fingerprint: dict | None = None
    run_id: str = ""
    variant: str = ""
    baseline_variant: str = ""
    # Per-repeat interleaved ratio of decode speed to the run's first variant (median), if any.
    decode_ratio_vs_baseline: float | None = None
    threads: int | None = None
    gpu_layers: int = 0
    load_1min: float | None = None
    origin: str = ""

    @property
    def backend(self) -> str:
        """The back end that ran it: "CPU" when no layer was offloaded (whatever the build could do)."""
        if not self.gpu_layers:
            return CPU_BACKEND
        return str((self.fingerprint or {}).get("backend") or "GPU")


def parse_record(raw: dict, origin: str = "") -> BenchRecord | None:
    """The decode measurement of one bench record; None for other kinds of record or one without it.

    Lenient on purpose: calibration needs only the model path, depth and decode median, so
    hand-made or trimmed records work; a bench record of another schema version is an error.
    """
    if not isinstance(raw, dict) or raw.get("kind") != RECORD_KIND or not isinstance(raw.get("model"), dict):
        return None
    if raw.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        where = f"{origin}: " if origin else ""
        raise RecoverLoraError(f"{where}bench record schema_version={raw['schema_version']!r}; this version reads {SCHEMA_VERSION}")
    tg = raw.get("tg_tokens_per_s") or {}
    rate, depth, model = tg.get("median"), raw.get("depth"), raw["model"].get("path")
    if rate is None or depth is None or model is None:
        return None
    ratio = ((raw.get("ratio_vs_baseline") or {}).get("tg") or {}).get("median")
    load = raw.get("load_average")
    settings = raw.get("settings") or {}
    return BenchRecord(
        model_path=str(model),
        depth=int(depth),
        decode_tokens_per_s=float(rate),
        adapter_path=(raw.get("adapter") or {}).get("path"),
        fingerprint=raw.get("device") if isinstance(raw.get("device"), dict) else None,
        run_id=str(raw.get("run_id", "")),
        variant=str(raw.get("variant", "")),
        baseline_variant=str(raw.get("baseline_variant", "")),
        decode_ratio_vs_baseline=None if ratio is None else float(ratio),
        threads=settings.get("threads"),
        gpu_layers=int(settings.get("gpu_layers") or 0),
        load_1min=load[0] if isinstance(load, list) and load else None,
        origin=origin,
    )


def read_results(folder: Path) -> list[BenchRecord]:
    """Every bench decode measurement in the `*.jsonl` files under `folder` (other records are passed over)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RecoverLoraError(f"results folder {folder} does not exist; run `recover-lora bench` first (or pass --results)")
    records: list[BenchRecord] = []
    for path in sorted(folder.rglob("*.jsonl")):
        for number, raw in read_jsonl(path):
            record = parse_record(raw, f"{path.name}:{number}")
            if record is not None:
                records.append(record)
    return records
