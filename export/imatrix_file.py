"""llama.cpp's importance-matrix GGUF: read and write it, check it against a model, hand it to the quantizer.

The file is exactly what `llama-imatrix` writes and `llama-quantize --imatrix` reads (llama.cpp
tools/imatrix/imatrix.cpp `save_imatrix`, common/imatrix-loader.cpp `common_imatrix_load`):
- key/values: general.type = "imatrix", imatrix.datasets (string array), imatrix.chunk_count (u32),
  imatrix.chunk_size (u32); llama-quantize refuses a file without the three imatrix.* keys;
- per weight tensor NAME (the GGUF tensor it weighs, e.g. blk.0.ffn_gate.weight), in name order:
  NAME.in_sum2, F32 [width]: the sum over every token of x² per input column, and NAME.counts,
  F32 [1]: the number of tokens summed. (Mixture-of-experts files hold one row per expert; the
  models here are dense.)
llama-quantize divides sums by counts and gives those mean squares to the quantizer
(quantize.cpp `load_imatrix`); `quantizer_weights` does the same for `llama_model_quantize_params.imatrix`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output

# Tensor name suffixes, as imatrix.cpp formats them ("%s.in_sum2", "%s.counts").
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
# Types llama.cpp will not quantize without an importance matrix (llama-quant.cpp
# `tensor_requires_imatrix`; the token embedding and the output tensor are exempt).
TYPES_NEEDING_IMATRIX = frozenset(
    {
        gguf.GGMLQuantizationType.IQ1_S,
        gguf.GGMLQuantizationType.IQ1_M,
        gguf.GGMLQuantizationType.IQ2_XXS,
        gguf.GGMLQuantizationType.IQ2_XS,
        gguf.GGMLQuantizationType.IQ2_S,
        gguf.GGMLQuantizationType.IQ3_XXS,
    }
)
_EXEMPT_TENSORS = ("token_embd.weight", "output.weight")
# A column that saw no activation at all (width padding) gets this fraction of the tensor's largest
# mean square: llama.cpp's quantizers divide by sums of these weights over a block.
ZERO_COLUMN_RELATIVE_WEIGHT = 1e-6


@dataclass
class ImportanceMatrix:
    """Per weight tensor: Σ x² per input column and the number of tokens summed.

    Example:
        matrix = ImportanceMatrix({"blk.0.ffn_gate.weight": np.ones(768, np.float32)}, {"blk.0.ffn_gate.weight": 1})
        write_imatrix(matrix, "imatrix.gguf")
    """

    sums: dict[str, np.ndarray]  # GGUF tensor name -> float32 [width]
    counts: dict[str, int]  # GGUF tensor name -> tokens
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def __post_init__(self) -> None:
        if set(self.sums) != set(self.counts):
            odd = sorted(set(self.sums) ^ set(self.counts))[0]
            raise RecoverLoraError(f"importance matrix entry {odd} needs both its sums and its count")
        for name, values in self.sums.items():
            values = np.asarray(values, dtype=np.float32)
            if values.ndim != 1 or not np.all(np.isfinite(values)) or np.any(values < 0):
                raise RecoverLoraError(f"importance matrix entry {name} must be finite, non-negative sums of one row")
            self.sums[name] = values
            if int(self.counts[name]) < 0:
                raise RecoverLoraError(f"importance matrix entry {name} has a negative token count {self.counts[name]}")
            self.counts[name] = int(self.counts[name])

    def widths(self) -> dict[str, int]:
        return {name: int(values.shape[0]) for name, values in self.sums.items()}

    def mean_squares(self, name: str) -> np.ndarray:
        """E[x²] per column, as llama-quantize computes it (a count of 0 means no data: ones)."""
        count = self.counts[name]
        return self.sums[name] / np.float32(count) if count > 0 else np.ones_like(self.sums[name])


def write_imatrix(matrix: ImportanceMatrix, path: str | Path, force: bool = False) -> Path:
    """Write `matrix` as llama-imatrix does (temporary file, then rename)."""
    with atomic_output(path, force=force) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="")  # an empty string is not written: no general.architecture, as llama-imatrix
        writer.add_type(gguf.GGUFType.IMATRIX)
        # llama-quantize refuses a file without this key, and gguf-py cannot write an empty array.
        writer.add_array(gguf.Keys.IMatrix.DATASETS, list(matrix.datasets) or ["unknown"])
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, matrix.chunk_count)
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, matrix.chunk_size)
        for name in sorted(matrix.sums):
            writer.add_tensor(name + SUMS_SUFFIX, matrix.sums[name])
            writer.add_tensor(name + COUNTS_SUFFIX, np.array([matrix.counts[name]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


def _field(reader: gguf.GGUFReader, key: str):
    found = reader.get_field(key)
    return None if found is None else found.contents()


def read_imatrix(path: str | Path) -> ImportanceMatrix:
    """Read an importance-matrix GGUF (ours or llama-imatrix's); anything else is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise RecoverLoraError(f"importance matrix {path} does not exist; make one with `recover-lora imatrix`")
    try:
        reader = gguf.GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        kind = _field(reader, gguf.Keys.General.TYPE)
        datasets = _field(reader, gguf.Keys.IMatrix.DATASETS) or []
        chunk_count = _field(reader, gguf.Keys.IMatrix.CHUNK_COUNT) or 0
        chunk_size = _field(reader, gguf.Keys.IMatrix.CHUNK_SIZE) or 0
        arrays = {name: np.array(t.data, dtype=np.float32).reshape(-1) for name, t in tensors.items()}
    except Exception as e:  # gguf-py raises many kinds on a file that is not a whole GGUF
        raise RecoverLoraError(
            f"{path} is not a readable GGUF importance matrix ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'truncated?'}); "
            "a legacy .dat matrix converts with `llama-imatrix --in-file X.dat -o X.gguf`"
        ) from None
    entries = sorted({n[: -len(SUMS_SUFFIX)] for n in tensors if n.endswith(SUMS_SUFFIX)}
                     | {n[: -len(COUNTS_SUFFIX)] for n in tensors if n.endswith(COUNTS_SUFFIX)})
    if not entries:
        raise RecoverLoraError(
            f"{path} holds no importance-matrix entries (general.type={kind!r}, {len(tensors)} tensors); "
            "give the file written by `recover-lora imatrix` or `llama-imatrix`, not a model"
        )
    sums, counts = {}, {}
    for name in entries:
        sum_tensor, count_tensor = tensors.get(name + SUMS_SUFFIX), tensors.get(name + COUNTS_SUFFIX)
        if sum_tensor is None or count_tensor is None:
            raise RecoverLoraError(f"{path}: entry {name} lacks its {'sums' if sum_tensor is None else 'counts'} tensor; the file is damaged")
        for t in (sum_tensor, count_tensor):
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise RecoverLoraError(f"{path}: tensor {t.name} is {t.tensor_type.name}; llama.cpp reads only F32 importance matrices")
        values, count = arrays[name + SUMS_SUFFIX], arrays[name + COUNTS_SUFFIX]
        if count.size != 1:
            raise RecoverLoraError(f"{path}: entry {name} has {count.size} expert rows; per-expert (MoE) matrices are not supported")
        sums[name], counts[name] = values, int(round(float(count[0])))
    return ImportanceMatrix(sums, counts, datasets=[str(d) for d in datasets], chunk_count=int(chunk_count), chunk_size=int(chunk_size))


def requires_imatrix(tensor_name: str, ggml_type: gguf.GGMLQuantizationType) -> bool:
    return ggml_type in TYPES_NEEDING_IMATRIX and tensor_name not in _EXEMPT_TENSORS


def check_imatrix(matrix: ImportanceMatrix, row_widths: Mapping[str, int], required: list[str], source: str = "the importance matrix") -> None:
    """Refuse a matrix made for another model, naming the first tensor that does not match.

    row_widths: every weight tensor of the model being quantized -> its input width (padding included).
    required: the tensors that must have an entry (the block linears being quantized).
    """
    for name in required:
        if name not in matrix.sums:
            raise RecoverLoraError(
                f"{source} has no entry for {name} ({len(matrix.sums)} entries, e.g. {sorted(matrix.sums)[0]}): "
                "it was made for another model; make it with `recover-lora imatrix` from the model you export"
            )
    for name, width in matrix.widths().items():
        if name not in row_widths:
            raise RecoverLoraError(f"{source} has an entry for {name}, which this model does not have: it was made for another model")
        if width != row_widths[name]:
            raise RecoverLoraError(
                f"{source} gives {name} {width} columns but the tensor has {row_widths[name]}: it was made for another model "
                "or without the same width padding (make it with the same --pad as the export)"
            )


def quantizer_weights(matrix: ImportanceMatrix, names: list[str]) -> dict[str, np.ndarray]:
    """What `llama_model_quantize_params.imatrix` takes: per tensor, the mean square per column.

    Columns that never saw activation (width padding) get a tiny positive weight instead of 0.
    """
    weights = {}
    for name in names:
        means = matrix.mean_squares(name).astype(np.float32)
        top = float(means.max()) if means.size else 0.0
        if top <= 0.0:
            means = np.ones_like(means)  # a tensor with no activation at all: plain (unweighted) error
        else:
            means = np.where(means > 0, means, np.float32(top * ZERO_COLUMN_RELATIVE_WEIGHT))
        weights[name] = np.ascontiguousarray(means, dtype=np.float32)
    return weights


def imatrix_for_quantizer(
    matrix: ImportanceMatrix | None,
    types: Mapping[str, gguf.GGMLQuantizationType],
    row_widths: Mapping[str, int],
    random_weights: bool = False,
    source: str = "the importance matrix",
) -> dict[str, np.ndarray] | None:
    """Check a matrix against the planned types and widths and turn it into quantizer weights.

    Without a matrix, a block linear of a type that needs one (IQ2_XS, ...) is a one-line error,
    except for random weights (speed tests). Tensors of such a type left without weights (random
    weights, the token embedding, an untied output) get uniform ones, i.e. the plain squared error:
    ggml's IQ quantizers abort the process on a missing weight pointer (ggml-quants.c
    `GGML_ASSERT(quant_weights)`), and llama.cpp passes none where it has no entry.
    """
    needing = [name for name, ggml_type in types.items() if ggml_type in TYPES_NEEDING_IMATRIX]
    refused = [name for name in needing if requires_imatrix(name, types[name])]
    if matrix is None:
        if refused and not random_weights:
            raise RecoverLoraError(
                f"{refused[0]} is asked for {types[refused[0]].name}, which llama.cpp quantizes only with an importance matrix "
                f"({len(refused)} tensor(s) in all); pass --imatrix FILE (make one with `recover-lora imatrix`) or use a K-quant such as Q2_K"
            )
        weights: dict[str, np.ndarray] = {}
    else:
        required = [name for name in types if name not in _EXEMPT_TENSORS]
        check_imatrix(matrix, row_widths, required, source)
        weights = quantizer_weights(matrix, [name for name in types if name in matrix.sums])
    for name in needing:
        weights.setdefault(name, np.ones(row_widths[name], dtype=np.float32))
    return weights or None
