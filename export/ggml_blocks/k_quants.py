"""ggml's K-quants: Q2_K, Q3_K, Q4_K, Q5_K and Q6_K (ggml-common.h block_q2_K ... block_q6_K).

A 256-weight super-block has sub-blocks with integer scale codes, scaled by the fp16 super-block `d`
(and mins by `dmin`). Weight of sub-block s, as ggml-quants.c's dequantize_row_*:

    Q2_K  (d * sc[s]) * code - dmin * mn[s]     16 x 16, code 0..3,  sc/mn 0..15 (a nibble each, one byte)
    Q3_K  (d * (sc[s] - 32)) * (code - 4)       16 x 16, code 0..7,  sc 0..63 (6 bits, signed by the -32)
    Q4_K  (d * sc[s]) * code - dmin * mn[s]      8 x 32, code 0..15, sc/mn 0..63 (6 bits in a 12-byte pack)
    Q5_K  as Q4_K                                8 x 32, code 0..31
    Q6_K  (d * sc[s]) * (code - 32)             16 x 16, code 0..63, sc int8 -128..127 as stored

Layout quirks (all undone here, so arrays are in weight order):
- Q2_K/Q3_K's 2-bit planes: byte l of half h (32 bytes) holds, at bit shift 2k, the code of weight
  128h + 32k + l. Q3_K's third bit is a separate plane, hmask bit b of byte l for weight 32b + l;
  the code here is low | hbit << 2 (0..7) with ggml's -4, so a *set* bit reads as "no offset" and a
  clear one as "-4" (ggml writes it as `low - (hbit ? 0 : 4)`).
- Q3_K's 6-bit scales: the low nibble of scale s in byte s % 8 (high nibble from s = 8 on), the top
  two bits in byte 8 + s % 4 at shift 2·(s // 4).
- Q4_K/Q5_K's scales and mins (get_scale_min_k4): s < 4 in the low 6 bits of bytes s (scale) and
  s + 4 (min); s >= 4 split into a nibble of byte s + 4 (scale low, min high) and the top 2 bits of
  bytes s - 4 (scale) and s (min). Their 4-bit codes pair weight 64c + l (low nibble) with 64c + 32 + l.
- Q5_K's fifth bits: bit b of qh byte l for weight 32b + l (sub-block b).
- Q6_K: per 128-weight half, ql byte l holds the low nibbles of weights l and 64 + l, byte 32 + l
  those of 32 + l and 96 + l; qh byte l their top two bits at shifts 0, 2, 4, 6 for weights
  l, 32 + l, 64 + l, 96 + l.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
from gguf import QK_K, GGMLQuantizationType

from recover_lora.export.ggml_blocks.base import HALF, HALF_BYTES, GGMLBlocks, IntField, pack_planes, read_half, unpack_planes, write_half

K_SCALE_SIZE = gguf.quants.Q4_K.K_SCALE_SIZE  # 12 bytes of packed 6-bit scales (Q3_K's too)


def _two_bit_planes(qs: np.ndarray) -> np.ndarray:
    """qs uint8 [n, 64] -> 2-bit codes [n, 256] in weight order (Q2_K's codes, Q3_K's low bits)."""
    return unpack_planes(qs.reshape(-1, 2, 32), 2).reshape(-1, QK_K)


def _pack_two_bit_planes(low_bits: np.ndarray) -> np.ndarray:
    return pack_planes(low_bits.reshape(-1, 2, 4, 32), 2).reshape(-1, QK_K // 4)


def _nibble_pairs(qs: np.ndarray) -> np.ndarray:
    """qs uint8 [n, 128] -> low 4 bits of codes [n, 256]: byte 32c + l holds weights 64c + l and 64c + 32 + l."""
    return unpack_planes(qs.reshape(-1, 4, 32), 4).reshape(-1, QK_K)


def _pack_nibble_pairs(codes: np.ndarray) -> np.ndarray:
    return pack_planes((codes & 0xF).reshape(-1, 4, 2, 32), 4).reshape(-1, QK_K // 2)


def _scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes -> (scale codes, min codes), uint8 [n, 8] each, 0..63."""
    low, high, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([low & 63, (rest & 0xF) | ((low >> 6) << 4)], axis=1)
    mins = np.concatenate([high & 63, (rest >> 4) | ((high >> 6) << 4)], axis=1)
    return scales, mins


def _pack_scale_min_k4(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    low = scales[:, :4] | ((scales[:, 4:] >> 4) << 6)
    high = mins[:, :4] | ((mins[:, 4:] >> 4) << 6)
    rest = (scales[:, 4:] & 0xF) | ((mins[:, 4:] & 0xF) << 4)
    return np.concatenate([low, high, rest], axis=1).astype(np.uint8)


def _affine_formula(codes, scale_codes, min_codes, d, dmin):
    """Q2_K/Q4_K/Q5_K: dl = d·sc and ml = dmin·m first, then dl·q - ml (float32, ggml's order)."""
    scale = d[:, None] * scale_codes
    minimum = dmin[:, None] * min_codes
    return scale[:, :, None] * codes - minimum[:, :, None]


def _affine_scales(blocks) -> tuple[np.ndarray, np.ndarray]:
    d, dmin = np.asarray(blocks.d, np.float32)[:, None], np.asarray(blocks.dmin, np.float32)[:, None]
    return d * np.asarray(blocks.scale_codes, np.float32), dmin * np.asarray(blocks.min_codes, np.float32)


@dataclass(eq=False)
class Q2KBlocks(GGMLBlocks):
    """Q2_K (84 bytes for 256 weights): 16 scale/min bytes, 64 bytes of 2-bit codes, fp16 d and dmin.

    Example:
        blocks = Q2KBlocks.from_bytes(raw_tensor_bytes)
        weights = blocks.dequantize().reshape(rows, columns)   # == gguf.quants.dequantize(raw, Q2_K)
        blocks.to_bytes() == raw_tensor_bytes                  # True, byte for byte
    """

    codes: np.ndarray  # uint8 [n, 16, 16], 0..3
    scale_codes: np.ndarray  # uint8 [n, 16], 0..15
    min_codes: np.ndarray  # uint8 [n, 16], 0..15
    d: np.ndarray  # float32 [n], fp16 values
    dmin: np.ndarray  # float32 [n], fp16 values

    GGML_TYPE = GGMLQuantizationType.Q2_K
    SUB_BLOCKS = 16
    MAX_CODE = 3
    MAX_SCALE_CODE = 15  # scale and min codes alike: a nibble each
    LAYOUT = (("scales", QK_K // 16), ("qs", QK_K // 4), ("d", HALF_BYTES), ("dmin", HALF_BYTES))
    FIELDS = {"codes": IntField(0, MAX_CODE), "scale_codes": IntField(0, MAX_SCALE_CODE),
              "min_codes": IntField(0, MAX_SCALE_CODE), "d": HALF, "dmin": HALF}

    @classmethod
    def _unpack(cls, m):
        return {"codes": _two_bit_planes(m["qs"]).reshape(-1, 16, 16), "scale_codes": m["scales"] & 0xF,
                "min_codes": m["scales"] >> 4, "d": read_half(m["d"]), "dmin": read_half(m["dmin"])}

    def _pack(self, f):
        return {"scales": f["scale_codes"] | (f["min_codes"] << 4), "qs": _pack_two_bit_planes(f["codes"]),
                "d": write_half(f["d"]), "dmin": write_half(f["dmin"])}

    _formula = staticmethod(_affine_formula)

    def sub_block_scales(self):
        """(scale, min) per sub-block in float32, [n, 16]: weight = scale * code - min, exactly as ggml."""
        return _affine_scales(self)


@dataclass(eq=False)
class Q3KBlocks(GGMLBlocks):
    """Q3_K (110 bytes): hmask (third bits), 2-bit planes, 12 bytes of 6-bit scales, fp16 d. No mins."""

    codes: np.ndarray  # uint8 [n, 16, 16], 0..7: weight uses code - 4
    scale_codes: np.ndarray  # uint8 [n, 16], 0..63: weight uses scale_code - 32
    d: np.ndarray  # float32 [n], fp16 values

    GGML_TYPE = GGMLQuantizationType.Q3_K
    SUB_BLOCKS = 16
    CODE_OFFSET = 4
    SCALE_OFFSET = 32
    LAYOUT = (("hmask", QK_K // 8), ("qs", QK_K // 4), ("scales", K_SCALE_SIZE), ("d", HALF_BYTES))
    FIELDS = {"codes": IntField(0, 7), "scale_codes": IntField(0, 63), "d": HALF}

    @classmethod
    def _unpack(cls, m):
        third_bits = unpack_planes(m["hmask"], 1).reshape(-1, QK_K)  # plane b = weights 32b .. 32b + 31
        codes = _two_bit_planes(m["qs"]) | (third_bits << 2)
        low = unpack_planes(m["scales"][:, :8], 4).reshape(-1, 16)  # nibble k of byte j: scale 8k + j
        high = unpack_planes(m["scales"][:, 8:], 2).reshape(-1, 16)  # shift 2k of byte 8 + j: scale 4k + j
        return {"codes": codes.reshape(-1, 16, 16), "scale_codes": low | (high << 4), "d": read_half(m["d"])}

    def _pack(self, f):
        codes, scales = f["codes"].reshape(-1, QK_K), f["scale_codes"]
        packed = np.concatenate([pack_planes((scales & 0xF).reshape(-1, 2, 8), 4), pack_planes((scales >> 4).reshape(-1, 4, 4), 2)], axis=1)
        return {"hmask": pack_planes((codes >> 2).reshape(-1, 8, 32), 1), "qs": _pack_two_bit_planes(codes & 3),
                "scales": packed, "d": write_half(f["d"])}

    @staticmethod
    def _formula(codes, scale_codes, d):
        scale = d[:, None] * (scale_codes - 32)
        return scale[:, :, None] * (codes - 4)

    def sub_block_scales(self):
        scale = np.asarray(self.d, np.float32)[:, None] * (np.asarray(self.scale_codes, np.float32) - 32)
        return scale, 4 * scale


@dataclass(eq=False)
class Q4KBlocks(GGMLBlocks):
    """Q4_K (144 bytes): fp16 d and dmin, 12 bytes of 6-bit scales and mins, 4-bit codes."""

    codes: np.ndarray  # uint8 [n, 8, 32], 0..15
    scale_codes: np.ndarray  # uint8 [n, 8], 0..63
    min_codes: np.ndarray  # uint8 [n, 8], 0..63
    d: np.ndarray  # float32 [n], fp16 values
    dmin: np.ndarray  # float32 [n], fp16 values

    GGML_TYPE = GGMLQuantizationType.Q4_K
    SUB_BLOCKS = 8
    LAYOUT = (("d", HALF_BYTES), ("dmin", HALF_BYTES), ("scales", K_SCALE_SIZE), ("qs", QK_K // 2))
    FIELDS = {"codes": IntField(0, 15), "scale_codes": IntField(0, 63), "min_codes": IntField(0, 63), "d": HALF, "dmin": HALF}

    @classmethod
    def _unpack(cls, m):
        scale_codes, min_codes = _scale_min_k4(m["scales"])
        return {"codes": _nibble_pairs(m["qs"]).reshape(-1, 8, 32), "scale_codes": scale_codes, "min_codes": min_codes,
                "d": read_half(m["d"]), "dmin": read_half(m["dmin"])}

    def _pack(self, f):
        return {"d": write_half(f["d"]), "dmin": write_half(f["dmin"]), "scales": _pack_scale_min_k4(f["scale_codes"], f["min_codes"]),
                "qs": _pack_nibble_pairs(f["codes"])}

    _formula = staticmethod(_affine_formula)

    def sub_block_scales(self):
        return _affine_scales(self)


@dataclass(eq=False)
class Q5KBlocks(GGMLBlocks):
    """Q5_K (176 bytes): as Q4_K, plus qh with the fifth bit of every code."""

    codes: np.ndarray  # uint8 [n, 8, 32], 0..31
    scale_codes: np.ndarray  # uint8 [n, 8], 0..63
    min_codes: np.ndarray  # uint8 [n, 8], 0..63
    d: np.ndarray  # float32 [n], fp16 values
    dmin: np.ndarray  # float32 [n], fp16 values

    GGML_TYPE = GGMLQuantizationType.Q5_K
    SUB_BLOCKS = 8
    LAYOUT = (("d", HALF_BYTES), ("dmin", HALF_BYTES), ("scales", K_SCALE_SIZE), ("qh", QK_K // 8), ("qs", QK_K // 2))
    FIELDS = {"codes": IntField(0, 31), "scale_codes": IntField(0, 63), "min_codes": IntField(0, 63), "d": HALF, "dmin": HALF}

    @classmethod
    def _unpack(cls, m):
        scale_codes, min_codes = _scale_min_k4(m["scales"])
        codes = _nibble_pairs(m["qs"]) | (unpack_planes(m["qh"], 1).reshape(-1, QK_K) << 4)
        return {"codes": codes.reshape(-1, 8, 32), "scale_codes": scale_codes, "min_codes": min_codes,
                "d": read_half(m["d"]), "dmin": read_half(m["dmin"])}

    def _pack(self, f):
        return {"d": write_half(f["d"]), "dmin": write_half(f["dmin"]), "scales": _pack_scale_min_k4(f["scale_codes"], f["min_codes"]),
                "qh": pack_planes(f["codes"] >> 4, 1), "qs": _pack_nibble_pairs(f["codes"])}

    _formula = staticmethod(_affine_formula)

    def sub_block_scales(self):
        return _affine_scales(self)


@dataclass(eq=False)
class Q6KBlocks(GGMLBlocks):
    """Q6_K (210 bytes): low nibbles (ql), top two bits (qh), int8 sub-block scales, fp16 d."""

    codes: np.ndarray  # uint8 [n, 16, 16], 0..63: weight uses code - 32
    scale_codes: np.ndarray  # int8 [n, 16], -128..127 as stored
    d: np.ndarray  # float32 [n], fp16 values

    GGML_TYPE = GGMLQuantizationType.Q6_K
    SUB_BLOCKS = 16
    CODE_OFFSET = 32
    LAYOUT = (("ql", QK_K // 2), ("qh", QK_K // 4), ("scales", QK_K // 16), ("d", HALF_BYTES))
    FIELDS = {"codes": IntField(0, 63), "scale_codes": IntField(-128, 127, np.int8), "d": HALF}

    @classmethod
    def _unpack(cls, m):
        n = len(m["ql"])
        # ql as [n, half, byte group (l or 32 + l), l] -> nibbles [n, half, group, nibble, l]; weight
        # 128·half + 32·(2·nibble + group) + l, so nibble goes before group.
        low = unpack_planes(m["ql"].reshape(n, 2, 2, 32), 4).swapaxes(2, 3).reshape(n, QK_K)
        high = unpack_planes(m["qh"].reshape(n, 2, 32), 2).reshape(n, QK_K)
        return {"codes": (low | (high << 4)).reshape(n, 16, 16), "scale_codes": m["scales"].view(np.int8), "d": read_half(m["d"])}

    def _pack(self, f):
        n, codes = len(f["codes"]), f["codes"].reshape(-1, QK_K)
        low = (codes & 0xF).reshape(n, 2, 2, 2, 32).swapaxes(2, 3)  # [n, half, group, nibble, l]
        return {"ql": pack_planes(low, 4).reshape(n, QK_K // 2), "qh": pack_planes((codes >> 4).reshape(n, 2, 4, 32), 2).reshape(n, QK_K // 4),
                "scales": f["scale_codes"].view(np.uint8), "d": write_half(f["d"])}

    @staticmethod
    def _formula(codes, scale_codes, d):
        scale = d[:, None] * scale_codes
        return scale[:, :, None] * (codes - 32)

    def sub_block_scales(self):
        scale = np.asarray(self.d, np.float32)[:, None] * np.asarray(self.scale_codes, np.float32)
        return scale, 32 * scale


K_QUANT_TYPES = (Q2KBlocks, Q3KBlocks, Q4KBlocks, Q5KBlocks, Q6KBlocks)
