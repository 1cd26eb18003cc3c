"""Prove that llama.cpp loads a GGUF (and a LoRA adapter on it): a real load, llama.cpp's reason if not.

llama.cpp checks each tensor's shape against its loader for the architecture only when it loads a
model (`check_tensor_dims`), never when it quantizes: a file can quantize with the right types and
still be refused by every `run`, `eval` and `bench` (a padded qwen2 did exactly that). So `export`
loads its output once, with the smallest context, before renaming it into place, and
`check-adapter` loads base + adapter. llama.cpp's log goes to a temporary file; the line that says
why it refused becomes the one-line error.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import native_stderr_to

# The smallest context worth creating (llama.cpp may round it up); the point is the load, not a run.
LOAD_CHECK_N_CTX = 16
# llama.cpp's own words for why it refused (src/llama.cpp llama_model_load, src/llama-adapter.cpp).
_REASON_PATTERNS = (
    re.compile(r"error loading model: (?P<reason>.+)"),
    re.compile(r"failed to apply lora adapter: (?P<reason>.+)"),
    re.compile(r"failed to initialize the context: (?P<reason>.+)"),
)


def refusal_reason(log_text: str) -> str | None:
    """The line of a llama.cpp log that says why it refused a file, or None.

    Example:
        refusal_reason("llama_model_load: error loading model: check_tensor_dims: tensor 'x' has wrong shape; ...")
        # "check_tensor_dims: tensor 'x' has wrong shape; ..."
    """
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for pattern in _REASON_PATTERNS:
        for line in lines:
            match = pattern.search(line)
            if match:
                return match["reason"].strip()
    errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    return errors[0] if errors else None


@contextlib.contextmanager
def llama_cpp_log_to(log_path: str | os.PathLike) -> Iterator[Path]:
    """Meanwhile, llama.cpp writes its whole log into `log_path` itself, with no Python log callback.

    Why not llama-cpp-python's callback: it runs Python code inside llama.cpp's C calls, so a SIGTERM or
    Ctrl-C handler runs there too, and the exception it raises is printed and dropped by ctypes — the
    signal is lost and the command carries on. Without the callback the signal waits until the C call
    returns and then unwinds normally (cleaning up). llama-cpp-python's callback is put back after.

    Example:
        with llama_cpp_log_to("quantize.log"):
            llama_cpp.llama_model_quantize(...)
    """
    import llama_cpp
    from llama_cpp import _logger

    with native_stderr_to(log_path) as path:
        # A NULL callback: llama.cpp's and ggml's default logger, every line to stderr (fd 2).
        llama_cpp.llama_log_set(llama_cpp.llama_log_callback(0), ctypes.c_void_p(0))
        try:
            yield path
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def llama_cpp_load_check(
    model_path: str | os.PathLike, lora_path: str | os.PathLike | None = None, name: str | None = None
) -> None:
    """Load a model (and adapter) in llama.cpp on the CPU with a tiny context, then free it all.

    Raises RecoverLoraError with llama.cpp's reason if it refuses. Run our own cheap checks first:
    llama-cpp-python 0.3.36 crashes (rather than refuses) on an adapter whose shapes do not fit.

    Args:
        model_path: the model GGUF.
        lora_path: a LoRA adapter GGUF to apply to it.
        name: how to call the model in the error (e.g. the final output path while a temporary
            file is checked).

    Example:
        llama_cpp_load_check("gateup.gguf", "adapter.gguf")
    """
    import llama_cpp

    fd, log_name = tempfile.mkstemp(prefix="recover-lora-load-", suffix=".log")
    os.close(fd)
    log_path = Path(log_name)
    try:
        with llama_cpp_log_to(log_path):
            failed = _load_and_free(llama_cpp, model_path, lora_path)
        log_text = log_path.read_text(encoding="utf-8", errors="replace") if failed else ""
    finally:
        log_path.unlink(missing_ok=True)
    if failed is None:
        return
    reason = refusal_reason(log_text) or "no reason in its log"
    what = name or str(model_path)
    if failed == "adapter":
        raise RecoverLoraError(f"llama.cpp refuses adapter {lora_path} on {what}: {reason}")
    raise RecoverLoraError(f"llama.cpp cannot load {what}: {reason}")


def _load_and_free(llama_cpp, model_path, lora_path) -> str | None:
    """None if model (+ adapter) and a context load; else what failed: 'model', 'adapter' or 'context'."""
    from recover_lora.runtime.llama import resolved_extra_buffer_types

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0  # the shape checks do not depend on the device; leave GPU memory alone
    params.use_extra_bufts = resolved_extra_buffer_types()  # load as every run here will
    params.vocab_only = False
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
    if not model:
        return "model"
    adapter = ctx = None
    try:
        if lora_path is not None:
            adapter = llama_cpp.llama_adapter_lora_init(model, str(lora_path).encode())
            if not adapter:
                return "adapter"
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = LOAD_CHECK_N_CTX
        ctx_params.n_threads = ctx_params.n_threads_batch = 1
        ctx = llama_cpp.llama_init_from_model(model, ctx_params)
        if not ctx:
            return "context"
        if adapter:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(1.0)
            if llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales) != 0:
                return "adapter"
        return None
    finally:
        if ctx:
            llama_cpp.llama_free(ctx)
        if adapter:
            llama_cpp.llama_adapter_lora_free(adapter)
        llama_cpp.llama_model_free(model)
