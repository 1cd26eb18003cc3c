"""ggml's 32-weight block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL (ggml-common.h block_q4_0 ... block_iq4_nl).

A block is one fp16 scale `d` (plus an fp16 `m` for the _1 types) and 32 codes; there are no
sub-block scales, so codes are [n_blocks, 1, 32]. Weight j of a block (ggml-quants.c dequantize_row_*):

    Q4_0    d * (code - 8)            code 0..15
    Q4_1    d * code + m              code 0..15   (m is added: the block's minimum, usually < 0)
    Q5_0    d * (code - 16)           code 0..31
    Q5_1    d * code + m              code 0..31
    Q8_0    code * d                  code int8 -128..127, stored as is
    IQ4_NL  d * kvalues_iq4nl[code]   code 0..15, an index into the codebook (gguf-py's IQ4_NL.kvalues)

Layout quirks: the 4-bit codes pair weight j (low nibble) with weight j + 16 (high nibble) in byte j,
not neighbours; Q5's fifth bits are one little-endian uint32 `qh`, bit j for weight j.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from recover_lora.export.ggml_blocks.base import HALF, HALF_BYTES, GGMLBlocks, IntField, pack_planes, read_half, unpack_planes, write_half
from recover_lora.export.ggml_blocks.codebook import IQ4_NL_VALUES, CodebookBlocks

QK = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0][0]  # 32: QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 = QK4_NL


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """qs uint8 [n, 16] -> low 4 bits of codes [n, 1, 32]: byte j holds weights j and j + 16."""
    return unpack_planes(qs, 4).reshape(-1, 1, QK)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    return pack_planes((codes & 0xF).reshape(-1, 2, QK // 2), 4)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """qh uint8 [n, 4] (a little-endian uint32) -> bit 4 of codes [n, 1, 32]."""
    return np.unpackbits(qh, axis=-1, bitorder="little").reshape(-1, 1, QK) << np.uint8(4)


def _pack_fifth_bits(codes: np.ndarray) -> np.ndarray:
    return np.packbits((codes >> 4).reshape(-1, QK), axis=-1, bitorder="little")


@dataclass(eq=False)
class Q4_0Blocks(GGMLBlocks):
    """Q4_0: weight = d * (code - 8)."""

    codes: np.ndarray  # uint8 [n, 1, 32], 0..15
    d: np.ndarray  # float32 [n], fp16 values

    GGML_TYPE = GGMLQuantizationType.Q4_0
    SUB_BLOCKS = 1
    CODE_OFFSET = 8
    LAYOUT = (("d", HALF_BYTES), ("qs", QK // 2))
    FIELDS = {"codes": IntField(0, 15), "d": HALF}

    @classmethod
    def _unpack(cls, m):
        return {"codes": _nibbles(m["qs"]), "d": read_half(m["d"])}

    def _pack(self, f):
        return {"d": write_half(f["d"]), "qs": _pack_nibbles(f["codes"])}

    @staticmethod
    def _formula(codes, d):
        return d[:, None, None] * (codes - 8)

    def sub_block_scales(self):
        d = np.asarray(self.d, np.float32)[:, None]
        return d, 8 * d


@dataclass(eq=False)
class Q4_1Blocks(GGMLBlocks):
    """Q4_1: weight = d * code + m."""

    codes: np.ndarray  # uint8 [n, 1, 32], 0..15
    d: np.ndarray  # float32 [n], fp16 values
    m: np.ndarray  # float32 [n], fp16 values, added

    GGML_TYPE = GGMLQuantizationType.Q4_1
    SUB_BLOCKS = 1
    LAYOUT = (("d", HALF_BYTES), ("m", HALF_BYTES), ("qs", QK // 2))
    FIELDS = {"codes": IntField(0, 15), "d": HALF, "m": HALF}

    @classmethod
    def _unpack(cls, m):
        return {"codes": _nibbles(m["qs"]), "d": read_half(m["d"]), "m": read_half(m["m"])}

    def _pack(self, f):
        return {"d": write_half(f["d"]), "m": write_half(f["m"]), "qs": _pack_nibbles(f["codes"])}

    @staticmethod
    def _formula(codes, d, m):
        return d[:, None, None] * codes + m[:, None, None]

    def sub_block_scales(self):
        return np.asarray(self.d, np.float32)[:, None], -np.asarray(self.m, np.float32)[:, None]


@dataclass(eq=False)
class Q5_0Blocks(GGMLBlocks):
    """Q5_0: weight = d * (code - 16); the low 4 bits of each code in qs, the fifth in qh."""

    codes: np.ndarray  # uint8 [n, 1, 32], 0..31
    d: np.ndarray  # float32 [n], fp16 values

    GGML_TYPE = GGMLQuantizationType.Q5_0
    SUB_BLOCKS = 1
    CODE_OFFSET = 16
    LAYOUT = (("d", HALF_BYTES), ("qh", QK // 8), ("qs", QK // 2))
    FIELDS = {"codes": IntField(0, 31), "d": HALF}

    @classmethod
    def _unpack(cls, m):
        return {"codes": _nibbles(m["qs"]) | _fifth_bits(m["qh"]), "d": read_half(m["d"])}

    def _pack(self, f):
        return {"d": write_half(f["d"]), "qh": _pack_fifth_bits(f["codes"]), "qs": _pack_nibbles(f["codes"])}

    @staticmethod
    def _formula(codes, d):
        return d[:, None, None] * (codes - 16)

    def sub_block_scales(self):
        d = np.asarray(self.d, np.float32)[:, None]
        return d, 16 * d


@dataclass(eq=False)
class Q5_1Blocks(GGMLBlocks):
    """Q5_1: weight = d * code + m; bits split as Q5_0's."""

    codes: np.ndarray  # uint8 [n, 1, 32], 0..31
    d: np.ndarray  # float32 [n], fp16 values
    m: np.ndarray  # float32 [n], fp16 values, added

    GGML_TYPE = GGMLQuantizationType.Q5_1
    SUB_BLOCKS = 1
    LAYOUT = (("d", HALF_BYTES), ("m", HALF_BYTES), ("qh", QK // 8), ("qs", QK // 2))
    FIELDS = {"codes": IntField(0, 31), "d": HALF, "m": HALF}

    @classmethod
    def _unpack(cls, m):
        return {"codes": _nibbles(m["qs"]) | _fifth_bits(m["qh"]), "d": read_half(m["d"]), "m": read_half(m["m"])}

    def _pack(self, f):
        return {"d": write_half(f["d"]), "m": write_half(f["m"]), "qh": _pack_fifth_bits(f["codes"]), "qs": _pack_nibbles(f["codes"])}

    @staticmethod
    def _formula(codes, d, m):
        return d[:, None, None] * codes + m[:, None, None]

    def sub_block_scales(self):
        return np.asarray(self.d, np.float32)[:, None], -np.asarray(self.m, np.float32)[:, None]


@dataclass(eq=False)
class Q8_0Blocks(GGMLBlocks):
    """Q8_0: weight = code * d, codes int8 as stored (ggml's quantizer writes -127..127; -128 is valid bits)."""

    codes: np.ndarray  # int8 [n, 1, 32], -128..127
    d: np.ndarray  # float32 [n], fp16 values

    GGML_TYPE = GGMLQuantizationType.Q8_0
    SUB_BLOCKS = 1
    LAYOUT = (("d", HALF_BYTES), ("qs", QK))
    FIELDS = {"codes": IntField(-128, 127, np.int8), "d": HALF}

    @classmethod
    def _unpack(cls, m):
        return {"codes": m["qs"].view(np.int8).reshape(-1, 1, QK), "d": read_half(m["d"])}

    def _pack(self, f):
        return {"d": write_half(f["d"]), "qs": f["codes"].reshape(-1, QK).view(np.uint8)}

    @staticmethod
    def _formula(codes, d):
        return codes * d[:, None, None]

    def sub_block_scales(self):
        d = np.asarray(self.d, np.float32)[:, None]
        return d, np.zeros_like(d)


@dataclass(eq=False)
class IQ4NLBlocks(CodebookBlocks):
    """IQ4_NL: weight = d * kvalues_iq4nl[code], a non-linear 4-bit codebook (nibbles laid out as Q4_0's; codebook.py)."""

    codes: np.ndarray  # uint8 [n, 1, 32], 0..15: indices into IQ4_NL_VALUES
    d: np.ndarray  # float32 [n], fp16 values

    GGML_TYPE = GGMLQuantizationType.IQ4_NL
    SUB_BLOCKS = 1
    LAYOUT = (("d", HALF_BYTES), ("qs", QK // 2))
    FIELDS = {"codes": IntField(0, len(IQ4_NL_VALUES) - 1), "d": HALF}

    @classmethod
    def _unpack(cls, m):
        return {"codes": _nibbles(m["qs"]), "d": read_half(m["d"])}

    def _pack(self, f):
        return {"d": write_half(f["d"]), "qs": _pack_nibbles(f["codes"])}

    @staticmethod
    def level_scale(d):
        return d[:, None, None]


BLOCK32_TYPES = (Q4_0Blocks, Q4_1Blocks, Q5_0Blocks, Q5_1Blocks, Q8_0Blocks, IQ4NLBlocks)
