"""llama.cpp's ggml block formats as arrays: unpack a tensor's bytes, dequantize (numpy or torch), pack back bit-exactly.

One dataclass per ggml type, all with one API (base.py): block32.py holds Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0 and IQ4_NL, k_quants.py Q2_K, Q3_K, Q4_K, Q5_K and Q6_K, codebook.py IQ4_XS (and what it shares with
IQ4_NL: codes that index a table of levels), iq_grid.py IQ3_S and IQ3_XXS (a code per group of 4 weights names a grid
point; a sign per weight). The other IQ grid types (IQ2_*, IQ1_*) are not here. Codes, scale codes and min codes are
integer arrays in weight order, as stored; d/dmin/m are float32 arrays of fp16 values.

Example:
    blocks = from_bytes(tensor.data, tensor.tensor_type)     # e.g. a Q4KBlocks
    weights = blocks.dequantize()                            # == gguf.quants.dequantize(tensor.data, type)
    fields = blocks.to_torch()                               # float32 tensors: learn codes, scales, d
    trained = type(blocks).torch_dequantize(**fields)        # the same weights, differentiable
    blocks.scale_codes[0, 3] += 1                            # changes only that scale's bits
    raw = blocks.to_bytes()                                  # uint8 [n_blocks, block bytes]
"""

from __future__ import annotations

import gguf

from recover_lora.errors import RecoverLoraError
from recover_lora.export.ggml_blocks.base import GGMLBlocks, HalfField, IntField
from recover_lora.export.ggml_blocks.block32 import (
    BLOCK32_TYPES,
    IQ4NLBlocks,
    Q4_0Blocks,
    Q4_1Blocks,
    Q5_0Blocks,
    Q5_1Blocks,
    Q8_0Blocks,
)
from recover_lora.export.ggml_blocks.codebook import CODEBOOK_TYPES, IQ4_NL_VALUES, CodebookBlocks, IQ4XSBlocks
from recover_lora.export.ggml_blocks.iq_grid import GRID_TYPES, GridBlocks, IQ3SBlocks, IQ3XXSBlocks
from recover_lora.export.ggml_blocks.k_quants import K_QUANT_TYPES, Q2KBlocks, Q3KBlocks, Q4KBlocks, Q5KBlocks, Q6KBlocks

BLOCK_TYPES: dict[gguf.GGMLQuantizationType, type[GGMLBlocks]] = {
    cls.GGML_TYPE: cls for cls in BLOCK32_TYPES + K_QUANT_TYPES + CODEBOOK_TYPES + GRID_TYPES}


def blocks_for(ggml_type: gguf.GGMLQuantizationType | int | str) -> type[GGMLBlocks]:
    """The block class of a ggml type (the enum, its number as GGUF stores it, or its name, e.g. "Q4_K")."""
    try:
        key = gguf.GGMLQuantizationType[ggml_type] if isinstance(ggml_type, str) else gguf.GGMLQuantizationType(int(ggml_type))
    except (KeyError, ValueError, TypeError):
        key = None
    if key not in BLOCK_TYPES:
        name = key.name if key is not None else repr(ggml_type)
        raise RecoverLoraError(f"no block format for ggml type {name}; supported: {', '.join(t.name for t in BLOCK_TYPES)}")
    return BLOCK_TYPES[key]


def from_bytes(raw, ggml_type: gguf.GGMLQuantizationType | int | str) -> GGMLBlocks:
    """A tensor's raw bytes (GGUFReader's `tensor.data`, any shape) as the blocks of its type."""
    return blocks_for(ggml_type).from_bytes(raw)


__all__ = [
    "BLOCK_TYPES", "CodebookBlocks", "GGMLBlocks", "GridBlocks", "HalfField", "IntField", "IQ4_NL_VALUES", "blocks_for", "from_bytes",
    "Q4_0Blocks", "Q4_1Blocks", "Q5_0Blocks", "Q5_1Blocks", "Q8_0Blocks", "IQ4NLBlocks",
    "Q2KBlocks", "Q3KBlocks", "Q4KBlocks", "Q5KBlocks", "Q6KBlocks", "IQ4XSBlocks", "IQ3SBlocks", "IQ3XXSBlocks",
]
