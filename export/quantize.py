"""Quantize with llama.cpp's own quantizer, one ggml type per tensor, and verify the result.

`export_model` is the exporter end to end: read a source, pad widths if a K-quant needs it,
write a full-precision GGUF, run `llama_model_quantize` with one override per tensor (so no
llama.cpp heuristic picks a type), then read the output back and fail if any tensor did not
get the type the policy asked for (llama.cpp only warns when it falls back).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf

from recover_lora.errors import RecoverLoraError
from recover_lora.export.model import ModelWeights, gguf_name
from recover_lora.export.pad import K_QUANT_BLOCK, linear_row_widths, needs_padding, pad_model
from recover_lora.export.policy import Policy, is_quantizable
from recover_lora.fileio import atomic_output, check_output, native_stderr_to

PAD_MODES = ("auto", "none")
# Above this many parameters the intermediate full-precision file is F16, not F32 (disk and time).
F32_WORK_FILE_MAX_PARAMS = 2_000_000_000


@dataclass
class ExportResult:
    path: Path
    policy: str
    padded: bool
    types: dict[str, str]  # GGUF tensor name -> ggml type name, as written


def _tensor_kind(tensor_name: str) -> str:
    """'blk.3.ffn_gate.weight' -> 'ffn_gate'; 'token_embd.weight' -> 'token_embd'."""
    parts = tensor_name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def misaligned_tensors(types: dict[str, gguf.GGMLQuantizationType], weights: ModelWeights) -> list[str]:
    """Tensors whose requested type's block does not divide their row width (llama.cpp would fall back)."""
    widths = linear_row_widths(weights.config)
    bad = []
    for name, ggml_type in types.items():
        block, _ = gguf.GGML_QUANT_SIZES[ggml_type]
        width = widths[_tensor_kind(name)]
        if width % block:
            bad.append(f"{name} ({ggml_type.name} needs rows of a multiple of {block}, has {width})")
    return bad


def plan_types(weights: ModelWeights, policy: Policy, pad: str) -> tuple[ModelWeights, dict[str, gguf.GGMLQuantizationType]]:
    """Apply padding if needed and resolve the type of every quantizable tensor (before any heavy work)."""
    if pad not in PAD_MODES:
        raise RecoverLoraError(f"--pad {pad!r} is not valid; use one of: {', '.join(PAD_MODES)}")
    names = [gguf_name(n) for n in weights.tensors if n != "rope_freqs.weight"]
    if weights.config.tie_word_embeddings:
        names = [n for n in names if n != "output.weight"]
    types = policy.resolve([n for n in names if is_quantizable(n)])
    bad = misaligned_tensors(types, weights)
    if bad and pad == "auto" and needs_padding(weights.config):
        weights = pad_model(weights, K_QUANT_BLOCK)
        bad = misaligned_tensors(types, weights)
    if bad:
        hint = "use --pad auto" if pad == "none" else "choose a type with a smaller block (e.g. Q4_0, Q8_0) for it"
        raise RecoverLoraError(f"llama.cpp would silently fall back for {bad[0]} ({len(bad)} tensors in all); {hint}")
    return weights, types


def llama_cpp_quantize(
    src: Path, dst: Path, types: dict[str, gguf.GGMLQuantizationType], threads: int | None = None, log_path: Path | None = None
) -> None:
    """Run llama.cpp's quantizer with one anchored override per tensor.

    Its log (a line per tensor) goes to `log_path` (default: beside `dst`), which is kept only if it fails.
    """
    import llama_cpp

    overrides = (llama_cpp.llama_model_tensor_override * (len(types) + 1))()
    patterns = [f"^{re.escape(name)}$".encode() for name in types]  # kept alive for the C call
    for i, (pattern, ggml_type) in enumerate(zip(patterns, types.values())):
        overrides[i].pattern = pattern
        overrides[i].type = int(ggml_type)
    overrides[len(types)].pattern = None  # NULL-pattern terminated
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or os.cpu_count() or 1
    # The base ftype only names the file; every tensor's type comes from the overrides.
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.allow_requantize = True
    params.pure = False  # overrides are ignored in pure mode
    params.tt_overrides = overrides
    # llama.cpp logs every tensor it converts; that goes to a log file, kept only if quantizing fails
    # (the type check after this call is what proves the result).
    log_path = log_path or dst.with_name(dst.name + ".quantize.log")
    # llama-cpp-python's callback drops lines below its logger's level (ERROR once any Llama(verbose=False)
    # was made); the log should be whole.
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with native_stderr_to(log_path):
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        logger.setLevel(level)
    if status != 0 or not dst.is_file():
        raise RecoverLoraError(f"llama.cpp failed to quantize {src} (status {status}); its log is {log_path}")
    log_path.unlink()


def check_types(path: Path, expected: dict[str, gguf.GGMLQuantizationType]) -> dict[str, str]:
    """Every tensor must hold the type asked for; returns name -> type name of the whole file."""
    reader = gguf.GGUFReader(path)
    written = {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in reader.tensors}
    wrong = [f"{n}: asked {t.name}, got {written[n].name}" for n, t in expected.items() if written.get(n) != t]
    missing = [n for n in expected if n not in written]
    if missing:
        raise RecoverLoraError(f"llama.cpp's output lacks tensor {missing[0]}")
    if wrong:
        raise RecoverLoraError(f"llama.cpp fell back for {len(wrong)} tensor(s): {'; '.join(wrong[:8])}")
    return {n: t.name for n, t in written.items()}


def export_model(
    source: str | Path | None,
    out_path: str | Path,
    policy: Policy | str = "gateup",
    pad: str = "auto",
    force: bool = False,
    threads: int | None = None,
    random_weights: bool = False,
) -> ExportResult:
    """Export a model to a mixed-precision GGUF quantized by llama.cpp.

    Args:
        source: Hugging Face folder, .gguf file, or None for the default model.
        out_path: the GGUF to write (temporary file + rename).
        policy: a Policy or a policy name ("w4", "gateup", ...).
        pad: "auto" pads widths exactly when a K-quant needs it; "none" refuses instead.
        force: overwrite an existing output.
        threads: quantizer threads (default: all cores).
        random_weights: `source` is a config.json; export random weights of its shape (speed tests).

    Example:
        export_model(None, "smollm2.gateup.gguf", "gateup")
    """
    from recover_lora.export.gguf_io import write_gguf
    from recover_lora.export.sources import load_model, random_model

    out_path = check_output(out_path, force)
    policy = Policy.named(policy) if isinstance(policy, str) else policy
    weights = random_model(source) if random_weights else load_model(source)
    padded_weights, types = plan_types(weights, policy, pad)
    work_dtype = "f32" if padded_weights.config.num_linear_parameters() <= F32_WORK_FILE_MAX_PARAMS else "f16"
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".recover-lora-") as work_dir:
        full_precision = Path(work_dir) / "full-precision.gguf"
        write_gguf(padded_weights, full_precision, dtype=work_dtype)
        with atomic_output(out_path, force=force) as tmp:
            llama_cpp_quantize(full_precision, tmp, types, threads, log_path=out_path.with_name(out_path.name + ".quantize.log"))
            written = check_types(tmp, types)
    return ExportResult(path=out_path, policy=policy.name, padded=padded_weights is not weights, types=written)
