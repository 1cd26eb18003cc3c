"""`recover-lora search`: choose every tensor's ggml type, and whether to pad, under a byte cap and a decode floor.

The space: for each tensor a policy types (block linears, token embedding, untied output), every
candidate type whose block divides the tensor's row width as exported, under each padding mode:
"none" (the model's own widths: a 576-wide row takes only block-32 types, Q4_0 ... Q8_0, IQ4_NL) and
"auto" (widths padded to multiples of 256, exactly, so K and IQ types fit, at the padding's extra
bytes). llama.cpp's stock presets and the named policies are points of this space.

For each (tensor, type) the search knows, exactly, the bytes and the error: the tensor goes through
llama.cpp's own quantizer (`ggml_quantize.round_trip`, the file's very bytes, importance matrix included)
and the error costs ½ Σ F ΔW² of predicted KL, F the teacher's Fisher diagonal on calibration text
(recovery/fisher.py). The decode time of a choice is the tensor's weights over llama.cpp's decode rate of
its type, measured on this machine on a random-weight model of this model's shape (`measure_type_rates`),
or bytes read over a bandwidth (`--decode bytes`, a device profile).

The selection is greedy on the exact table: start from the smallest choice of every tensor (made fast
enough first, if it is not), then apply the change with the most predicted KL saved per byte added that
keeps both limits, until none does. The winner is exported by the exporter (one rule per tensor), so its
types are checked and it loads in llama.cpp before it is renamed into place; if the file's metadata push it
over the cap, the tensor budget shrinks by the excess and the selection runs again. With a reference, the
winner is then timed against it in llama.cpp, and the decode budget moves (then is bisected) until a file
meets the floor; the most accurate file that met it is kept.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from recover_lora.errors import RecoverLoraError

# Block-32 types fit any width that is a multiple of 32; K and IQ4_XS / IQ3_S types need 256.
BLOCK32_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL, T.Q8_0)
SUPERBLOCK_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS, T.IQ3_S)
DEFAULT_CANDIDATES = BLOCK32_TYPES + SUPERBLOCK_TYPES
PAD_CHOICES = ("none", "auto")
# A row of bytes read per decode token for an untied token embedding (a lookup), else every weight.
TOKEN_EMBEDDING = "token_embd.weight"
MAX_EXPORT_ROUNDS = 4
GGUF_ALIGNMENT = 32  # general.alignment's default: each tensor's data starts on such a boundary


def aligned(n_bytes: int) -> int:
    """A tensor's bytes in a GGUF file: its data padded to the alignment (the file is its header plus these)."""
    return -(-n_bytes // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
# A measured decode ratio this close below the floor meets it: the per-repeat ratios of 5 interleaved repeats
# scatter by a few per cent on a 2-core machine, and chasing that noise would trade accuracy for nothing.
DECODE_TOLERANCE = 0.01
VERIFY_REPEATS, VERIFY_N_GEN = 5, 64
# Decode-rate probe: every candidate type timed round-robin this many times, this many seconds each.
RATE_ROUNDS, RATE_SECONDS = 3, 1.0
DECODE_MODELS = ("measured", "bytes")
# Rows of a tensor quantized to estimate its error in each type: the MIN_SAMPLED_ROWS rows of most Fisher mass, each
# counted exactly, and MIN_SAMPLED_ROWS more spread evenly over the rest in order of their mass, each standing for the
# rows around it (all rows of smaller tensors). ggml quantizes every row on its own (blocks never cross rows, the
# importance weights are per column), so the error is a sum over rows and every type is judged on the same rows;
# bytes stay exact (rows × the row's bytes). Ordering by mass matters where a few rows hold most of it: in the default
# model's tied token embedding the top 1 % of rows (frequent tokens) hold 67 % of the Fisher, and rows evenly spaced
# by index put its IQ4_NL error at 0.035 where every row gives 0.078 (tests check both shapes of tensor).
MIN_SAMPLED_ROWS = 256


@dataclass(frozen=True)
class Choice:
    ggml_type: T
    bytes: int  # in the file: the tensor's data padded to GGUF's alignment, as every writer lays it out
    kl: float  # predicted KL contribution: ½ Σ F ΔW²
    seconds: float  # predicted decode seconds per token of this tensor


@dataclass
class PadPlan:
    """The best selection under one padding mode."""

    pad: str
    types: dict[str, str]
    tensor_bytes: int
    predicted_kl: float
    predicted_seconds: float
    feasible: bool
    smallest_tensor_bytes: int


@dataclass
class SearchResult:
    path: str
    pad: str
    types: dict[str, str]
    file_bytes: int
    max_bytes: int
    predicted_kl: float
    predicted_decode_ratio: float | None  # predicted tokens/s over the reference's (same model of the device)
    reference: str | None
    # Decode tokens/s over the reference's as llama.cpp measured it (interleaved, median of the per-repeat ratios), where checked.
    measured_decode_ratio: float | None = None
    decode_floor_met: bool | None = None
    plans: list[PadPlan] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DecodeModel:
    """Seconds per decode token of a tensor of a type: max(bytes read / bandwidth, weights / the type's rate).

    Either term may be absent: measured rates alone (`measure_type_rates`: they already hold the memory
    time of a file of the model's own shape), or a bandwidth alone (bytes read per token, `BYTES_ONLY`)."""

    matvec_weights_per_s: dict = field(default_factory=dict)
    bandwidth_bytes_per_s: float | None = None
    source: str = ""

    @classmethod
    def from_profile(cls, profile) -> "DecodeModel":
        return cls(dict(profile.matvec_weights_per_s), profile.bandwidth_bytes_per_s, f"device profile {profile.key}")

    def seconds(self, name: str, shape: tuple[int, ...], ggml_type: T, n_bytes: int, tied: bool) -> float:
        bandwidth = self.bandwidth_bytes_per_s
        if len(shape) < 2 or (name == TOKEN_EMBEDDING and not tied):  # norms; an embedding row looked up
            return 0.0 if bandwidth is None else n_bytes / (1 if len(shape) < 2 else shape[0]) / bandwidth
        memory = 0.0 if bandwidth is None else n_bytes / bandwidth
        rate = self.matvec_weights_per_s.get(ggml_type)
        if rate is None and bandwidth is None:
            raise RecoverLoraError(f"no measured decode rate for {ggml_type.name} ({self.source}); measure it with the other types")
        return max(memory, int(np.prod(shape)) / rate) if rate else memory


# Without measured rates the decode floor is a bytes-read floor: any bandwidth gives the same ratios.
BYTES_ONLY = DecodeModel(bandwidth_bytes_per_s=1e9, source="bytes read per token")


def measure_type_rates(config, types: tuple[T, ...], threads: int | None = None, rounds: int = RATE_ROUNDS,
                       seconds: float = RATE_SECONDS, use_cache: bool = True, progress: Callable[[str], None] | None = None) -> DecodeModel:
    """llama.cpp's decode rate (matmul weights per second) of each type on this machine, measured on a random-weight
    model of this model's own shape (every layer, a small vocabulary: devices/matvec.py's probe), padded where the type
    needs it. The types are timed round-robin, `rounds` times `seconds` each, and each rate is from its median round:
    a 2-core machine's load drifts, and timing the types one after the other would hand the drift to one type.

    Kept per llama.cpp build, CPU and extra-buffer-type choice in ~/.cache/recover-lora/decode-rates/ (`use_cache=False`
    measures again): what the rates depend on besides the machine's load.
    """
    import hashlib
    import statistics
    import tempfile

    from recover_lora.devices.matvec import MATVEC_VOCAB_SIZE, decode_seconds_per_token
    from recover_lora.devices.roofline import matmul_weight_elements
    from recover_lora.devices.shapes import load_model_shape
    from recover_lora.export.policy import Policy, TensorTypeRule
    from recover_lora.export.quantize import export_model
    from recover_lora.fileio import atomic_output
    from recover_lora.runtime.llama_build import cache_root
    from recover_lora.runtime.llama_selftest import build_key, extra_buffer_types

    hf_config = config.to_hf_config()
    types = tuple(dict.fromkeys(types))
    key = hashlib.sha256(json.dumps(["rates-v2", build_key(), extra_buffer_types(), hf_config, [t.name for t in types], threads,
                                     rounds, seconds], sort_keys=True, default=str).encode()).hexdigest()[:16]
    cached = cache_root() / "decode-rates" / f"{key}.json"
    if use_cache and cached.is_file():
        data = json.loads(cached.read_text())
        return DecodeModel({T[name]: float(rate) for name, rate in data["weights_per_s"].items()}, None, f"measured rates ({cached})")
    with tempfile.TemporaryDirectory(prefix="recover-lora-rates-") as work_dir:
        config_path = Path(work_dir) / "config.json"
        # The model's own layers and widths; a small vocabulary keeps the output matrix from dominating the time.
        config_path.write_text(json.dumps({**hf_config, "vocab_size": MATVEC_VOCAB_SIZE}))
        files = {}
        for ggml_type in types:
            if progress:
                progress(f"decode rates: a random-weight model of this shape in {ggml_type.name} ...")
            policy = Policy.named("w4", rules=[TensorTypeRule(".*", ggml_type)])  # every linear and the output matrix
            files[ggml_type] = export_model(config_path, Path(work_dir) / f"probe.{ggml_type.name}.gguf", policy, threads=threads,
                                            random_weights=True).path
        timings: dict[T, list[float]] = {t: [] for t in types}
        for round_index in range(rounds):
            if progress:
                progress(f"decode rates: timing round {round_index + 1}/{rounds} of {len(types)} types ...")
            for ggml_type, path in files.items():
                timings[ggml_type].append(decode_seconds_per_token(path, threads or os.cpu_count() or 1, seconds)[0])
        weights = {t: matmul_weight_elements(load_model_shape(path).file_tensors) for t, path in files.items()}
    rates = {t: weights[t] / statistics.median(timings[t]) for t in types}
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(cached, force=True) as tmp:
        tmp.write_text(json.dumps({"weights_per_s": {t.name: r for t, r in rates.items()},
                                   "seconds_per_token": {t.name: v for t, v in timings.items()}, "load_1min": os.getloadavg()[0]}))
    return DecodeModel(rates, None, "llama.cpp decode rates measured on this machine")


def file_decode_seconds(path: Path, model: DecodeModel) -> float:
    """Predicted decode seconds per token (context 0) of an existing GGUF, tensor by tensor."""
    from recover_lora.export.gguf_header import read_gguf_header

    header = read_gguf_header(path)
    names = {t.name for t in header.tensors}
    tied = "output.weight" not in names
    return sum(model.seconds(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), T(int(t.tensor_type)), int(t.n_bytes), tied)
               for t in header.tensors)


def sampled_rows(row_mass: np.ndarray, min_rows: int | None = MIN_SAMPLED_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(rows, how many rows each stands for): the `min_rows` rows of most mass (each itself), then every k-th row of the
    rest in order of mass, standing for k rows; every row of a tensor of at most 2 × `min_rows` (or min_rows None)."""
    n = len(row_mass)
    if min_rows is None or n <= 2 * min_rows:
        return np.arange(n), np.ones(n)
    order = np.argsort(row_mass, kind="stable")[::-1]
    top, rest = order[:min_rows], order[min_rows:]
    stride = max(1, len(rest) // min_rows)
    picked = rest[stride // 2 :: stride]
    return np.concatenate([top, picked]), np.concatenate([np.ones(len(top)), np.full(len(picked), len(rest) / len(picked))])


def choice_table(weights, fisher: dict[str, np.ndarray], matrix, candidates: tuple[T, ...], model: DecodeModel,
                 threads: int | None = None, progress: Callable[[str], None] | None = None,
                 min_rows: int | None = MIN_SAMPLED_ROWS) -> dict[str, list[Choice]]:
    """Every (tensor, candidate type) of the model as exported (`weights` padded or not): bytes, predicted KL, seconds.

    `fisher`: Hugging Face name -> Fisher diagonal of the unpadded model; `matrix`: the importance matrix of
    these widths (or None). Both are laid out as the GGUF stores the tensor (padded, q/k permuted).
    `min_rows`: the error is estimated on at least this many evenly spaced rows (MIN_SAMPLED_ROWS); None: every row.
    """
    from recover_lora.export.ggml_quantize import round_trip
    from recover_lora.export.imatrix_file import TYPES_NEEDING_IMATRIX, quantizer_weights
    from recover_lora.export.model import gguf_name
    from recover_lora.export.pad import pad_tensor
    from recover_lora.export.policy import is_quantizable

    config = weights.config
    arch = config.arch
    tied = config.tie_word_embeddings
    unpadded = _unpadded_config(weights)
    table: dict[str, list[Choice]] = {}
    names = [n for n in weights.tensors if n in arch.hf_tensor_shapes(config) and is_quantizable(gguf_name(n, config))]
    for index, hf in enumerate(names):
        name = gguf_name(hf, config)
        array = arch.to_gguf(hf, np.asarray(weights.tensors[hf], dtype=np.float32), config)
        if array.ndim != 2:
            continue
        sensitivity = fisher.get(hf)
        if sensitivity is None:
            raise RecoverLoraError(f"the Fisher diagonal has no entry for {hf}; it was computed on another model")
        if unpadded is not None:
            sensitivity = pad_tensor(hf, sensitivity, unpadded, config)
        sensitivity = arch.to_gguf(hf, sensitivity, config)
        importance = quantizer_weights(matrix, [name])[name] if matrix is not None and name in matrix.sums else None
        # No candidate block divides the rows (e.g. 172 wide): llama.cpp's own presets keep such a tensor F16.
        fitting = [t for t in candidates if array.shape[1] % gguf.GGML_QUANT_SIZES[t][0] == 0] or [T.F16]
        rows, stands_for = sampled_rows(sensitivity.sum(axis=1, dtype=np.float64), min_rows)
        sample, sample_sensitivity = array[rows], sensitivity[rows]
        choices = []
        for ggml_type in fitting:
            weights_for_type = importance
            if weights_for_type is None and ggml_type in TYPES_NEEDING_IMATRIX:
                weights_for_type = np.ones(array.shape[1], dtype=np.float32)  # as the exporter hands llama.cpp
            restored, sample_bytes = round_trip(sample, ggml_type, weights_for_type, threads)
            n_bytes = sample_bytes // len(rows) * array.shape[0]
            kl = 0.5 * float(stands_for @ np.sum(sample_sensitivity * (restored - sample) ** 2, axis=1, dtype=np.float64))
            choices.append(Choice(ggml_type, aligned(n_bytes), kl, model.seconds(name, array.shape, ggml_type, n_bytes, tied)))
        table[name] = choices
        if progress and (index + 1) % 25 == 0:
            progress(f"quantized {index + 1}/{len(names)} tensors in every candidate type")
    return table


def _unpadded_config(weights):
    if not weights.unpadded:
        return None
    import dataclasses

    return dataclasses.replace(weights.config, **weights.unpadded)


def select(table: dict[str, list[Choice]], max_bytes: float, max_seconds: float,
           start: dict[str, T] | None = None) -> tuple[dict[str, Choice], bool]:
    """Greedy choice per tensor: (choices, whether both limits hold). Starts from each tensor's smallest
    choice (made fast enough first, if it is not); each round applies the feasible change with the most
    predicted KL saved per byte added.

    `start`: a choice of types known to meet both limits (the reference's own, where every tensor has its type
    among the choices), greedily improved the same way; the feasible result with less predicted KL is returned.
    Finding a fast enough start from the smallest types is a knapsack problem the greedy can miss (it spends the
    bytes on the best seconds-per-byte changes first), and a search must never fail where the reference it is
    measured against is itself a choice.
    """
    names = list(table)
    width = max(len(c) for c in table.values())
    kl = np.full((len(names), width), np.inf)
    size = np.full((len(names), width), np.inf)
    secs = np.full((len(names), width), np.inf)
    for i, name in enumerate(names):
        for j, choice in enumerate(table[name]):
            kl[i, j], size[i, j], secs[i, j] = choice.kl, choice.bytes, choice.seconds
    # Seconds are sums of floats in another order than the reference's own total: a hair over is not over.
    max_seconds = max_seconds * (1 + 1e-9)
    rows = np.arange(len(names))
    # Each tensor starts at its smallest choice (the least error among equally small ones).
    smallest = np.array([min(range(len(table[name])), key=lambda j: (size[i, j], kl[i, j])) for i, name in enumerate(names)])
    starts = [_make_fast_enough(smallest, size, secs, max_bytes, max_seconds)]
    if start is not None and all(name in start for name in names):
        given = [next((j for j, c in enumerate(table[name]) if c.ggml_type == start[name]), None) for name in names]
        if None not in given:
            starts.append(np.array(given))
    results = []
    for current in starts:
        feasible = size[rows, current].sum() <= max_bytes and secs[rows, current].sum() <= max_seconds
        if feasible:
            current = _spend_on_accuracy(current, kl, size, secs, max_bytes, max_seconds)
        results.append((not feasible, kl[rows, current].sum(), current))
    _, _, current = min(results, key=lambda r: (r[0], r[1]))
    feasible = size[rows, current].sum() <= max_bytes and secs[rows, current].sum() <= max_seconds
    return {name: table[name][current[i]] for i, name in enumerate(names)}, bool(feasible)


def _make_fast_enough(current: np.ndarray, size: np.ndarray, secs: np.ndarray, max_bytes: float, max_seconds: float) -> np.ndarray:
    """The smallest types need not be the fastest (a 2-bit row can take longer to unpack than a 4-bit one): while the
    decode floor is missed, take the change that saves the most seconds per byte added within the byte cap."""
    current = current.copy()
    rows = np.arange(len(current))
    total_bytes, total_seconds = size[rows, current].sum(), secs[rows, current].sum()
    while total_seconds > max_seconds:
        with np.errstate(invalid="ignore"):
            faster = secs[rows, current][:, None] - secs
        added = size - size[rows, current][:, None]
        fits = (total_bytes + added <= max_bytes) & (faster > 0)
        if not fits.any():
            break
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(fits, faster / np.maximum(added, 1.0), -np.inf)
        score = np.where(fits & (added <= 0), np.inf, score)
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        total_bytes += added[i, j]
        total_seconds -= faster[i, j]
        current[i] = j
    return current


def _spend_on_accuracy(current: np.ndarray, kl: np.ndarray, size: np.ndarray, secs: np.ndarray, max_bytes: float,
                       max_seconds: float) -> np.ndarray:
    """From a choice within both limits, apply the change with the most predicted KL saved per byte added until none fits."""
    current = current.copy()
    rows = np.arange(len(current))
    total_bytes, total_seconds = size[rows, current].sum(), secs[rows, current].sum()
    while True:
        with np.errstate(invalid="ignore"):  # inf - inf where a tensor has fewer choices: never a fit
            saved = kl[rows, current][:, None] - kl
        added = size - size[rows, current][:, None]
        fits = (total_bytes + added <= max_bytes) & (total_seconds + secs - secs[rows, current][:, None] <= max_seconds) & (saved > 0)
        if not fits.any():
            return current
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(fits, saved / np.maximum(added, 1.0), -np.inf)
        score = np.where(fits & (added <= 0), np.inf, score)  # fewer bytes and less error: always take it
        i, j = np.unravel_index(int(np.argmax(score)), score.shape)
        total_bytes += added[i, j]
        total_seconds += secs[i, j] - secs[i, current[i]]
        current[i] = j


def search_types(
    source: str | Path | None,
    out_path: str | Path,
    imatrix: str | Path,
    samples: str | Path | None = None,
    text: str | Path | None = None,
    max_bytes: int | None = None,
    min_decode: float | None = None,
    reference: str | Path | None = None,
    decode="measured",
    candidates: tuple[T, ...] = DEFAULT_CANDIDATES,
    pads: tuple[str, ...] = PAD_CHOICES,
    max_samples: int = 32,
    seq_len: int | None = 256,
    threads: int | None = None,
    device: str = "cpu",
    verify_decode: bool = True,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Search per-tensor types and padding, export the winner to `out_path`, and return what it chose.

    Args:
        imatrix: importance matrix of the model's own widths (`recover-lora imatrix --pad none`); padded
            candidates get it padded.
        samples / text: calibration text for the Fisher diagonal (a synth folder or a .txt/.jsonl file).
        max_bytes: cap on the file's bytes (default: the reference file's).
        min_decode: floor on predicted decode tokens/s as a ratio to the reference's (default 1.0 with a reference).
        reference: a GGUF of the same model (e.g. stock IQ4_XS) that sets the default limits.
        verify_decode: with a reference, time the winner against it in llama.cpp (`measured_decode_ratio`) and, when it
            is slower than the floor, select again under a tighter decode budget, or under a looser one when every
            repeat was faster than the floor (at most MAX_EXPORT_ROUNDS files).
        decode: how decode time is predicted: "measured" (llama.cpp's rate of each type on this machine, on this
            model's shape: `measure_type_rates`), "bytes" (bytes read per token), or a DeviceProfile.

    Example:
        search_types(None, "searched.gguf", "imatrix.gguf", samples="runs/synth", reference="IQ4_XS.gguf")
    """
    import time

    from recover_lora.export.imatrix_file import read_imatrix
    from recover_lora.export.pad import needs_padding, pad_imatrix, pad_model
    from recover_lora.export.sources import load_model
    from recover_lora.fileio import check_output
    from recover_lora.recovery.fisher import kl_fisher_diagonal
    from recover_lora.recovery.imatrix import calibration_windows

    start = time.perf_counter()
    say = progress or (lambda message: None)
    out_path = check_output(out_path, force)
    bad = [p for p in pads if p not in PAD_CHOICES]
    if bad or not pads:
        raise RecoverLoraError(f"--pad {bad[0] if bad else ''!r} is not a padding choice; use {' and/or '.join(PAD_CHOICES)}")
    if reference is not None and not Path(reference).is_file():
        raise RecoverLoraError(f"reference {reference} does not exist; give a GGUF of the same model (e.g. `export --llama-preset IQ4_XS`)")
    if max_bytes is None:
        if reference is None:
            raise RecoverLoraError("give --max-bytes N or --reference FILE (its bytes are the cap)")
        max_bytes = Path(reference).stat().st_size
    if min_decode is not None and reference is None:
        raise RecoverLoraError("--min-decode is a ratio to the reference's predicted decode; give --reference FILE too")
    if isinstance(decode, str) and decode not in DECODE_MODELS:
        raise RecoverLoraError(f"--decode {decode!r} is not valid; use one of: {', '.join(DECODE_MODELS)} (or --device-profile)")
    matrix = read_imatrix(imatrix)
    weights = load_model(source)
    own_widths = {n: s[-1] for n, s in weights.config.arch.gguf_tensor_shapes(weights.config).items()}
    wrong = [n for n, w in matrix.widths().items() if own_widths.get(n) != w]
    if wrong:
        raise RecoverLoraError(f"{imatrix} gives {wrong[0]} {matrix.widths()[wrong[0]]} columns, not the model's own "
                               f"{own_widths.get(wrong[0])}: make it with `recover-lora imatrix --pad none` from this model")
    if decode == "measured":
        reference_types = _file_types(Path(reference)) if reference is not None else ()
        widths = {shape[-1] for shape in own_widths_shapes(weights.config)}
        fallback = (T.F16,) if any(all(w % gguf.GGML_QUANT_SIZES[c][0] for c in candidates) for w in widths) else ()
        model = measure_type_rates(weights.config, tuple(candidates) + reference_types + fallback, threads, progress=say)
    else:
        model = BYTES_ONLY if decode == "bytes" else DecodeModel.from_profile(decode)
    max_seconds = np.inf
    if reference is not None:
        max_seconds = file_decode_seconds(Path(reference), model) / (1.0 if min_decode is None else min_decode)
    # The reference's header (metadata, vocabulary): the first guess at this model's, and its types a start the
    # selection can always fall back on (pad none: the same tensors).
    header_bytes, reference_types = _header_and_types(Path(reference)) if reference is not None else (None, None)
    ids, counted, _ = calibration_windows(source, samples, text, max_samples, seq_len)
    say(f"Fisher diagonal of the teacher on {int(counted.sum())} tokens ...")
    fisher = kl_fisher_diagonal(source, ids, counted, device=device, progress=say)
    # What every choice under one padding shares: its F32 tensors (padded norms are wider) in bytes and decode seconds.
    fixed_bytes: dict[str, int] = {}
    fixed_seconds: dict[str, float] = {}
    tables: dict[str, dict[str, list[Choice]]] = {}
    for pad in pads:
        if pad == "auto" and not needs_padding(weights.config):
            continue
        exported = pad_model(weights) if pad == "auto" else weights
        pad_matrix = pad_imatrix(matrix, weights.config, exported.config) if exported is not weights else matrix
        say(f"[pad {pad}] quantizing every tensor in {len(candidates)} candidate types ...")
        table = choice_table(exported, fisher, pad_matrix, candidates, model, threads, say)
        tables[pad] = table
        fixed_bytes[pad], fixed_seconds[pad] = _fixed_bytes(exported, header_bytes), _fixed_seconds(exported, model)
    # The tensor budget: the cap less the F32 tensors and metadata (learned from the file, below). The decode budget:
    # the reference's predicted seconds over the floor. llama.cpp then times each winner against the reference, and the
    # budget moves by the measured shortfall (or by a surplus every repeat shows) until one budget missed the floor and
    # one met it, then is bisected between them; the file kept is the most accurate winner that met it.
    overhead = dict.fromkeys(tables, 0)  # header bytes the first guess missed, per padding (a padded header differs)
    budget = max_seconds  # a token's seconds
    floor = 1.0 if min_decode is None else min_decode
    missed_at = met_at = None  # decode budgets whose winners llama.cpp timed below / at the floor
    kept = None  # (plan, plans, measured ratio) of the most accurate winner that met the floor
    on_disk = last = None  # the plan whose file out_path holds; (plan, plans, measured ratio) of the last winner
    for _ in range(MAX_EXPORT_ROUNDS):
        results = {}
        for pad, table in tables.items():
            chosen, feasible = select(table, max_bytes - fixed_bytes[pad] - overhead[pad], budget - fixed_seconds[pad],
                                      start=reference_types if pad == "none" else None)
            smallest = sum(min(c.bytes for c in choices) for choices in table.values())
            results[pad] = PadPlan(pad, {n: c.ggml_type.name for n, c in chosen.items()}, sum(c.bytes for c in chosen.values()),
                                   sum(c.kl for c in chosen.values()), sum(c.seconds for c in chosen.values()), feasible, smallest)
        feasible = [p for p in results.values() if p.feasible]
        if not feasible and last is not None:
            break  # a tightened decode budget fits nothing: settle on what was measured
        if not feasible:
            smallest = min(results.values(), key=lambda p: p.smallest_tensor_bytes)
            raise RecoverLoraError(
                f"no choice of types fits {max_bytes:,} bytes and the decode floor: the smallest file this search can make is about "
                f"{smallest.smallest_tensor_bytes + fixed_bytes[smallest.pad] + overhead[smallest.pad]:,} bytes (pad {smallest.pad}); raise --max-bytes, lower --min-decode "
                "or add smaller --types"
            )
        best = min(feasible, key=lambda p: p.predicted_kl)
        if last is not None and best.types == last[0].types:
            break  # the bisection found no other file
        file_bytes = _export_plan(source, out_path, best, matrix, threads, say)
        on_disk = best
        if file_bytes > max_bytes:
            # The header this padding writes, measured (the tensors' bytes are exact, alignment included): the next
            # selection fits by construction.
            overhead[best.pad] = file_bytes - best.tensor_bytes - fixed_bytes[best.pad]
            continue
        if not verify_decode or reference is None:
            last = (best, list(results.values()), None)
            break
        say(f"timing the winner against {Path(reference).name} in llama.cpp ...")
        ratio, lowest = measured_decode_ratio(Path(reference), Path(out_path), threads)
        last = (best, list(results.values()), ratio)
        if ratio >= floor * (1 - DECODE_TOLERANCE):
            if kept is None or best.predicted_kl < kept[0].predicted_kl:
                kept = last
            met_at = budget
            if missed_at is None and ratio <= floor * (1 + DECODE_TOLERANCE):
                say(f"measured decode {ratio:.3f} x the reference: meets the floor {floor:.2f}")
                break
            if lowest < floor:
                # A surplus inside the repeats' own spread is noise: on a shared 2-core machine single repeats of one
                # pair differ by 10-20 %, and loosening on such a median once kept a file 9 % slower than the floor.
                say(f"measured decode {ratio:.3f} x the reference (slowest repeat {lowest:.3f}): meets the floor {floor:.2f}")
                break
            say(f"measured decode {ratio:.3f} x the reference (every repeat >= {floor:.2f}): meets the floor, trying a looser "
                f"decode budget")
        else:
            say(f"measured decode {ratio:.3f} x the reference: below the floor {floor:.2f}, trying a tighter decode budget")
            missed_at = budget
        # Bisect once both sides are known; until then move by the measured surplus or shortfall.
        budget = (missed_at + met_at) / 2 if missed_at is not None and met_at is not None else budget * ratio / floor
    if last is None:
        if on_disk is not None:
            Path(out_path).unlink(missing_ok=True)  # this call's file, over the cap
        raise RecoverLoraError(f"the searched file stayed over {max_bytes:,} bytes after {MAX_EXPORT_ROUNDS} rounds; raise --max-bytes")
    best, plans, measured_ratio = kept or last
    if on_disk is not best:
        _export_plan(source, out_path, best, matrix, threads, say)  # the most accurate file that met the floor
    result_path = Path(out_path)
    file_bytes = result_path.stat().st_size
    ratio = None
    if reference is not None:
        ratio = file_decode_seconds(Path(reference), model) / file_decode_seconds(result_path, model)
    return SearchResult(path=str(result_path), pad=best.pad, types=best.types, file_bytes=file_bytes, max_bytes=int(max_bytes),
                        predicted_kl=best.predicted_kl, predicted_decode_ratio=ratio,
                        reference=None if reference is None else str(reference), plans=plans,
                        measured_decode_ratio=measured_ratio,
                        decode_floor_met=None if measured_ratio is None else measured_ratio >= floor * (1 - DECODE_TOLERANCE),
                        seconds=round(time.perf_counter() - start, 1))


def measured_decode_ratio(reference: Path, candidate: Path, threads: int | None = None) -> tuple[float, float]:
    """Decode tokens/s of `candidate` over `reference`'s, measured in llama.cpp: interleaved repeats (A B, B A, ...) at
    depth 0; (the median of the per-repeat ratios, as `recover-lora bench` reports, and the lowest)."""
    from recover_lora.runtime.bench import BenchConfig, Variant, run_bench

    records = run_bench([Variant(reference), Variant(candidate)],
                        BenchConfig(depths=(0,), repeats=VERIFY_REPEATS, n_gen=VERIFY_N_GEN, threads=threads, hash_files=False))
    ratio = records[1]["ratio_vs_baseline"]["tg"]
    return float(ratio["median"]), float(ratio["min"])


def _export_plan(source, out_path, plan: PadPlan, matrix, threads, say) -> int:
    """Write `plan` to out_path through the exporter (one anchored rule per tensor; types checked, loaded in llama.cpp)."""
    from recover_lora.export.policy import Policy, TensorTypeRule
    from recover_lora.export.quantize import export_model

    rules = [TensorTypeRule(re.escape(name), T[type_name]) for name, type_name in plan.types.items()]
    say(f"exporting the winner: pad {plan.pad}, predicted KL {plan.predicted_kl:.4f}, {plan.tensor_bytes:,} tensor bytes ...")
    result = export_model(source, out_path, Policy.named("w4", rules=rules), pad=plan.pad, force=True, threads=threads, imatrix=matrix)
    return result.path.stat().st_size


def _fixed_bytes(weights, header_bytes: int | None = None) -> int:
    """Bytes every choice shares: the F32 tensors (norms, biases) and a first guess at the header (`header_bytes`,
    else the source GGUF's where the source is one, else none: the first export measures it)."""
    from recover_lora.export.policy import is_quantizable

    config = weights.config
    shapes = config.arch.gguf_tensor_shapes(config)
    f32 = sum(aligned(4 * int(np.prod(s))) for n, s in shapes.items() if not is_quantizable(n))
    source = Path(weights.source) if weights.source else None
    if header_bytes is None and source is not None and source.is_file() and source.suffix == ".gguf":
        header_bytes, _ = _header_and_types(source)
    return f32 + (header_bytes or 0)


def _header_and_types(path: Path) -> tuple[int, dict[str, T]]:
    """A GGUF's header bytes (everything before its first tensor's data) and each tensor's type."""
    from recover_lora.export.gguf_header import read_gguf_header

    header = read_gguf_header(path)
    start = min((t.data_offset for t in header.tensors), default=header.file_bytes)
    return start, {t.name: T(int(t.tensor_type)) for t in header.tensors}


def _fixed_seconds(weights, model: DecodeModel) -> float:
    """Decode seconds of the F32 tensors, which every choice reads."""
    from recover_lora.export.policy import is_quantizable

    config = weights.config
    shapes = config.arch.gguf_tensor_shapes(config)
    return sum(model.seconds(n, tuple(s), T.F32, 4 * int(np.prod(s)), config.tie_word_embeddings)
               for n, s in shapes.items() if not is_quantizable(n))


def own_widths_shapes(config) -> list[tuple[int, ...]]:
    """Shapes of the tensors a search types, at the model's own widths."""
    from recover_lora.export.policy import is_quantizable

    return [shape for name, shape in config.arch.gguf_tensor_shapes(config).items() if is_quantizable(name) and len(shape) == 2]


def _file_types(path: Path) -> tuple[T, ...]:
    """The quantized types a GGUF holds (what a decode model must know to predict it)."""
    from recover_lora.export.gguf_header import read_gguf_header

    found = {T(int(t.tensor_type)) for t in read_gguf_header(path).tensors if len(t.shape) > 1}
    return tuple(sorted(found))


def write_search_json(result: SearchResult, path: str | Path) -> None:
    from recover_lora.fileio import atomic_output

    with atomic_output(path, force=True) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2))
