"""ggml's non-linear 4-bit types: a code indexes IQ4_NL's 16 levels (kvalues_iq4nl), times a scale.

    IQ4_NL  d * kvalues_iq4nl[code]                 32-weight blocks (block32.py: laid out as Q4_0)
    IQ4_XS  (d * (sc[s] - 32)) * kvalues_iq4nl[code]  256-weight super-blocks, 8 x 32, sc 0..63 (6 bits)

Both are what ggml-quants.c's dequantize_row_iq4_nl / _xs compute, in that float order. The levels are
not evenly spaced, so a code has no "step": `level_scale` is the number every level of a sub-block is
multiplied by, and the codes are fitted to weights by nearest level (ggml's best_index_int8).

IQ4_XS's layout (block_iq4_xs): fp16 d; uint16 scales_h, the top 2 bits of sub-block s's scale at bit
2s; 4 bytes scales_l, its low nibble in byte s // 2 (low nibble for even s); then 16 bytes per sub-block,
byte j holding weight j (low nibble) and weight j + 16 (high nibble), as IQ4_NL's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gguf
import numpy as np
from gguf import QK_K, GGMLQuantizationType

from recover_lora.export.ggml_blocks.base import HALF, HALF_BYTES, GGMLBlocks, IntField, pack_planes, read_half, unpack_planes, write_half

IQ4_NL_VALUES = np.array(gguf.quants.IQ4_NL.kvalues, dtype=np.float32)  # kvalues_iq4nl, sorted
IQ4_XS_SUB_BLOCK = 32


class CodebookBlocks(GGMLBlocks):
    """A type whose weight is `level_scale · LEVELS[code]`: the codes index a table, they are not a grid.

    torch_dequantize has no gradient for such codes (it takes them as float and rounds to an index);
    recovery/quantized_weight.py trains them through the levels' local slope instead.
    """

    LEVELS: ClassVar[np.ndarray] = IQ4_NL_VALUES

    @staticmethod
    def level_scale(**scale_fields):
        """Every field but the codes (numpy or torch) -> the multiplier of each sub-block's levels, [n, S, 1]."""
        raise NotImplementedError

    @classmethod
    def _formula(cls, codes, **scale_fields):
        if isinstance(codes, np.ndarray):
            values = cls.LEVELS[codes.astype(np.intp)]
        else:
            import torch

            values = torch.as_tensor(cls.LEVELS, dtype=torch.float32, device=codes.device)[codes.round().long()]
        return cls.level_scale(**scale_fields) * values

    def scale_values(self) -> np.ndarray:
        """float32 [n, S, 1]: this tensor's `level_scale`."""
        return self.level_scale(**{name: np.asarray(getattr(self, name), np.float32) for name in self.FIELDS if name != "codes"})

    def sub_block_scales(self):
        raise NotImplementedError(f"{self.GGML_TYPE.name}'s codes index a codebook, not a grid: weight = level_scale * LEVELS[code]")

    def _fit_codes(self, weights):
        # The nearest level, as ggml's best_index_int8: x picks level i from the midpoint of levels i-1 and i
        # on. A sub-block of scale 0 holds 0 whatever its codes.
        scale = self.scale_values()
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = np.where(scale == 0, 0.0, weights / scale)
        midpoints = (self.LEVELS[1:] + self.LEVELS[:-1]) / 2
        codes = np.searchsorted(midpoints, scaled, side="right").astype(np.float64)
        return np.where(np.isnan(scaled), np.nan, codes)  # NaN weights stay NaN, so encode refuses them


@dataclass(eq=False)
class IQ4XSBlocks(CodebookBlocks):
    """IQ4_XS (136 bytes per 256 weights, 4.25 bits): IQ4_NL's levels with a 6-bit scale per 32 weights."""

    codes: np.ndarray  # uint8 [n, 8, 32], 0..15: indices into IQ4_NL_VALUES
    scale_codes: np.ndarray  # uint8 [n, 8], 0..63: the level scale is d * (scale_code - 32)
    d: np.ndarray  # float32 [n], fp16 values

    GGML_TYPE = GGMLQuantizationType.IQ4_XS
    SUB_BLOCKS = QK_K // IQ4_XS_SUB_BLOCK
    SCALE_OFFSET = 32
    LAYOUT = (("d", HALF_BYTES), ("scales_h", 2), ("scales_l", QK_K // 64), ("qs", QK_K // 2))
    FIELDS = {"codes": IntField(0, len(IQ4_NL_VALUES) - 1), "scale_codes": IntField(0, 63), "d": HALF}

    @classmethod
    def _unpack(cls, m):
        n = m["d"].shape[0]
        codes = unpack_planes(m["qs"].reshape(n, cls.SUB_BLOCKS, 16), 4).reshape(n, cls.SUB_BLOCKS, IQ4_XS_SUB_BLOCK)
        low = unpack_planes(m["scales_l"], 4).transpose(0, 2, 1).reshape(n, cls.SUB_BLOCKS)  # nibble k of byte j: 2j + k
        high = unpack_planes(m["scales_h"], 2).transpose(0, 2, 1).reshape(n, cls.SUB_BLOCKS)  # shift 2k of byte j: 4j + k
        return {"codes": codes, "scale_codes": low | (high << 4), "d": read_half(m["d"])}

    def _pack(self, f):
        n, scales = f["d"].shape[0], f["scale_codes"]
        low = pack_planes((scales & 0xF).reshape(n, 4, 2).transpose(0, 2, 1), 4)
        high = pack_planes((scales >> 4).reshape(n, 2, 4).transpose(0, 2, 1), 2)
        qs = pack_planes(f["codes"].reshape(n, self.SUB_BLOCKS, 2, 16), 4).reshape(n, QK_K // 2)
        return {"d": write_half(f["d"]), "scales_h": high, "scales_l": low, "qs": qs}

    @staticmethod
    def level_scale(scale_codes, d):
        return (d[:, None] * (scale_codes - 32))[:, :, None]


CODEBOOK_TYPES = (IQ4XSBlocks,)  # IQ4_NL is block32.py's, beside the other 32-weight types
