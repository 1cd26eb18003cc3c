"""Quantize with llama.cpp's own quantizer, one ggml type per tensor, and verify the result.

`export_model` is the exporter end to end: read a source, pad widths if a K-quant needs it,
write a full-precision GGUF, run `llama_model_quantize` with one override per tensor (so no
llama.cpp heuristic picks a type), then read the output back and fail if any tensor did not
get the type the policy asked for (llama.cpp only warns when it falls back), and load it in
llama.cpp once (its shape checks run only at load) before it is renamed into place.

Interrupted (SIGTERM, Ctrl-C), an export removes its temporary output, work folder and quantizer
log. A signal that arrives inside llama.cpp's quantizer (one C call) takes effect when that call
returns — seconds for the default model, longer for multi-GB ones; a second SIGTERM kills at once.
"""

from __future__ import annotations

import ctypes
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from recover_lora.errors import RecoverLoraError
from recover_lora.export.archs.base import ROPE_FREQS
from recover_lora.export.gguf_header import read_gguf_header
from recover_lora.export.imatrix_file import ImportanceMatrix, imatrix_for_quantizer, read_imatrix
from recover_lora.export.llama_load import llama_cpp_load_check, llama_cpp_log_to
from recover_lora.export.model import LazyTensors, ModelConfig, ModelWeights, gguf_name
from recover_lora.export.pad import K_QUANT_BLOCK, misaligned_tensors, needs_padding, pad_imatrix, pad_model
from recover_lora.export.policy import Policy, is_quantizable
from recover_lora.fileio import atomic_output, check_output

PAD_MODES = ("auto", "none")
# Above this many parameters the intermediate full-precision file is F16, not F32 (disk and time).
F32_WORK_FILE_MAX_PARAMS = 2_000_000_000


@dataclass
class ExportResult:
    path: Path
    policy: str
    padded: bool
    types: dict[str, str]  # GGUF tensor name -> ggml type name, as written


def plan_types(weights: ModelWeights, policy: Policy, pad: str) -> tuple[ModelWeights, dict[str, gguf.GGMLQuantizationType]]:
    """Apply padding if needed and resolve the type of every quantizable tensor (before any heavy work)."""
    if pad not in PAD_MODES:
        raise RecoverLoraError(f"--pad {pad!r} is not valid; use one of: {', '.join(PAD_MODES)}")
    names = [gguf_name(n, weights.config) for n in weights.tensors if n != ROPE_FREQS]
    if weights.config.tie_word_embeddings:
        names = [n for n in names if n != "output.weight"]
    types = policy.resolve([n for n in names if is_quantizable(n)])
    bad = misaligned_tensors(types, weights.config)
    if bad and pad == "auto" and needs_padding(weights.config):
        weights = pad_model(weights, K_QUANT_BLOCK)
        bad = misaligned_tensors(types, weights.config)
    if bad:
        hint = "use --pad auto" if pad == "none" else "choose a type with a smaller block (e.g. Q4_0, Q8_0) for it"
        raise RecoverLoraError(f"llama.cpp would silently fall back for {bad[0]} ({len(bad)} tensors in all); {hint}")
    return weights, types


def imatrix_for_padding(matrix: ImportanceMatrix, unpadded: ModelConfig, padded: ModelConfig) -> ImportanceMatrix:
    """A matrix of the model's own widths is padded to the export's (one matrix serves padded and unpadded
    files); one already of the padded widths is kept. Anything else is refused later, by name."""
    own_widths = {name: shape[-1] for name, shape in unpadded.arch.gguf_tensor_shapes(unpadded).items()}
    if all(own_widths.get(name) == width for name, width in matrix.widths().items()):
        return pad_imatrix(matrix, unpadded, padded)
    return matrix


def llama_cpp_quantize(
    src: Path, dst: Path, types: dict[str, gguf.GGMLQuantizationType], threads: int | None = None, log_path: Path | None = None,
    imatrix: dict[str, "np.ndarray"] | None = None, file_type: gguf.LlamaFileType = gguf.LlamaFileType.MOSTLY_Q4_K_M,
) -> None:
    """Run llama.cpp's quantizer with one anchored override per tensor.

    With overrides, `file_type` only names the file; with `types` empty, it is llama.cpp's own preset
    (llama-quantize's ftype: its per-tensor mix and fallbacks, `export.llama_presets`).
    Its log (a line per tensor) goes to `log_path` (default: beside `dst`), which is kept only if it fails.
    `imatrix`: tensor name -> mean squared input per column (`export.imatrix_file.quantizer_weights`).
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or os.cpu_count() or 1
    params.ftype = int(file_type)
    params.allow_requantize = True
    params.pure = False  # overrides are ignored in pure mode
    if types:
        overrides = (llama_cpp.llama_model_tensor_override * (len(types) + 1))()
        patterns = [f"^{re.escape(name)}$".encode() for name in types]  # kept alive for the C call
        for i, (pattern, ggml_type) in enumerate(zip(patterns, types.values())):
            overrides[i].pattern = pattern
            overrides[i].type = int(ggml_type)
        overrides[len(types)].pattern = None  # NULL-pattern terminated
        params.tt_overrides = overrides
    if imatrix:  # NULL-name terminated array of llama_model_imatrix_data{name, data, size} (llama.h)
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        names = [name.encode() for name in imatrix]  # kept alive for the C call, like the arrays
        for i, (name, values) in enumerate(zip(names, imatrix.values())):
            entries[i].name = name
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        entries[len(imatrix)].name = None
        params.imatrix = entries
    # llama.cpp logs every tensor it converts; that goes to a log file, kept only if quantizing fails
    # (the type check after this call is what proves the result).
    log_path = log_path or dst.with_name(dst.name + ".quantize.log")
    try:
        # llama.cpp writes the whole log itself (no Python callback, so a signal waits for the C call).
        with llama_cpp_log_to(log_path):
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    except BaseException:  # interrupted (SIGTERM / Ctrl-C, raised once the C call returns): keep nothing
        log_path.unlink(missing_ok=True)
        raise
    if status != 0 or not dst.is_file():
        raise RecoverLoraError(f"llama.cpp failed to quantize {src} (status {status}); its log is {log_path}")
    log_path.unlink()


def check_types(path: Path, expected: dict[str, gguf.GGMLQuantizationType]) -> dict[str, str]:
    """Every tensor must hold the type asked for; returns name -> type name of the whole file."""
    reader = read_gguf_header(path)
    written = {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in reader.tensors}
    wrong = [f"{n}: asked {t.name}, got {written[n].name}" for n, t in expected.items() if written.get(n) != t]
    missing = [n for n in expected if n not in written]
    if missing:
        raise RecoverLoraError(f"llama.cpp's output lacks tensor {missing[0]}")
    if wrong:
        raise RecoverLoraError(f"llama.cpp fell back for {len(wrong)} tensor(s): {'; '.join(wrong[:8])}")
    return {n: t.name for n, t in written.items()}


def with_deltas(weights: ModelWeights, deltas: Mapping[str, np.ndarray]) -> ModelWeights:
    """The weights with each delta added to its tensor (lazily: one tensor at a time, as everything else)."""
    unknown = [n for n in deltas if n not in weights.tensors]
    if unknown:
        raise RecoverLoraError(f"cannot merge into {unknown[0]}: the model has no such tensor")

    def add(name: str, array: np.ndarray) -> np.ndarray:
        if name not in deltas:
            return array
        delta = deltas[name]
        if delta.shape != array.shape:
            raise RecoverLoraError(f"cannot merge a {tuple(delta.shape)} change into {name} of shape {tuple(array.shape)}")
        return (np.asarray(array, dtype=np.float32) + delta).astype(np.float32)

    source = weights.tensors
    return weights.replace(tensors=LazyTensors({n: (lambda n=n: source[n]) for n in source}).map(add))


def export_model(
    source: str | Path | None,
    out_path: str | Path,
    policy: Policy | str = "gateup",
    pad: str = "auto",
    force: bool = False,
    threads: int | None = None,
    random_weights: bool = False,
    imatrix: "str | Path | ImportanceMatrix | None" = None,
    deltas: Mapping[str, np.ndarray] | None = None,
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
        imatrix: an importance matrix (file or `ImportanceMatrix`) for llama.cpp's quantizer; needed
            by IQ2_XXS/IQ2_XS/IQ2_S/IQ3_XXS/IQ1_* (random weights get uniform weights instead).
        deltas: Hugging Face tensor name -> array added to that tensor after padding, before
            quantizing (a merged LoRA: `recovery.merge`); shapes are the padded ones.

    Example:
        export_model(None, "smollm2.gateup.gguf", "gateup")
    """
    from recover_lora.export.gguf_io import write_gguf
    from recover_lora.export.sources import load_model, random_model

    out_path = check_output(out_path, force)
    policy = Policy.named(policy) if isinstance(policy, str) else policy
    matrix = read_imatrix(imatrix) if isinstance(imatrix, (str, Path)) else imatrix  # a bad file fails before any work
    weights = random_model(source) if random_weights else load_model(source)
    padded_weights, types = plan_types(weights, policy, pad)
    if matrix is not None and padded_weights is not weights:
        matrix = imatrix_for_padding(matrix, weights.config, padded_weights.config)
    if deltas:
        padded_weights = with_deltas(padded_weights, deltas)
    shapes = padded_weights.config.arch.gguf_tensor_shapes(padded_weights.config)
    imatrix_data = imatrix_for_quantizer(matrix, types, {n: s[-1] for n, s in shapes.items()}, random_weights,
                                         source=str(imatrix) if isinstance(imatrix, (str, Path)) else "the importance matrix")
    work_dtype = "f32" if padded_weights.config.num_linear_parameters() <= F32_WORK_FILE_MAX_PARAMS else "f16"
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".recover-lora-") as work_dir:
        full_precision = Path(work_dir) / "full-precision.gguf"
        write_gguf(padded_weights, full_precision, dtype=work_dtype)
        with atomic_output(out_path, force=force) as tmp:
            llama_cpp_quantize(full_precision, tmp, types, threads, log_path=out_path.with_name(out_path.name + ".quantize.log"),
                               imatrix=imatrix_data)
            written = check_types(tmp, types)
            llama_cpp_load_check(tmp, name=str(out_path))  # refused files never reach out_path
    return ExportResult(path=out_path, policy=policy.name, padded=padded_weights is not weights, types=written)
