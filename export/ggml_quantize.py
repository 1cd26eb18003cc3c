"""One tensor through llama.cpp's own quantizer (ggml's `ggml_quantize_chunk`), in memory.

`llama_model_quantize` quantizes whole files; the type search needs one tensor in one type, many
times, to see the error each choice makes. ggml-base (the library llama-cpp-python loads) exports
the very function llama.cpp's quantizer calls per tensor, importance weights included, so the bytes
here are the bytes a file of that type would hold. gguf-py's `dequantize` turns them back.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np

from recover_lora.errors import RecoverLoraError


@lru_cache(maxsize=1)
def _ggml_base() -> ctypes.CDLL:
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(folder.glob("libggml-base.*"))
    if not found:
        raise RecoverLoraError(f"llama-cpp-python has no libggml-base in {folder}; reinstall it with `make install`")
    lib = ctypes.CDLL(str(found[0]))
    # size_t ggml_quantize_chunk(enum ggml_type, const float * src, void * dst, int64_t start, int64_t nrows,
    #                            int64_t n_per_row, const float * imatrix)   (ggml.h)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def quantize_rows(weights: np.ndarray, ggml_type: gguf.GGMLQuantizationType, importance: np.ndarray | None = None,
                  threads: int | None = None) -> np.ndarray:
    """`weights` (rows, row width) quantized as llama.cpp's quantizer does -> the raw blocks, uint8 (rows, row bytes).

    `importance`: per column weights (mean squared input, `imatrix_file.quantizer_weights`), or None.
    """
    block, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
    rows, width = weights.shape
    if width % block:
        raise RecoverLoraError(f"{ggml_type.name} needs rows of a multiple of {block}; this tensor's are {width} wide")
    if importance is not None and importance.shape != (width,):
        raise RecoverLoraError(f"importance weights of {importance.shape[0]} columns for rows of {width}")
    lib = _ggml_base()
    if importance is None and lib.ggml_quantize_requires_imatrix(int(ggml_type)):
        # ggml would abort the whole process (GGML_ASSERT) instead of returning.
        raise RecoverLoraError(f"{ggml_type.name} needs importance weights (an importance matrix entry) for every tensor")
    source = np.ascontiguousarray(weights, dtype=np.float32)
    weights_c = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    row_bytes = width // block * block_bytes
    out = np.empty((rows, row_bytes), dtype=np.uint8)
    lib.ggml_quantize_init(int(ggml_type))  # IQ grids: initialised once, before threads share them
    # ctypes releases the GIL during the call, so row chunks quantize in parallel.
    n_threads = max(1, min(threads or os.cpu_count() or 1, rows))
    bounds = np.linspace(0, rows, n_threads + 1, dtype=np.int64)

    def chunk(i: int) -> int:
        start, stop = int(bounds[i]), int(bounds[i + 1])
        if stop == start:
            return 0
        # ggml's start is an element index into src; dst is written from that row's bytes on.
        return lib.ggml_quantize_chunk(int(ggml_type), source.ctypes.data, out.ctypes.data, start * width, stop - start, width,
                                       None if weights_c is None else weights_c.ctypes.data)

    with ThreadPoolExecutor(n_threads) as pool:
        written = sum(pool.map(chunk, range(n_threads)))
    if written != out.nbytes:
        raise RecoverLoraError(f"ggml wrote {written} bytes of {ggml_type.name} for {out.nbytes} expected")
    return out


def round_trip(weights: np.ndarray, ggml_type: gguf.GGMLQuantizationType, importance: np.ndarray | None = None,
               threads: int | None = None) -> tuple[np.ndarray, int]:
    """The weights as a file of `ggml_type` holds them (dequantized by gguf-py), and their bytes."""
    blocks = quantize_rows(weights, ggml_type, importance, threads)
    return gguf.quants.dequantize(blocks, ggml_type).reshape(weights.shape), blocks.nbytes
