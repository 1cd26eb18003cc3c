"""Tokens/s of GGUF models (with or without a LoRA adapter) at several KV-cache depths.

Method (as llama-bench's `-d`): for each depth d, fill the KV cache with d random tokens, then
time prompt processing (pp: `n_prompt` tokens decoded as one batch at positions d..) and text
generation (tg: `n_gen` single-token decodes at positions d..), removing the timed tokens from
the cache between samples so every sample starts from the same d-token state. One warm-up
sample per model and depth is discarded. Timing (runtime/timer.py's `LlamaTimer`, the timer of
every device probe too) is wall clock around llama.cpp's decode followed by `llama_synchronize`
(so GPU back ends are timed to completion). With several variants the
samples interleave (A B, B A, A B, ...): slow drifts of a shared machine hit every variant alike,
and per-repeat ratios against the first variant are recorded.

Records follow the schema in runtime/records.py; `recover-lora bench` appends them to
`<results>/bench-<host>.jsonl`, the results folder being $RECOVER_LORA_RESULTS or devices/results/.
"""

from __future__ import annotations

import random
import statistics
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import sha256_file
from recover_lora.runtime.fingerprint import load_average
from recover_lora.runtime.llama import LlamaOptions, LoadedModel, check_files, load_llama, resolved_extra_buffer_types
from recover_lora.runtime.records import RECORD_KIND, SCHEMA_VERSION, device_fingerprint
from recover_lora.runtime.timer import TIMER, LlamaTimer

DEFAULT_DEPTHS = (0, 512, 2048, 4096)


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
    extra_buffer_types: bool | None = None  # llama.cpp's AMX / repacked weights; None: this machine's choice

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


class _DepthSampler:
    """One loaded model's pp / tg samples at a KV-cache depth, each starting from the same `depth`-token cache."""

    def __init__(self, loaded: LoadedModel, seed: int):
        self.timer = LlamaTimer(loaded)
        self.rng = random.Random(seed)
        self.n_vocab = self.timer.n_vocab
        self.depth = 0

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(self.n_vocab) for _ in range(n)]

    def fill(self, depth: int) -> None:
        self.timer.rewind(0)
        if depth:
            self.timer.decode(self._tokens(depth))
        self.depth = depth

    def prompt_tokens_per_s(self, n_prompt: int) -> float:
        self.timer.rewind(self.depth)
        return n_prompt / self.timer.decode(self._tokens(n_prompt))

    def generation_tokens_per_s(self, n_gen: int) -> float:
        self.timer.rewind(self.depth)
        return n_gen / sum(self.timer.decode_steps(self._tokens(n_gen)))


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
        extra_buffer_types=config.extra_buffer_types,
    )
    checked = [check_files(v.model, v.lora) for v in variants]  # every file, before any is loaded
    device = device_fingerprint(config.gpu_layers, resolved_extra_buffer_types(options))  # backend: what these runs use, not what the build could
    run_id = uuid.uuid4().hex[:12]
    loaded: list[LoadedModel] = []
    records: list[dict] = []
    try:
        for variant, checks in zip(variants, checked):
            loaded.append(load_llama(variant.model, variant.lora, options, checked=checks))
        described = [_describe_variant(v, m, config) for v, m in zip(variants, loaded)]
        samplers = [_DepthSampler(m, config.seed + i) for i, m in enumerate(loaded)]
        settings = {
            "threads": options.resolved_threads,
            "n_batch": config.n_batch,
            "n_ubatch": config.n_ubatch,
            "gpu_layers": config.gpu_layers,
            "flash_attn": config.flash_attn,
            "extra_buffer_types": device["extra_buffer_types"],
            "n_ctx": config.n_ctx,
            "repeats": config.repeats,
            "warmup": config.warmup,
            "interleaved": len(variants) > 1,
            "timer": TIMER,
        }
        for depth in config.depths:
            pp = [[] for _ in variants]
            tg = [[] for _ in variants]
            for sampler, variant in zip(samplers, variants):
                say(f"depth {depth}: filling the KV cache of {variant.label}")
                sampler.fill(depth)
                for _ in range(config.warmup):
                    sampler.prompt_tokens_per_s(config.n_prompt)
                    sampler.generation_tokens_per_s(config.n_gen)
            for repeat in range(config.repeats):
                # A B, then B A: whoever runs first in a round (cold caches, a neighbour's burst)
                # is a different variant each time, so position effects cancel in the ratios.
                order = range(len(samplers)) if repeat % 2 == 0 else reversed(range(len(samplers)))
                for i in order:
                    pp[i].append(samplers[i].prompt_tokens_per_s(config.n_prompt))
                    tg[i].append(samplers[i].generation_tokens_per_s(config.n_gen))
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
