"""Tokens/s of GGUF models (with or without a LoRA adapter) at several KV-cache depths.

Method (as llama-bench's `-d`): for each depth d, fill the KV cache with d random tokens, then
time prompt processing (pp: `n_prompt` tokens decoded as one batch at positions d..) and text
generation (tg: `n_gen` single-token decodes at positions d..), removing the timed tokens from
the cache between samples so every sample starts from the same d-token state. One warm-up
sample per model and depth is discarded. Timing is wall clock around `llama_decode` followed
by `llama_synchronize` (so GPU back ends are timed to completion). With several variants the
samples interleave (A B, B A, A B, ...): slow drifts of a shared machine hit every variant alike,
and per-repeat ratios against the first variant are recorded.

Record schema (one JSON object per line, appended to `devices/results/bench-<host>.jsonl`):

    schema_version    int, currently 1
    kind              "bench"
    run_id            hex id shared by every record of one invocation
    timestamp         UTC ISO-8601 time the record was made
    device            device_fingerprint(): host, cpu_model, cpu_cores_{logical,physical,usable},
                      ram_bytes, os, os_release, platform, machine, android, python,
                      llama_cpp_python_version, llama_cpp_system_info, gpu_offload_supported,
                      backend ("CPU", "Metal", "CUDA", ...)
    load_average      [1, 5, 15-minute] load when the depth's measurements ended (null if unknown)
    variant           label, e.g. "gateup.gguf+adapter.gguf"; variant_index: its position
    baseline_variant  label of the first variant (ratios are against it)
    model             path, name, size_bytes, mtime, sha256 (null with --no-hash), architecture,
                      general_name, n_weights, tensor_types ({ggml type: tensor count})
    adapter           null, or path, name, size_bytes, mtime, sha256, rank, alpha, scale
    settings          threads, n_batch, n_ubatch, gpu_layers, flash_attn, n_ctx, repeats, warmup,
                      interleaved (bool), timer ("wall_clock_llama_decode")
    depth, n_prompt, n_gen   ints (tokens)
    pp_tokens_per_s   {median, min, max, mean, samples: [...]}; tg_tokens_per_s likewise
    ratio_vs_baseline null for the first variant, else {"pp": stats, "tg": stats} of the
                      per-repeat ratios this variant / first variant (same repeat index)
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output, read_jsonl, sha256_file
from recover_lora.runtime.fingerprint import device_fingerprint, load_average
from recover_lora.runtime.llama import LlamaOptions, LoadedModel, check_files, load_llama

SCHEMA_VERSION = 1
RECORD_KIND = "bench"
DEFAULT_DEPTHS = (0, 512, 2048, 4096)
TIMER = "wall_clock_llama_decode"


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how often.

    Example:
        BenchConfig(depths=(0, 2048), n_prompt=128, n_gen=32, repeats=5, threads=4)
    """

    depths: tuple[int, ...] = DEFAULT_DEPTHS
    n_prompt: int = 128
    n_gen: int = 32
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None
    n_batch: int = 512
    n_ubatch: int = 512
    gpu_layers: int = 0
    flash_attn: bool = False
    lora_scale: float = 1.0
    hash_files: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.depths or any(d < 0 for d in self.depths):
            raise RecoverLoraError(f"--depth {list(self.depths)} must be one or more tokens counts >= 0")
        if self.n_prompt < 1 or self.n_gen < 1:
            raise RecoverLoraError(f"--n-prompt {self.n_prompt} and --n-gen {self.n_gen} must be >= 1")
        if self.repeats < 1 or self.warmup < 0:
            raise RecoverLoraError(f"--repeats {self.repeats} must be >= 1 and warm-up {self.warmup} >= 0")
        LlamaOptions(threads=self.threads, gpu_layers=self.gpu_layers, n_batch=self.n_batch, n_ubatch=self.n_ubatch)

    @property
    def n_ctx(self) -> int:
        need = max(self.depths) + max(self.n_prompt, self.n_gen)
        return -(-need // 256) * 256  # llama.cpp pads the KV cache to 256 anyway


@dataclass(frozen=True)
class Variant:
    """One thing to benchmark: a model GGUF, optionally with a LoRA adapter GGUF."""

    model: Path
    lora: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        """'gateup.gguf' or 'gateup.gguf+adapter.gguf'."""
        model, plus, lora = spec.partition("+")
        if plus and not lora:
            raise RecoverLoraError(f"variant {spec!r} ends with '+'; write MODEL.gguf+ADAPTER.gguf")
        return cls(Path(model), Path(lora) if lora else None)

    @property
    def label(self) -> str:
        return self.model.name + (f"+{self.lora.name}" if self.lora else "")


def _stats(samples: Sequence[float]) -> dict:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "mean": statistics.fmean(samples),
        "samples": list(samples),
    }


class _Timer:
    """Drives one loaded model through fill / pp / tg at a depth (llama.cpp low-level API)."""

    def __init__(self, loaded: LoadedModel, seed: int):
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.llm = loaded.llm
        self.n_vocab = self.llm.n_vocab()
        self.rng = random.Random(seed)

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(self.n_vocab) for _ in range(n)]

    def _decode(self, tokens: list[int], pos: int) -> None:
        batch, ctx = self.llm._batch, self.llm._ctx
        for start in range(0, len(tokens), self.llm.n_batch):
            chunk = tokens[start : start + self.llm.n_batch]
            batch.set_batch(chunk, n_past=pos + start, logits_all=False)
            ctx.decode(batch)

    def fill(self, depth: int) -> None:
        self.llm._ctx.kv_cache_clear()
        if depth:
            self._decode(self._tokens(depth), 0)
        self.depth = depth

    def _rewind(self) -> None:
        self.llm._ctx.kv_cache_seq_rm(0, self.depth, -1)

    def prompt_tokens_per_s(self, n_prompt: int) -> float:
        self._rewind()
        tokens = self._tokens(n_prompt)
        start = time.perf_counter()
        self._decode(tokens, self.depth)
        self._llama_cpp.llama_synchronize(self.llm.ctx)
        return n_prompt / (time.perf_counter() - start)

    def generation_tokens_per_s(self, n_gen: int) -> float:
        self._rewind()
        tokens = self._tokens(n_gen)
        start = time.perf_counter()
        for i, token in enumerate(tokens):
            self._decode([token], self.depth + i)
        self._llama_cpp.llama_synchronize(self.llm.ctx)
        return n_gen / (time.perf_counter() - start)


def _file_info(path: Path, hash_files: bool) -> dict:
    stat = path.stat()
    return {
        "path": str(path.resolve()),
        "name": path.name,
        "size_bytes": stat.st_size,
        "mtime": datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat(),
        "sha256": sha256_file(path) if hash_files else None,
    }


def _describe_variant(variant: Variant, loaded: LoadedModel, config: BenchConfig) -> tuple[dict, dict | None]:
    model = _file_info(variant.model, config.hash_files) | {
        "architecture": loaded.model.architecture,
        "general_name": loaded.model.model_name,
        "n_weights": loaded.model.n_weights,
        "tensor_types": loaded.model.count_by_type(),
    }
    adapter = None
    if loaded.adapter is not None:
        adapter = _file_info(variant.lora, config.hash_files) | {
            "rank": max(loaded.adapter.ranks),
            "alpha": loaded.adapter.alpha,
            "scale": config.lora_scale,
        }
    return model, adapter


def run_bench(
    variants: Sequence[Variant],
    config: BenchConfig = BenchConfig(),
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Measure pp and tg tokens/s of every variant at every depth; returns schema-v1 records.

    Several variants are loaded together and measured interleaved (A B, B A, ...).

    Example:
        records = run_bench([Variant(Path("w4.gguf")), Variant(Path("gateup.gguf"))], BenchConfig(depths=(0,)))
        records[1]["ratio_vs_baseline"]["tg"]["median"]  # gateup / w4 decode speed
    """
    if not variants:
        raise RecoverLoraError("give at least one model GGUF to benchmark")
    say = progress or (lambda message: None)
    options = LlamaOptions(
        n_ctx=config.n_ctx,
        threads=config.threads,
        gpu_layers=config.gpu_layers,
        n_batch=config.n_batch,
        n_ubatch=config.n_ubatch,
        lora_scale=config.lora_scale,
        flash_attn=config.flash_attn,
    )
    checked = [check_files(v.model, v.lora) for v in variants]  # every file, before any is loaded
    device = device_fingerprint()
    run_id = uuid.uuid4().hex[:12]
    loaded: list[LoadedModel] = []
    records: list[dict] = []
    try:
        for variant, checks in zip(variants, checked):
            loaded.append(load_llama(variant.model, variant.lora, options, checked=checks))
        described = [_describe_variant(v, m, config) for v, m in zip(variants, loaded)]
        timers = [_Timer(m, config.seed + i) for i, m in enumerate(loaded)]
        settings = {
            "threads": options.resolved_threads,
            "n_batch": config.n_batch,
            "n_ubatch": config.n_ubatch,
            "gpu_layers": config.gpu_layers,
            "flash_attn": config.flash_attn,
            "n_ctx": config.n_ctx,
            "repeats": config.repeats,
            "warmup": config.warmup,
            "interleaved": len(variants) > 1,
            "timer": TIMER,
        }
        for depth in config.depths:
            pp = [[] for _ in variants]
            tg = [[] for _ in variants]
            for timer, variant in zip(timers, variants):
                say(f"depth {depth}: filling the KV cache of {variant.label}")
                timer.fill(depth)
                for _ in range(config.warmup):
                    timer.prompt_tokens_per_s(config.n_prompt)
                    timer.generation_tokens_per_s(config.n_gen)
            for repeat in range(config.repeats):
                # A B, then B A: whoever runs first in a round (cold caches, a neighbour's burst)
                # is a different variant each time, so position effects cancel in the ratios.
                order = range(len(timers)) if repeat % 2 == 0 else reversed(range(len(timers)))
                for i in order:
                    pp[i].append(timers[i].prompt_tokens_per_s(config.n_prompt))
                    tg[i].append(timers[i].generation_tokens_per_s(config.n_gen))
                say(f"depth {depth}: repeat {repeat + 1}/{config.repeats}: " + ", ".join(f"tg {t[-1]:.1f}" for t in tg))
            now = datetime.now(timezone.utc).isoformat()
            load = load_average()
            for i, variant in enumerate(variants):
                model, adapter = described[i]
                ratio = None
                if i > 0:
                    ratio = {
                        "pp": _stats([a / b for a, b in zip(pp[i], pp[0])]),
                        "tg": _stats([a / b for a, b in zip(tg[i], tg[0])]),
                    }
                records.append(
                    {
                        "schema_version": SCHEMA_VERSION,
                        "kind": RECORD_KIND,
                        "run_id": run_id,
                        "timestamp": now,
                        "device": device,
                        "load_average": load,
                        "variant": variant.label,
                        "variant_index": i,
                        "baseline_variant": variants[0].label,
                        "model": model,
                        "adapter": adapter,
                        "settings": settings,
                        "depth": depth,
                        "n_prompt": config.n_prompt,
                        "n_gen": config.n_gen,
                        "pp_tokens_per_s": _stats(pp[i]),
                        "tg_tokens_per_s": _stats(tg[i]),
                        "ratio_vs_baseline": ratio,
                    }
                )
    finally:
        for model in loaded:
            model.close()
    return records


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


def default_results_path(results_dir: str | os.PathLike = "devices/results") -> Path:
    """devices/results/bench-<host>.jsonl (host name reduced to safe file-name characters)."""
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()) or "host"
    return Path(results_dir) / f"bench-{host}.jsonl"


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
    """Every valid record of a results file; a line of another schema version is an error."""
    records = []
    for _, record in read_jsonl(path):
        validate_record(record)
        records.append(record)
    return records


def format_table(records: Sequence[dict]) -> str:
    """Plain-text table: variant x depth, pp and tg median [min-max], and ratios vs the first variant."""
    header = ("variant", "depth", "pp tok/s [min-max]", "tg tok/s [min-max]", "pp ratio", "tg ratio [min-max]")
    rows = []
    for r in sorted(records, key=lambda r: (r["depth"], r["variant_index"])):
        pp, tg, ratio = r["pp_tokens_per_s"], r["tg_tokens_per_s"], r["ratio_vs_baseline"]
        rows.append(
            (
                r["variant"],
                str(r["depth"]),
                f"{pp['median']:.1f} [{pp['min']:.1f}-{pp['max']:.1f}]",
                f"{tg['median']:.2f} [{tg['min']:.2f}-{tg['max']:.2f}]",
                "-" if ratio is None else f"{ratio['pp']['median']:.3f}",
                "(baseline)" if ratio is None else f"{ratio['tg']['median']:.3f} [{ratio['tg']['min']:.3f}-{ratio['tg']['max']:.3f}]",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
