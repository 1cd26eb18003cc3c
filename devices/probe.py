"""`devices probe`: measure this machine and write a device profile.

Five measurements, each honest about what it is:
- STREAM-like bandwidth with numpy over arrays far larger than any cache, one slice per thread
  (numpy releases the GIL in these loops): read (a sum: 1 read per element), copy (1 read +
  1 write) and triad a = b + s*c done in cache-sized chunks, so DRAM sees 2 reads + 1 write per
  element, the traffic STREAM counts. The read figure becomes the profile's effective bandwidth
  (see `stream_bandwidth`).
- Compute: a float32 numpy matmul (BLAS, all threads); the roofline only uses it for prefill.
- llama.cpp on a real quantized GGUF (default: the default model): decode tokens/s x the
  roofline's bytes per token of that very file = the bytes/s llama.cpp's matrix-vector kernels
  sustain; and one prompt batch's tokens/s x FLOPs per token = the rate of its quantized
  matrix-matrix kernels, which becomes the profile's quantized compute rate. Small models carry
  per-token overheads that pull both down; pass a bigger GGUF for figures closer to a 4B+ model.
- llama.cpp's matrix-vector rate per ggml type (devices/matvec.py): weights per second of a
  random-weight model whose every linear is that type; the roofline's per-type compute limit.
- llama.cpp's decode attention rate (devices/attention.py): the roofline's attention FLOPs at a
  deep KV cache over the extra seconds per token they cost; the attention group's compute limit.

`probe_device` runs them in that order into one profile: it is what `devices probe` and the
pipeline's bench step call. Every llama.cpp timing here loads through runtime's `load_llama` and
times through runtime/timer.py's `LlamaTimer`, as `recover-lora bench` does.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from recover_lora.devices.attention import (
    ATTENTION_PROBE_INTERMEDIATE,
    DEFAULT_ATTENTION_DEPTH,
    DEFAULT_ATTENTION_LAYERS,
    AttentionResult,
    attention_probe_config,
    attention_rate,
)
from recover_lora.devices.matvec import (
    DEFAULT_MATVEC_LAYERS,
    DEFAULT_MATVEC_SHAPE,
    DEFAULT_MATVEC_TYPES,
    MATVEC_VOCAB_SIZE,
    MatvecResult,
    matvec_rates,
    probe_config,
)
from recover_lora.devices.profiles import GB, TFLOP, DeviceProfile
from recover_lora.errors import RecoverLoraError
from recover_lora.runtime.records import machine_identity

MiB = 1 << 20
_TRIAD_CHUNK_ELEMENTS = 32 * 1024  # 256 KiB of float64: stays in L2 between the two passes


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
    read_GB_per_s: float
    copy_GB_per_s: float
    triad_GB_per_s: float
    array_MiB: int
    threads: int


def parallel_sum(x: np.ndarray, threads: int) -> tuple[float, float]:
    """The sum of 1-D `x`, each of `threads` threads summing one slice: (sum, wall seconds).

    A read-only kernel: every element is loaded once and nothing is written back (numpy's add
    reduction releases the GIL, so the slices are summed in parallel).

    Example:
        parallel_sum(np.ones(1000), threads=2)[0]   # 1000.0
    """
    bounds = np.linspace(0, len(x), threads + 1).astype(int)
    sums = [0.0] * threads

    def read(i: int) -> None:
        sums[i] = float(np.add.reduce(x[bounds[i] : bounds[i + 1]]))

    seconds = _parallel(threads, read)
    return sum(sums), seconds


def stream_bandwidth(array_mib: int = 256, threads: int | None = None, repeats: int = 5) -> StreamResult:
    """Best-of-`repeats` read, copy and triad bandwidth over three float64 arrays of `array_mib` MiB.

    The read figure is the one the roofline should use: a decode step reads every weight once and
    writes only activations and one KV-cache row, so its DRAM traffic is almost all reads. Copy
    and triad also write, and a write first reads the destination line (write-allocate), traffic
    STREAM does not count, so they can understate what a read-only stream gets. On the 2-vCPU EPYC
    VM this was written on, quiet, all three gave 32-34 GB/s (llama.cpp decoding a 2.37 GB 4B GGUF
    moved 31); with other work running, triad fell further than read (22 vs 29 GB/s).

    Example:
        stream_bandwidth(64, threads=2).read_GB_per_s
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

    reads = [parallel_sum(c, threads) for _ in range(repeats)]
    copy_s = min(_parallel(threads, copy) for _ in range(repeats))
    triad_s = min(_parallel(threads, triad) for _ in range(repeats))
    if not np.allclose(a[:: max(1, n // 1000)], 7.0):  # 1 + 3 * 2: the triad really ran
        raise RecoverLoraError("internal error: the triad kernel computed wrong values")
    if any(total != 2.0 * n for total, _ in reads):  # exact: sums of 2.0 stay integers below 2^53
        raise RecoverLoraError("internal error: the read kernel computed a wrong sum")
    array_bytes = n * 8
    read_s = min(seconds for _, seconds in reads)
    return StreamResult(array_bytes / read_s / GB, 2 * array_bytes / copy_s / GB, 3 * array_bytes / triad_s / GB, array_mib, threads)


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
    from recover_lora.runtime.llama import LlamaOptions, load_llama
    from recover_lora.runtime.timer import LlamaTimer

    if prompt_tokens < 1 or decode_tokens < 4:
        raise RecoverLoraError(f"prompt tokens {prompt_tokens} must be >= 1 and decode tokens {decode_tokens} >= 4")
    shape = load_model_shape(gguf_path)  # fails with a clear message before llama.cpp loads anything
    threads = threads or os.cpu_count() or 1
    loaded = load_llama(gguf_path, options=LlamaOptions(n_ctx=prompt_tokens + decode_tokens + 8, threads=threads, gpu_layers=0))
    try:
        timer = LlamaTimer(loaded)
        token = timer.any_token
        timer.decode([token] * 8)  # warm-up (first-call allocations), then start over
        timer.rewind(0)
        prompt_seconds = timer.decode([token] * prompt_tokens)
        timer.decode([token])  # warm-up decode step
        seconds = sum(timer.decode_steps([token] * decode_tokens))
    finally:
        loaded.close()
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
    """Measure this machine; return its profile (STREAM read as effective bandwidth) and the raw results.

    llama.cpp's per-type matrix-vector rates and its attention rate are separate, slower steps
    (devices/matvec.py, devices/attention.py); `probe_device` runs all of them in order.

    Example:
        profile, stream, decode = probe(threads=2)
    """
    threads = threads or os.cpu_count() or 1
    today = datetime.date.today().isoformat()
    stream = stream_bandwidth(array_mib, threads)
    compute = matmul_tflop_per_s()
    stream_setup = f"{array_mib} MiB float64 arrays, {threads} threads, best of 5"
    sources = {
        "effective_bandwidth": f"measured {today} by `recover-lora devices probe`: numpy read-only kernel (per-thread sums, "
        f"1 read per element), {stream_setup}; decode only reads weights, so this, not triad or copy, is its bandwidth",
        "stream_read_bandwidth": f"measured {today}: numpy per-thread sums (1 read per element), {stream_setup}",
        "stream_copy_bandwidth": f"measured {today}: numpy copy (1 read + 1 write per element), {stream_setup}",
        "stream_triad_bandwidth": f"measured {today}: numpy STREAM-like triad (2 reads + 1 write per element), 3 x {stream_setup}",
        "peak_compute": f"measured {today}: numpy float32 1024^3 matmul through its BLAS (not llama.cpp's kernels)",
    }
    extra = {
        "stream_read_bandwidth_GB_per_s": round(stream.read_GB_per_s, 3),
        "stream_copy_bandwidth_GB_per_s": round(stream.copy_GB_per_s, 3),
        "stream_triad_bandwidth_GB_per_s": round(stream.triad_GB_per_s, 3),
    }
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
    identity = machine_identity()
    profile = DeviceProfile(
        key=name.lower(),
        name=f"this machine ({identity['cpu_model'] or 'CPU model unknown'})",
        device_class="host",
        backend=f"CPU ({threads} threads)",
        peak_compute_TFLOP_per_s=round(compute, 5),
        effective_bandwidth_GB_per_s=round(stream.read_GB_per_s, 3),
        quantized_compute_TFLOP_per_s=None if quantized_compute is None else round(quantized_compute, 5),
        sources=sources,
        extra=extra,
        fingerprint=identity,
        date=today,
    )
    return profile, stream, result


def with_matvec_rates(profile: DeviceProfile, results: list[MatvecResult], shape: str, layers: int, threads: int) -> DeviceProfile:
    """`profile` with the rates `matvec_rates(types, shape, layers, threads)` measured, and their source.

    Example:
        profile = with_matvec_rates(profile, matvec_rates(threads=2), "qwen3-4b", 2, threads=2)
    """
    today = datetime.date.today().isoformat()
    loads = sorted(r.load_1min for r in results)
    source = (
        f"measured {today} by `recover-lora devices probe`: llama.cpp CPU decode, {threads} threads, of random-weight {shape} "
        f"cut to {layers} layers (vocab {MATVEC_VOCAB_SIZE}) with every linear in the type; matmul weights / median seconds "
        f"per token (1-min load {loads[0]:.2f}-{loads[-1]:.2f}); "
        + ", ".join(f"{r.ggml_type.name} {r.bytes_per_token / 1e6:.0f} MB at {r.bytes_per_s / GB:.1f} GB/s" for r in results)
    )
    rates = {**profile.matvec_weights_per_s, **{r.ggml_type: float(f"{r.weights_per_s:.4g}") for r in results}}
    return replace(profile, matvec_weights_per_s=rates, sources={**profile.sources, "matvec": source})


def with_attention_rate(profile: DeviceProfile, result: AttentionResult, shape: str, layers: int, threads: int) -> DeviceProfile:
    """`profile` with the rate `attention_rate(shape, layers, depth, threads)` measured, and its source.

    Example:
        profile = with_attention_rate(profile, attention_rate(threads=2), "qwen3-4b", 8, threads=2)
    """
    today = datetime.date.today().isoformat()
    times = ", ".join(f"{s * 1e3:.2f} ms at {d}" for d, s in zip(result.depths, result.seconds_per_token))
    source = (
        f"measured {today} by `recover-lora devices probe`: llama.cpp CPU decode (F16 KV cache, no flash attention), {threads} threads, "
        f"of random-weight {shape} cut to {layers} layers (MLP {ATTENTION_PROBE_INTERMEDIATE} wide, vocab {MATVEC_VOCAB_SIZE}); roofline "
        f"attention FLOPs at depth {result.depths[-1]} / (seconds per token there - at depth 0), each the mean of median step times in "
        f"windows timed at depths {', '.join(map(str, result.depths + result.depths[-2::-1]))}: {times}; the rate from depth "
        f"{result.depths[1]} is {result.flop_per_s_at(1) / 1e9:.1f} GFLOP/s (linearity check); 1-min load {result.load_1min:.2f}"
    )
    rate = float(f"{result.flop_per_s / TFLOP:.4g}")
    return replace(profile, attention_compute_TFLOP_per_s=rate, sources={**profile.sources, "attention_compute": source})


def check_probe_settings(
    matvec_types: tuple[T, ...], shape: str, matvec_layers: int, attention: bool, attention_layers: int, attention_depth: int
) -> None:
    """One-line errors for bad settings of the steps that will run, before minutes of measuring."""
    if matvec_types:
        probe_config(shape, matvec_layers)
    if attention:
        attention_probe_config(shape, attention_layers, attention_depth)


@dataclass(frozen=True)
class DeviceProbe:
    """What one `probe_device` run measured; `profile` carries the numbers the roofline uses, with sources."""

    profile: DeviceProfile
    stream: StreamResult
    decode: DecodeResult | None
    matvec: list[MatvecResult]
    attention: AttentionResult | None


def probe_device(
    name: str = "host",
    gguf_path: Path | None = None,
    threads: int | None = None,
    array_mib: int = 256,
    decode: bool = True,
    matvec_types: tuple[T, ...] = DEFAULT_MATVEC_TYPES,
    shape: str = DEFAULT_MATVEC_SHAPE,
    matvec_layers: int = DEFAULT_MATVEC_LAYERS,
    attention: bool = True,
    attention_layers: int = DEFAULT_ATTENTION_LAYERS,
    attention_depth: int = DEFAULT_ATTENTION_DEPTH,
    progress: Callable[[str], None] | None = None,
) -> DeviceProbe:
    """The whole probe of this machine, in order: bandwidth, compute and llama.cpp decode (`probe`),
    llama.cpp's matrix-vector rate per ggml type, its decode attention rate; one profile of them all.

    What `recover-lora devices probe` and the pipeline's bench step both run.

    Args:
        name: profile key.
        gguf_path: GGUF llama.cpp decode is timed on (default: the default model).
        threads: threads of every step (default: all cores).
        array_mib: size of each bandwidth-probe array.
        decode: False skips every llama.cpp measurement (decode, matrix-vector, attention).
        matvec_types: ggml types whose matrix-vector rate to measure; () skips that step.
        shape: bundled shape name or config.json of the matrix-vector and attention probe models.
        matvec_layers: layers of that shape in each matrix-vector probe model.
        attention: False skips the attention rate.
        attention_layers: layers of that shape in the attention probe model.
        attention_depth: the deepest KV-cache depth the attention rate is timed at.
        progress: called with a line before each step.

    Example:
        result = probe_device(threads=2, matvec_types=(T.Q4_K,), attention=False)
        result.profile.matvec_weights_per_s[T.Q4_K]
    """
    say = progress or (lambda message: None)
    if not decode:
        matvec_types, attention = (), False
    check_probe_settings(matvec_types, shape, matvec_layers, attention, attention_layers, attention_depth)
    say("memory bandwidth, compute" + (" and llama.cpp decode" if decode else "") + " ...")
    profile, stream, decode_result = probe(name, gguf_path, threads, array_mib, decode)
    matvec_results: list[MatvecResult] = []
    if matvec_types:
        say("llama.cpp's matrix-vector rate per ggml type ...")
        matvec_results = matvec_rates(matvec_types, shape, matvec_layers, stream.threads)
        profile = with_matvec_rates(profile, matvec_results, shape, matvec_layers, stream.threads)
    attention_result = None
    if attention:
        say("llama.cpp's decode attention rate over the KV cache ...")
        attention_result = attention_rate(shape, attention_layers, attention_depth, stream.threads)
        profile = with_attention_rate(profile, attention_result, shape, attention_layers, stream.threads)
    return DeviceProbe(profile, stream, decode_result, matvec_results, attention_result)
