"""`devices probe`: measure this machine and write a device profile.

Three measurements, each honest about what it is:
- STREAM-like bandwidth with numpy over arrays far larger than any cache, one slice per thread
  (numpy releases the GIL in these loops): copy (1 read + 1 write per element) and triad
  a = b + s*c done in cache-sized chunks, so DRAM sees 2 reads + 1 write per element, the traffic
  STREAM counts. The triad figure becomes the profile's effective bandwidth.
- Compute: a float32 numpy matmul (BLAS, all threads); the roofline only uses it for prefill.
- llama.cpp on a real quantized GGUF (default: the default model): decode tokens/s x the
  roofline's bytes per token of that very file = the bytes/s llama.cpp's matrix-vector kernels
  sustain; and one prompt batch's tokens/s x FLOPs per token = the rate of its quantized
  matrix-matrix kernels, which becomes the profile's quantized compute rate. Small models carry
  per-token overheads that pull both down; pass a bigger GGUF for figures closer to a 4B+ model.
"""

from __future__ import annotations

import datetime
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recover_lora.devices.profiles import GB, TFLOP, DeviceProfile
from recover_lora.errors import RecoverLoraError
from recover_lora.runtime.fingerprint import cpu_model, ram_bytes

MiB = 1 << 20
_TRIAD_CHUNK_ELEMENTS = 32 * 1024  # 256 KiB of float64: stays in L2 between the two passes


# The fields that set a machine's speed, under the key names bench records use
# (runtime/fingerprint.py's device_fingerprint(), whose lookups the probe shares).
MACHINE_KEYS = ("cpu_model", "cpu_cores_logical", "ram_bytes")


def fingerprint() -> dict[str, object]:
    """What identifies this machine: CPU model, logical cores, RAM bytes, OS, architecture.

    Example:
        fingerprint()["cpu_model"]   # 'AMD EPYC'
    """
    return {
        "cpu_model": cpu_model() or "unknown",
        "cpu_cores_logical": os.cpu_count() or 1,
        "ram_bytes": ram_bytes() or 0,
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def same_machine(a: dict | None, b: dict | None) -> bool:
    """Two fingerprints (probe profile or bench record) name the same machine."""
    if not a or not b:
        return False
    return all(str(a.get(k)) == str(b.get(k)) for k in MACHINE_KEYS)


def _parallel(threads: int, work) -> float:
    """Run work(i) on `threads` threads started together; the wall seconds of the slowest."""
    barrier = threading.Barrier(threads + 1)

    def run(i: int) -> None:
        barrier.wait()
        work(i)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    return time.perf_counter() - start


@dataclass(frozen=True)
class StreamResult:
    copy_GB_per_s: float
    triad_GB_per_s: float
    array_MiB: int
    threads: int


def stream_bandwidth(array_mib: int = 256, threads: int | None = None, repeats: int = 5) -> StreamResult:
    """Best-of-`repeats` copy and triad bandwidth over three float64 arrays of `array_mib` MiB.

    Example:
        stream_bandwidth(64, threads=2).triad_GB_per_s
    """
    if array_mib < 8 or repeats < 1:
        raise RecoverLoraError(f"--stream-mib {array_mib} must be >= 8 (arrays must dwarf the caches)")
    threads = threads or os.cpu_count() or 1
    n = array_mib * MiB // 8
    a, b, c = np.zeros(n), np.ones(n), np.full(n, 2.0)  # touch every page before timing
    bounds = np.linspace(0, n, threads + 1).astype(int)
    scratch = [np.empty(_TRIAD_CHUNK_ELEMENTS) for _ in range(threads)]

    def copy(i: int) -> None:
        np.copyto(a[bounds[i] : bounds[i + 1]], c[bounds[i] : bounds[i + 1]])

    def triad(i: int) -> None:
        tmp = scratch[i]
        for start in range(bounds[i], bounds[i + 1], _TRIAD_CHUNK_ELEMENTS):
            stop = min(start + _TRIAD_CHUNK_ELEMENTS, bounds[i + 1])
            t = tmp[: stop - start]
            np.multiply(c[start:stop], 3.0, out=t)
            np.add(b[start:stop], t, out=a[start:stop])

    copy_s = min(_parallel(threads, copy) for _ in range(repeats))
    triad_s = min(_parallel(threads, triad) for _ in range(repeats))
    if not np.allclose(a[:: max(1, n // 1000)], 7.0):  # 1 + 3 * 2: the triad really ran
        raise RecoverLoraError("internal error: the triad kernel computed wrong values")
    array_bytes = n * 8
    return StreamResult(2 * array_bytes / copy_s / GB, 3 * array_bytes / triad_s / GB, array_mib, threads)


def matmul_tflop_per_s(size: int = 1024, repeats: int = 3) -> float:
    """Best float32 matmul rate (BLAS, its own threads): 2 x size^3 FLOPs per product."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((size, size), dtype=np.float32)
    y = rng.standard_normal((size, size), dtype=np.float32)
    x @ y  # warm-up: BLAS thread pool start
    best = min(_timed(lambda: x @ y) for _ in range(repeats))
    return 2 * size**3 / best / TFLOP


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass(frozen=True)
class DecodeResult:
    gguf: str
    threads: int
    prompt_tokens: int
    decode_tokens: int
    prompt_tokens_per_s: float
    decode_tokens_per_s: float
    bytes_per_token: float  # the roofline's count for this file at the decode depth
    prompt_flops_per_token: float  # the roofline's count at the prompt's middle depth
    system_info: str

    @property
    def bytes_per_s(self) -> float:
        return self.decode_tokens_per_s * self.bytes_per_token

    @property
    def prompt_flop_per_s(self) -> float:
        return self.prompt_tokens_per_s * self.prompt_flops_per_token


def llama_cpp_decode(gguf_path: Path, threads: int | None = None, prompt_tokens: int = 64, decode_tokens: int = 64) -> DecodeResult:
    """Time one `prompt_tokens` batch, then `decode_tokens` single-token llama.cpp decode steps.

    Example:
        llama_cpp_decode(Path("model.gguf"), threads=2).bytes_per_s / 1e9   # GB/s llama.cpp sustains
    """
    import llama_cpp

    from recover_lora.devices.roofline import token_cost
    from recover_lora.devices.shapes import FILE_POLICY, load_model_shape

    if prompt_tokens < 1 or decode_tokens < 4:
        raise RecoverLoraError(f"prompt tokens {prompt_tokens} must be >= 1 and decode tokens {decode_tokens} >= 4")
    shape = load_model_shape(gguf_path)  # fails with a clear message before llama.cpp loads anything
    threads = threads or os.cpu_count() or 1
    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=prompt_tokens + decode_tokens + 8,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=0,
        verbose=False,
    )
    try:
        # Token ids do not change the work of a decode step; any valid id will do.
        token = llm.token_bos() if llm.token_bos() >= 0 else 0
        llm.eval([token] * 8)  # warm-up (first-call allocations), then start over
        llm.reset()
        start = time.perf_counter()
        llm.eval([token] * prompt_tokens)
        prompt_seconds = time.perf_counter() - start
        llm.eval([token])  # warm-up decode step
        start = time.perf_counter()
        for _ in range(decode_tokens):
            llm.eval([token])
        seconds = time.perf_counter() - start
    finally:
        llm.close()
    cost = token_cost(shape, FILE_POLICY, prompt_tokens + 1 + decode_tokens // 2)
    return DecodeResult(
        gguf=str(gguf_path),
        threads=threads,
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
        prompt_tokens_per_s=prompt_tokens / prompt_seconds,
        decode_tokens_per_s=decode_tokens / seconds,
        bytes_per_token=cost.bytes,
        prompt_flops_per_token=token_cost(shape, FILE_POLICY, prompt_tokens // 2).flops,
        system_info=llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    )


def probe(
    name: str = "host",
    gguf_path: Path | None = None,
    threads: int | None = None,
    array_mib: int = 256,
    decode: bool = True,
) -> tuple[DeviceProfile, StreamResult, DecodeResult | None]:
    """Measure this machine; return its profile (STREAM triad as effective bandwidth) and the raw results.

    Example:
        profile, stream, decode = probe(threads=2)
    """
    threads = threads or os.cpu_count() or 1
    today = datetime.date.today().isoformat()
    stream = stream_bandwidth(array_mib, threads)
    compute = matmul_tflop_per_s()
    sources = {
        "effective_bandwidth": f"measured {today} by `recover-lora devices probe`: numpy STREAM-like triad, "
        f"3 x {array_mib} MiB float64 arrays, {threads} threads, best of 5 (2 reads + 1 write per element)",
        "stream_copy_bandwidth": f"measured {today}: numpy copy, {array_mib} MiB arrays, {threads} threads, best of 5",
        "peak_compute": f"measured {today}: numpy float32 1024^3 matmul through its BLAS (not llama.cpp's kernels)",
    }
    extra = {"stream_copy_bandwidth_GB_per_s": round(stream.copy_GB_per_s, 3)}
    result, quantized_compute = None, None
    if decode:
        if gguf_path is None:
            from recover_lora.export.sources import default_model_path

            gguf_path = default_model_path()
        result = llama_cpp_decode(Path(gguf_path), threads)
        extra["llama_cpp_decode_bandwidth_GB_per_s"] = round(result.bytes_per_s / GB, 3)
        sources["llama_cpp_decode_bandwidth"] = (
            f"measured {today}: llama.cpp CPU decode of {Path(gguf_path).name}, {threads} threads, "
            f"{result.decode_tokens_per_s:.2f} tok/s x {result.bytes_per_token / 1e6:.2f} MB/token (roofline byte count of that file)"
        )
        quantized_compute = result.prompt_flop_per_s / TFLOP
        sources["quantized_compute"] = (
            f"measured {today}: llama.cpp CPU prompt processing of {Path(gguf_path).name}, {threads} threads, one "
            f"{result.prompt_tokens}-token batch at {result.prompt_tokens_per_s:.1f} tok/s x {result.prompt_flops_per_token / 1e9:.3f} GFLOP/token"
        )
    profile = DeviceProfile(
        key=name.lower(),
        name=f"this machine ({fingerprint()['cpu_model']})",
        device_class="host",
        backend=f"CPU ({threads} threads)",
        peak_compute_TFLOP_per_s=round(compute, 5),
        effective_bandwidth_GB_per_s=round(stream.triad_GB_per_s, 3),
        quantized_compute_TFLOP_per_s=None if quantized_compute is None else round(quantized_compute, 5),
        sources=sources,
        extra=extra,
        fingerprint=fingerprint(),
        date=today,
    )
    return profile, stream, result
