"""llama.cpp's decode attention rate on this machine: FLOPs per second over the KV cache.

With N tokens cached, one decode step of llama.cpp's CPU back end (no flash attention, its
default) does, per layer and query head, N dot products q.k over head_dim F16 elements, a softmax
over the N scores and a weighted sum of N V rows: the roofline's attention FLOPs,
4 x n_heads x head_dim x N per layer. These per-head F16 dot products run far below both the
float peak and the KV bytes' memory time: on 2 EPYC vCPUs a random-weight Qwen3-4B decoded
13.0 tok/s at depth 0 and 8.0 at depth 2048, ~48 ms of attention per token, where reading its
302 MB of KV at 34 GB/s takes ~9 ms.

The rate is in FLOPs, not cached K/V elements: with grouped-query attention every K and V row
is used by each query head of its group, so the work grows with the query heads, while the bytes
read (which the roofline's memory time counts) grow with the KV heads.

The probe exports a random-weight model (the exporter's `--random-weights`; values do not change
speed) of a bundled shape cut to a few layers, with the MLP cut to 256 wide (attention does not
depend on it, and a smaller rest of the step leaves less noise around the attention time). It
times single-token decode steps at depths 0, N/2, N, N/2, 0 (filling the cache on the way up,
dropping cached rows on the way down; each step is undone, so every step sees the same depth):
a slow drift of the machine's speed then shifts each depth's mean time alike and cancels from
the differences. Then

    rate = attention FLOPs at depth N / (seconds per token at N - seconds per token at 0).

The rate from depth N/2 checks that the extra time grows linearly with depth. llama.cpp attends
to the cache rounded up to its padding (32 or 256 cells, by version and flash attention), so
depth 0 already attends to one padded block; N is a multiple of 512, so N and N/2 fill whole
blocks and the depths differ by exactly their token counts.

The KV cache must outgrow the last-level cache, as a real model's does (Qwen3-4B: 302 MB at
2048 tokens): on the 2-vCPU EPYC (32 MB L3), Qwen3-4B attention cut to 2 layers (16 MB of KV at
2048) ran at 39 GFLOP/s, cut to 8 layers (64 MB) at 26-35 over eight runs (median 28.5), with all
36 layers at 25, and the full model's bench (13.0 tok/s at depth 0, 8.0 at 2048) implies 25.
Hence 8 layers by default (about 40 s on 2 cores, most of it exporting and filling the cache).
Within one run the step times are steady (10-90 % of steps within about 10 %); the spread is
from run to run, so the rate is good to about 15 % on such a machine.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from recover_lora.devices.matvec import DEFAULT_MATVEC_SHAPE, probe_config
from recover_lora.errors import RecoverLoraError

DEFAULT_ATTENTION_SHAPE = DEFAULT_MATVEC_SHAPE
DEFAULT_ATTENTION_LAYERS = 8  # 64 MB of Qwen3-4B KV at depth 2048: larger than the caches (see above)
DEFAULT_ATTENTION_DEPTH = 2048
ATTENTION_DEPTH_STEP = 512  # N and N/2 must be whole 256-cell blocks of llama.cpp's KV padding
# The smallest MLP width K-quants allow (one 256-weight block per row).
ATTENTION_PROBE_INTERMEDIATE = 256
_MIN_TOKENS, _MAX_TOKENS, _WARMUP_TOKENS = 8, 400, 2


@dataclass(frozen=True)
class AttentionResult:
    """Seconds per decode token at each depth (0, N/2, N; the mean of its windows' medians) and the roofline's attention cost there."""

    depths: tuple[int, ...]
    seconds_per_token: tuple[float, ...]
    attention_flops: tuple[float, ...]  # the roofline's attention FLOPs per token at each depth
    kv_bytes: tuple[float, ...]  # the roofline's KV-cache bytes per token at each depth
    tokens: int  # timed steps in the window with fewest
    load_1min: float  # the machine's load average when the timing started

    def flop_per_s_at(self, index: int = -1) -> float:
        """Attention FLOPs per second from depth 0 to depths[index]; inf if that depth was not slower."""
        extra_s = self.seconds_per_token[index] - self.seconds_per_token[0]
        return self.attention_flops[index] / extra_s if extra_s > 0 else float("inf")

    @property
    def flop_per_s(self) -> float:
        """The rate at the deepest depth: what the profile stores."""
        return self.flop_per_s_at(-1)


def attention_probe_config(shape: str, layers: int, depth: int) -> dict:
    """The probe model's Hugging Face config (`shape` cut to `layers` layers, MLP 256 wide); bad arguments are one-line errors."""
    if layers < 1:
        raise RecoverLoraError(f"--attention-layers {layers} must be >= 1")
    if depth < ATTENTION_DEPTH_STEP or depth % ATTENTION_DEPTH_STEP:
        raise RecoverLoraError(
            f"--attention-depth {depth} must be a positive multiple of {ATTENTION_DEPTH_STEP} (llama.cpp pads the attended cache "
            f"in blocks of up to 256 cells, which depth N and N/2 must fill), e.g. 2048"
        )
    return {**probe_config(shape, layers), "intermediate_size": ATTENTION_PROBE_INTERMEDIATE}


def _seconds_per_token(timer, depth: int, token: int, seconds: float) -> list[float]:
    """Wall seconds of single-token decode steps at `depth`, for about `seconds` (8 to 400 steps)."""
    steps: list[float] = []
    start = time.perf_counter()
    while len(steps) < _MAX_TOKENS + _WARMUP_TOKENS and (len(steps) < _MIN_TOKENS + _WARMUP_TOKENS or time.perf_counter() - start < seconds):
        timer.rewind(depth)  # undo the last step's token: every step sees the same depth
        steps.append(timer.decode([token]))
    return steps[_WARMUP_TOKENS:]  # the first steps after a fill re-plan the graph


def attention_rate(
    shape: str = DEFAULT_ATTENTION_SHAPE,
    layers: int = DEFAULT_ATTENTION_LAYERS,
    depth: int = DEFAULT_ATTENTION_DEPTH,
    threads: int | None = None,
    seconds: float = 2.0,
) -> AttentionResult:
    """Measure llama.cpp's decode attention rate (attention FLOPs per second) on this machine.

    Args:
        shape: bundled shape name or config.json whose attention (heads, KV heads, head_dim) the probe has.
        layers: blocks of that shape in the probe model.
        depth: the deepest KV-cache depth N timed (N/2 is timed too).
        threads: llama.cpp threads (default: all cores).
        seconds: decode time per timing window (five windows).

    Example:
        attention_rate(threads=2).flop_per_s / 1e9   # G attention FLOPs/s
    """
    from recover_lora.devices.roofline import token_cost
    from recover_lora.devices.shapes import FILE_POLICY, load_model_shape
    from recover_lora.export.quantize import export_model
    from recover_lora.runtime.llama import LlamaOptions, load_llama
    from recover_lora.runtime.timer import LlamaTimer

    if seconds <= 0:
        raise RecoverLoraError(f"attention probe time {seconds} s must be positive")
    config = attention_probe_config(shape, layers, depth)  # fails before any export
    threads = threads or os.cpu_count() or 1
    depths = (0, depth // 2, depth)
    schedule = depths + depths[-2::-1]  # 0, N/2, N, N/2, 0
    with tempfile.TemporaryDirectory(prefix="recover-lora-attention-") as work_dir:
        config_path = Path(work_dir) / "config.json"
        config_path.write_text(json.dumps(config))
        path = export_model(config_path, Path(work_dir) / "probe.gguf", "w4", threads=threads, random_weights=True).path
        probe_shape = load_model_shape(path)
        # F16 K and V, no flash attention: llama.cpp's defaults, and what `recover-lora bench` times.
        options = LlamaOptions(n_ctx=depth + 64, threads=threads, gpu_layers=0, flash_attn=False)
        loaded = load_llama(path, options=options)
        try:
            timer = LlamaTimer(loaded)
            token = timer.any_token
            load_1min = os.getloadavg()[0]
            medians: dict[int, list[float]] = {d: [] for d in depths}
            counts = []
            for d in schedule:
                timer.rewind(min(timer.depth, d))
                timer.decode([token] * (d - timer.depth))  # fill the cache up to depth d, or drop the rows past it
                steps = _seconds_per_token(timer, d, token, seconds)
                medians[d].append(statistics.median(steps))
                counts.append(len(steps))
        finally:
            loaded.close()
    seconds_per_token = tuple(statistics.fmean(medians[d]) for d in depths)
    costs = [token_cost(probe_shape, FILE_POLICY, d).attention for d in depths]
    result = AttentionResult(
        depths=depths,
        seconds_per_token=seconds_per_token,
        attention_flops=tuple(c.flops for c in costs),
        kv_bytes=tuple(c.bytes for c in costs),
        tokens=min(counts),
        load_1min=load_1min,
    )
    if result.flop_per_s == float("inf"):
        raise RecoverLoraError(
            f"attention probe: decode at depth {depth} ({seconds_per_token[-1] * 1e3:.3f} ms/token) was no slower than at depth 0 "
            f"({seconds_per_token[0] * 1e3:.3f} ms); probe a quiet machine or raise --attention-depth"
        )
    return result

