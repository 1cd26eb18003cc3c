"""Load a GGUF model (and optionally a LoRA adapter GGUF) into llama-cpp-python, safely.

Every file is checked with gguf-py first (`gguf_check`), so a corrupt file or an adapter for
another model is a one-line `RecoverLoraError` instead of a llama.cpp abort. Threads default to
the CPUs this process may use; `gpu_layers` offloads layers to Metal/CUDA/Vulkan when the
installed llama.cpp was built with a GPU back end, and is refused otherwise. Whether llama.cpp's
extra CPU buffer types (AMX, weight repacking) are used is decided once per machine by a child-process
self-test (runtime/llama_selftest.py), so a native crash there is an error, not a core dump here.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

from recover_lora.errors import RecoverLoraError
from recover_lora.runtime.gguf_check import AdapterSummary, GGUFSummary, check_adapter, check_model_gguf


def default_threads() -> int:
    """CPUs available to this process (affinity-aware where the OS tells us)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def supports_gpu_offload() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


@dataclass(frozen=True)
class LlamaOptions:
    """How to run a model in llama.cpp; the defaults suit a CPU laptop.

    Example:
        LlamaOptions(n_ctx=4096, threads=4, gpu_layers=-1)  # -1: offload every layer
    """

    n_ctx: int = 2048
    threads: int | None = None  # None: every CPU this process may use
    gpu_layers: int = 0
    n_batch: int = 512
    n_ubatch: int = 512
    lora_scale: float = 1.0
    logits_all: bool = False  # every position's logits (log-likelihood evaluation)
    seed: int = 0
    flash_attn: bool = False
    kv_cache_f32: bool = False  # keys and values in F32 rather than F16 (exact comparisons with torch)
    extra_buffer_types: bool | None = None  # None: what the self-test chose for this machine

    def __post_init__(self) -> None:
        if self.n_ctx < 8:
            raise RecoverLoraError(f"context size n_ctx={self.n_ctx} is too small; use at least 8 tokens")
        if self.threads is not None and self.threads < 1:
            raise RecoverLoraError(f"--threads {self.threads} must be >= 1")
        if self.gpu_layers < -1:
            raise RecoverLoraError(f"--gpu-layers {self.gpu_layers} must be >= 0, or -1 for all layers")
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise RecoverLoraError(f"batch sizes must be >= 1 (n_batch={self.n_batch}, n_ubatch={self.n_ubatch})")

    @property
    def resolved_threads(self) -> int:
        return self.threads if self.threads is not None else default_threads()


@dataclass
class LoadedModel:
    """A llama-cpp-python `Llama` plus what we checked about its files."""

    llm: object  # llama_cpp.Llama
    model: GGUFSummary
    adapter: AdapterSummary | None
    options: LlamaOptions

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()


@contextlib.contextmanager
def model_params_override(**fields):
    """Meanwhile, `llama_cpp.Llama` builds its model parameters with these fields set (e.g. use_extra_bufts=False).

    llama-cpp-python 0.3.36's `Llama` takes no argument for `use_extra_bufts`; it starts from
    `llama_model_default_params()`, so that function answers with the fields changed for the block.
    """
    import llama_cpp.llama as high_level

    original = high_level.llama_cpp.llama_model_default_params

    def with_fields():
        params = original()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    high_level.llama_cpp.llama_model_default_params = with_fields
    try:
        yield
    finally:
        high_level.llama_cpp.llama_model_default_params = original


def resolved_extra_buffer_types(options: LlamaOptions | None = None) -> bool:
    """The options' choice, else this machine's (the self-test's, or RECOVER_LORA_EXTRA_BUFTS)."""
    if options is not None and options.extra_buffer_types is not None:
        return options.extra_buffer_types
    from recover_lora.runtime.llama_selftest import extra_buffer_types

    return extra_buffer_types()


def check_files(model_path: str | os.PathLike, lora_path: str | os.PathLike | None = None) -> tuple[GGUFSummary, AdapterSummary | None]:
    """The checks `load_llama` runs before llama.cpp opens anything."""
    model = check_model_gguf(model_path)
    adapter = check_adapter(model, lora_path) if lora_path is not None else None
    return model, adapter


def load_llama(
    model_path: str | os.PathLike,
    lora_path: str | os.PathLike | None = None,
    options: LlamaOptions | None = None,
    checked: tuple[GGUFSummary, AdapterSummary | None] | None = None,
) -> LoadedModel:
    """Load a GGUF (+ adapter GGUF) into llama.cpp after checking both files.

    Args:
        model_path: base model GGUF.
        lora_path: LoRA adapter GGUF for that base (scale from `options.lora_scale`).
        options: context size, threads, GPU layers, ...
        checked: results of `check_files` if the caller already ran them.

    Example:
        loaded = load_llama("gateup.gguf", "adapter.gguf", LlamaOptions(n_ctx=1024))
        loaded.llm.tokenize(b"Hello")
    """
    import llama_cpp

    options = options or LlamaOptions()
    model, adapter = checked if checked is not None else check_files(model_path, lora_path)
    if options.gpu_layers != 0 and not llama_cpp.llama_supports_gpu_offload():
        raise RecoverLoraError(
            f"--gpu-layers {options.gpu_layers} asks for GPU offload, but this llama-cpp-python was built for CPU only; "
            "drop --gpu-layers or reinstall llama-cpp-python with Metal/CUDA/Vulkan (see its README)"
        )
    threads = options.resolved_threads
    extra_bufts = resolved_extra_buffer_types(options)
    from gguf import GGMLQuantizationType

    f32 = int(GGMLQuantizationType.F32)
    cache = {"type_k": f32, "type_v": f32} if options.kv_cache_f32 else {}
    try:
        with model_params_override(use_extra_bufts=extra_bufts):
            llm = llama_cpp.Llama(
                model_path=str(model.path),
                lora_path=str(adapter.path) if adapter is not None else None,
                lora_scale=options.lora_scale,
                n_ctx=options.n_ctx,
                n_batch=min(options.n_batch, options.n_ctx),
                n_ubatch=min(options.n_ubatch, options.n_batch, options.n_ctx),
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=options.gpu_layers if options.gpu_layers >= 0 else 0x7FFFFFFF,
                logits_all=options.logits_all,
                seed=options.seed,
                flash_attn=options.flash_attn,
                verbose=False,
                **cache,
            )
    except (ValueError, RuntimeError, OSError) as e:
        what = f"{model.path}" + (f" with adapter {adapter.path}" if adapter else "")
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecoverLoraError(f"llama.cpp could not load {what} ({reason}); check that the files are complete and match") from None
    # llama-cpp-python frees the model in __del__, which fails noisily if it runs during
    # interpreter shutdown (after llama_cpp's module globals are gone): close it before that.
    atexit.register(_close_if_alive, weakref.ref(llm))
    return LoadedModel(llm=llm, model=model, adapter=adapter, options=options)


def _close_if_alive(ref) -> None:
    llm = ref()
    if llm is not None:
        llm.close()


def describe(loaded: LoadedModel) -> str:
    """One line for the user: file, adapter, threads, back end."""
    parts = [f"{Path(loaded.model.path).name} ({loaded.model.architecture}, {loaded.model.file_bytes / 1e6:.0f} MB)"]
    if loaded.adapter is not None:
        parts.append(f"+ {Path(loaded.adapter.path).name} (r={max(loaded.adapter.ranks)}, scale {loaded.options.lora_scale:g})")
    parts.append(f"threads {loaded.options.resolved_threads}")
    if not resolved_extra_buffer_types(loaded.options):
        parts.append("extra buffer types off")
    if loaded.options.gpu_layers:
        parts.append(f"gpu layers {loaded.options.gpu_layers}")
    return ", ".join(parts)
