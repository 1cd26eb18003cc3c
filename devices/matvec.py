"""llama.cpp's matrix-vector rate per ggml type on this machine: weights per second.

Decode multiplies every weight matrix by one vector. What that costs per weight depends on the
ggml type, not only on its bytes: a Q2_K weight is fewer bytes than a Q4_K one but takes more
unpacking, and on a small CPU the unpacking, not DRAM, can set the time (on 2 EPYC vCPUs the
Q4_K and Q6_K probes ran at 95-99 % of the read bandwidth, the Q2_K one at 65 %, at about the
same weights/s as Q4_K). So for each type this exports a random-weight model (the exporter's
`--random-weights`; values do not change speed) of a bundled shape cut to a few layers, with
every linear and the output matrix in that type, decodes single tokens with llama.cpp and takes

    rate = matmul weights / median seconds per token.

The file is larger than the caches (2 layers of Qwen3-4B's widths: 67-167 MB for Q2_K-Q6_K), so
each token streams it from DRAM and the rate is a lower bound on the type's compute ceiling that
reproduces the measurement in the roofline's max(bytes / bandwidth, weights / rate). Per-token
work besides the matmuls (norms, attention over fewer than 32 cached tokens, graph set-up) is
charged to the weights; it is a few per cent with two layers of a 4B model. llama.cpp's threads
spin at barriers, so other work on the machine slows every step many times over: probe a quiet
machine.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType as T

from recover_lora.errors import RecoverLoraError
from recover_lora.export.policy import DEFAULT_EMBEDDING_TYPE, HIGH_BITS_TYPE, LOW_BITS_TYPE, Policy, TensorTypeRule

# The types the named policies write: Q4_K linears, Q2_K low-bit linears, Q6_K embedding/output.
DEFAULT_MATVEC_TYPES = (HIGH_BITS_TYPE, LOW_BITS_TYPE, DEFAULT_EMBEDDING_TYPE)
DEFAULT_MATVEC_SHAPE = "qwen3-4b"
DEFAULT_MATVEC_LAYERS = 2
# A byte vocabulary (export.sources.byte_tokenizer needs >= 259): keeps the output matrix small,
# so the linears of the blocks are what the rate measures.
MATVEC_VOCAB_SIZE = 512
_MIN_TOKENS, _MAX_TOKENS = 8, 400
# The KV cache is cleared every this many steps, so attention stays negligible (context < 32).
_RESET_EVERY = 32


@dataclass(frozen=True)
class MatvecResult:
    """One type's measurement: `matvec_weights` weights multiplied per token in `seconds_per_token`."""

    ggml_type: T
    matvec_weights: int
    bytes_per_token: float  # the roofline's weight bytes per token of the probe file
    seconds_per_token: float
    tokens: int
    load_1min: float  # the machine's load average when this type's decode started

    @property
    def weights_per_s(self) -> float:
        return self.matvec_weights / self.seconds_per_token

    @property
    def bytes_per_s(self) -> float:
        return self.bytes_per_token / self.seconds_per_token


def probe_config(shape: str, layers: int) -> dict:
    """The Hugging Face config of `shape` (bundled name or config.json) cut to `layers` layers, small vocabulary."""
    from recover_lora.devices.shapes import SHAPES_DIR, bundled_shape_names
    from recover_lora.export.sources import read_hf_config

    if layers < 1:
        raise RecoverLoraError(f"--matvec-layers {layers} must be >= 1")
    path = SHAPES_DIR / f"{shape.lower()}.json" if shape.lower() in bundled_shape_names() else Path(shape)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise RecoverLoraError(f"--matvec-shape {shape!r} is neither a bundled shape ({', '.join(bundled_shape_names())}) nor a config.json")
    config = read_hf_config(path)
    if "num_hidden_layers" not in config:
        raise RecoverLoraError(f"{path} is not a Hugging Face config.json (no num_hidden_layers)")
    return {**config, "num_hidden_layers": layers, "vocab_size": MATVEC_VOCAB_SIZE}


def parse_matvec_types(text: str) -> tuple[T, ...]:
    """'Q4_K,q2_k' -> (T.Q4_K, T.Q2_K); an unknown name is a one-line error listing the valid ones."""
    from recover_lora.export.policy import parse_ggml_type

    types = tuple(dict.fromkeys(parse_ggml_type(part) for part in text.split(",") if part.strip()))
    if not types:
        raise RecoverLoraError(f"--matvec-types {text!r} names no type; give e.g. Q4_K,Q2_K,Q6_K")
    return types


def decode_seconds_per_token(gguf_path: Path, threads: int, seconds: float) -> tuple[float, int]:
    """Median wall seconds of one single-token llama.cpp decode step, timed for about `seconds`
    (at least 8 and at most 400 steps): (median seconds, steps). The median shrugs off steps
    slowed by other work on the machine."""
    from recover_lora.runtime.llama import LlamaOptions, load_llama
    from recover_lora.runtime.timer import LlamaTimer

    loaded = load_llama(gguf_path, options=LlamaOptions(n_ctx=2 * _RESET_EVERY, threads=threads, gpu_layers=0))
    try:
        timer = LlamaTimer(loaded)
        token = timer.any_token
        timer.decode_steps([token, token])  # warm-up: first-call allocations, weights paged in
        steps: list[float] = []
        start = time.perf_counter()
        while len(steps) < _MAX_TOKENS and (len(steps) < _MIN_TOKENS or time.perf_counter() - start < seconds):
            if timer.depth >= _RESET_EVERY:
                timer.rewind(0)  # the next step starts at position 0 and drops the cached rows
            steps.append(timer.decode([token]))
    finally:
        loaded.close()
    return statistics.median(steps), len(steps)


def matvec_rates(
    types: tuple[T, ...] = DEFAULT_MATVEC_TYPES,
    shape: str = DEFAULT_MATVEC_SHAPE,
    layers: int = DEFAULT_MATVEC_LAYERS,
    threads: int | None = None,
    seconds: float = 2.0,
) -> list[MatvecResult]:
    """Measure llama.cpp's matrix-vector rate for each ggml type (files in a temporary folder).

    Args:
        types: ggml types to measure.
        shape: bundled shape name or config.json whose widths the probe model has.
        layers: blocks of that shape in the probe model (more: larger file, slower probe).
        threads: llama.cpp threads for quantizing and decoding (default: all cores).
        seconds: decode time per type.

    Example:
        [(r.ggml_type.name, r.weights_per_s / 1e9) for r in matvec_rates(threads=2)]  # G weights/s
    """
    from recover_lora.devices.roofline import matmul_weight_elements, token_cost
    from recover_lora.devices.shapes import FILE_POLICY, load_model_shape
    from recover_lora.export.quantize import export_model

    if not types:
        raise RecoverLoraError("no ggml types to measure; give e.g. Q4_K,Q2_K,Q6_K")
    if seconds <= 0:
        raise RecoverLoraError(f"matrix-vector probe time {seconds} s must be positive")
    config = probe_config(shape, layers)  # fails before any export
    threads = threads or os.cpu_count() or 1
    results = []
    with tempfile.TemporaryDirectory(prefix="recover-lora-matvec-") as work_dir:
        config_path = Path(work_dir) / "config.json"
        config_path.write_text(json.dumps(config))
        for ggml_type in types:
            policy = Policy.named("w4", rules=[TensorTypeRule(".*", ggml_type)])  # every linear, embedding and output
            path = export_model(config_path, Path(work_dir) / f"probe.{ggml_type.name}.gguf", policy, threads=threads, random_weights=True).path
            probe_shape = load_model_shape(path)
            load_1min = os.getloadavg()[0]
            seconds_per_token, steps = decode_seconds_per_token(path, threads, seconds)
            path.unlink()  # one probe file on disk at a time
            results.append(
                MatvecResult(
                    ggml_type=ggml_type,
                    matvec_weights=matmul_weight_elements(probe_shape.file_tensors),
                    bytes_per_token=token_cost(probe_shape, FILE_POLICY, 0).weights.bytes,
                    seconds_per_token=seconds_per_token,
                    tokens=steps,
                    load_1min=load_1min,
                )
            )
    return results
