"""llama.cpp's stock quantization presets (`llama-quantize MODEL OUT Q3_K_M`): the file a user makes without us.

Every table we publish holds these as baselines, so they are made exactly as a user would: the model's own
widths (no padding: llama.cpp itself falls back per tensor to a block-32 type where a row is not a
multiple of 256), the preset's file type, no per-tensor overrides, and the same importance matrix our
files get. The quantizer is llama.cpp's (`llama_model_quantize`), its log kept only on failure.

Example:
    export_llama_preset(None, "smollm2.Q3_K_M.gguf", "Q3_K_M", imatrix="imatrix.gguf")
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gguf

from recover_lora.errors import RecoverLoraError
from recover_lora.export.gguf_header import read_gguf_header
from recover_lora.export.gguf_io import field_value
from recover_lora.export.imatrix_file import ImportanceMatrix, check_imatrix, quantizer_weights, read_imatrix
from recover_lora.export.llama_load import llama_cpp_load_check
from recover_lora.export.policy import is_block_linear
from recover_lora.export.quantize import F32_WORK_FILE_MAX_PARAMS, ExportResult, llama_cpp_quantize
from recover_lora.fileio import atomic_output, check_output

# The presets the baselines compare against (issue 26), smallest accuracy loss first. Any other
# llama.cpp file type (gguf.LlamaFileType) is accepted too.
BASELINE_PRESETS = ("Q4_K_M", "Q3_K_M", "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_XXS", "Q2_K")
# Presets llama.cpp refuses to make without an importance matrix (their main type needs one).
PRESETS_NEEDING_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS")


def parse_llama_preset(name: str) -> gguf.LlamaFileType:
    """'Q3_K_M' / 'q3_k_m' -> LlamaFileType.MOSTLY_Q3_K_M, with the valid names in the error."""
    key = name.strip().upper()
    try:
        return gguf.LlamaFileType[key if key in ("ALL_F32",) else f"MOSTLY_{key}"]
    except KeyError:
        valid = ", ".join(t.name.removeprefix("MOSTLY_") for t in gguf.LlamaFileType if t.name.startswith("MOSTLY_"))
        raise RecoverLoraError(f"unknown llama.cpp preset {name!r}; use one of: {valid}") from None


def preset_name(file_type: gguf.LlamaFileType) -> str:
    return file_type.name.removeprefix("MOSTLY_")


def export_llama_preset(
    source: str | Path | None,
    out_path: str | Path,
    preset: str,
    imatrix: "str | Path | ImportanceMatrix | None" = None,
    threads: int | None = None,
    force: bool = False,
) -> ExportResult:
    """Quantize the model's own (unpadded) weights with llama.cpp's preset `preset`, as llama-quantize does.

    Args:
        source: Hugging Face folder, .gguf file, or None for the default model.
        out_path: the GGUF to write (temporary file + rename).
        preset: a llama-quantize preset name: Q4_K_M, Q3_K_M, IQ4_XS, ...
        imatrix: an importance matrix of the model's own widths (`recover-lora imatrix --pad none`);
            required by the IQ1/IQ2/IQ3_XXS presets.
    """
    from recover_lora.export.gguf_io import write_gguf
    from recover_lora.export.sources import load_model

    file_type = parse_llama_preset(preset)
    out_path = check_output(out_path, force)
    matrix = read_imatrix(imatrix) if isinstance(imatrix, (str, Path)) else imatrix
    if matrix is None and preset_name(file_type) in PRESETS_NEEDING_IMATRIX:
        raise RecoverLoraError(f"llama.cpp makes {preset_name(file_type)} only with an importance matrix; pass --imatrix FILE "
                               "(make one with `recover-lora imatrix --pad none`)")
    weights = load_model(source)
    shapes = weights.config.arch.gguf_tensor_shapes(weights.config)
    quantizer = None
    if matrix is not None:
        widths = {name: shape[-1] for name, shape in shapes.items()}
        check_imatrix(matrix, widths, [n for n in shapes if is_block_linear(n)],
                      source=str(imatrix) if isinstance(imatrix, (str, Path)) else "the importance matrix")
        quantizer = quantizer_weights(matrix, list(matrix.sums))
    work_dtype = "f32" if weights.config.num_linear_parameters() <= F32_WORK_FILE_MAX_PARAMS else "f16"
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".recover-lora-") as work_dir:
        full_precision = Path(work_dir) / "full-precision.gguf"
        write_gguf(weights, full_precision, dtype=work_dtype)
        with atomic_output(out_path, force=force) as tmp:
            llama_cpp_quantize(full_precision, tmp, {}, threads, log_path=out_path.with_name(out_path.name + ".quantize.log"),
                               imatrix=quantizer, file_type=file_type)
            header = read_gguf_header(tmp)
            written_type = field_value(header, gguf.Keys.General.FILE_TYPE)
            if written_type != int(file_type):
                raise RecoverLoraError(f"llama.cpp wrote file type {written_type}, not {preset_name(file_type)} ({int(file_type)})")
            written = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in header.tensors}
            llama_cpp_load_check(tmp, name=str(out_path))
    return ExportResult(path=out_path, policy=f"llama.cpp {preset_name(file_type)}", padded=False, types=written)
