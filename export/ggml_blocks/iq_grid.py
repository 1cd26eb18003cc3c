"""ggml's IQ grid types: a code names one point of a fixed grid for a group of weights, with a sign per weight.

    IQ3_S    d * (1 + 2 * sc[s]) * iq3s_grid[code][j] * (sign ? -1 : 1)
             256-weight super-blocks, 8 sub-blocks of 32 with a 4-bit scale each, 8 groups of 4 weights per
             sub-block; the grid has 512 points of 4 odd magnitudes 1..15 (of the 8^4 such 4-tuples)
    IQ3_XXS  d * (0.5 + sc[s]) * 0.5 * iq3xxs_grid[code][j] * (sign ? -1 : 1)
             the same super-blocks, sub-blocks and groups; a 256-point grid of magnitudes 4, 12, .., 52, 62, and
             7 stored signs per 8 weights: the 8th makes the number of negative weights even (ggml's ksigns table)

which is what ggml-quants.c's dequantize_row_iq3_s / _iq3_xxs compute, in that float order (gguf-py's grids hold the
same tables). Codes are not per weight: `codes` is [n, 8, 8], one grid index per group of 4, and `signs`
[n, 8, 32] one bit per weight. Choosing a group's code is choosing the grid point nearest to its 4 magnitudes
(`nearest_grid_points`), the step that learned rounding (recovery/quantized_weight.py) moves.

Layout (block_iq3_s): fp16 d; qs[64], the low 8 bits of group g's code in byte g; qh[8], bit 8 of the codes of
sub-block s's 8 groups in byte s (bit l for its group l); signs[32], bit j of byte k for weight 8k + j; scales[4],
sub-block s's scale in byte s // 2 (low nibble for even s).
Layout (block_iq3_xxs): fp16 d; qs[96]: group g's code in byte g (64), then a little-endian uint32 per sub-block s,
bits 7l .. 7l + 6 the signs of its weights 8l .. 8l + 6 (bit j for weight 8l + j), bits 28..31 its scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gguf
import numpy as np
from gguf import QK_K, GGMLQuantizationType

from recover_lora.errors import RecoverLoraError
from recover_lora.export.ggml_blocks.base import HALF, HALF_BYTES, GGMLBlocks, IntField, pack_planes, read_half, unpack_planes, write_half

GROUP = 4  # weights per grid point
# Grid points nearest each rounded 4-tuple of levels that `nearest_grid_points` compares exactly.
CANDIDATES_PER_POINT = 16


def _grid(quant) -> np.ndarray:
    """gguf-py's grid of a type as float32 [points, GROUP] (it builds the table from ggml's hex on first use)."""
    quant.init_grid()
    return np.ascontiguousarray(quant.grid.reshape(-1, GROUP).astype(np.float32))


class GridBlocks(GGMLBlocks):
    """A type whose groups of GROUP weights are `level_scale · GRID[code] · sign`: a code picks a grid point.

    torch_dequantize has no gradient for the codes (a lookup); recovery/quantized_weight.py trains the magnitudes the
    codes are chosen from instead. `signs` are stored bits (1: negative), fitted to the weights' own signs.
    """

    GRID: ClassVar[np.ndarray]
    LEVEL_STEP: ClassVar[float]  # distance between neighbouring magnitudes of the grid
    GROUPS_PER_SUB_BLOCK: ClassVar[int]
    # Weights whose signs hold an even number of negatives (the last sign is implied), or None: every sign is stored.
    SIGN_PARITY_GROUP: ClassVar[int | None] = None

    @staticmethod
    def level_scale(**scale_fields):
        """Every field but the codes and signs (numpy or torch) -> the multiplier of each sub-block's grid, [n, S, 1]."""
        raise NotImplementedError

    @classmethod
    def _field_shape(cls, name: str, n: int) -> tuple[int, ...]:
        if name == "codes":
            return (n, cls.SUB_BLOCKS, cls.GROUPS_PER_SUB_BLOCK)
        if name == "signs":
            return (n, cls.SUB_BLOCKS, cls.WEIGHTS_PER_SUB_BLOCK)
        return super()._field_shape(name, n)

    @classmethod
    def _formula(cls, codes, signs, **scale_fields):
        n, sub_blocks = codes.shape[:2]
        if isinstance(codes, np.ndarray):
            magnitudes = cls.GRID[codes.astype(np.intp)]
        else:
            import torch

            magnitudes = torch.as_tensor(cls.GRID, device=codes.device)[codes.round().long()]
        magnitudes = magnitudes.reshape(n, sub_blocks, cls.WEIGHTS_PER_SUB_BLOCK)
        return cls.level_scale(**scale_fields) * magnitudes * (1 - 2 * signs)  # ggml: (scale * grid) * ±1

    def scale_values(self) -> np.ndarray:
        """float32 [n, S, 1]: this tensor's `level_scale`."""
        return self.level_scale(**{name: np.asarray(getattr(self, name), np.float32)
                                   for name in self.FIELDS if name not in ("codes", "signs")})

    def sub_block_scales(self):
        raise NotImplementedError(f"{self.GGML_TYPE.name}'s codes name grid points: weight = level_scale * GRID[code] * sign")

    def _fit_codes(self, weights):
        # The grid point nearest to each group's magnitudes under the current scales (the signs are given).
        scale = self.scale_values()
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = np.where(scale == 0, 0.0, np.abs(weights) / scale)
        if np.isnan(scaled).any():
            return np.full(self._field_shape("codes", weights.shape[0]), np.nan)  # encode refuses NaN
        import torch

        groups = torch.from_numpy(scaled.astype(np.float32)).reshape(*scaled.shape[:2], -1, GROUP)
        return nearest_grid_points(groups, type(self)).numpy().astype(np.float64)


def grid_candidates(cls: type[GridBlocks]) -> np.ndarray:
    """int64 [levels^GROUP, CANDIDATES_PER_POINT]: for every GROUP-tuple of the grid's levels, its nearest grid points."""
    cached = cls.__dict__.get("_candidates")
    if cached is None:
        levels = np.unique(cls.GRID)
        tuples = np.stack(np.meshgrid(*[levels] * GROUP, indexing="ij"), axis=-1).reshape(-1, GROUP)
        distances = ((tuples[:, None, :] - cls.GRID[None, :, :]) ** 2).sum(-1)
        cached = np.argsort(distances, axis=1, kind="stable")[:, :CANDIDATES_PER_POINT]
        cls._candidates = cached
    return cached


def nearest_grid_points(magnitudes, cls: type[GridBlocks], groups_per_chunk: int = 1 << 18):
    """torch [..., GROUP] non-negative magnitudes in level units -> int64 [...]: each group's nearest grid point among
    the CANDIDATES_PER_POINT grid points nearest to its rounded levels (ggml's IQ3_S quantizer also searches only the
    neighbours of the rounded point). Ties go to the lower index. Chunked: the candidates' points take 256 bytes a group,
    about 1 GB at once for one FFN tensor of a 1.5B model."""
    import torch

    device = magnitudes.device
    levels = torch.as_tensor(np.unique(cls.GRID), device=device)
    radix = len(levels) ** torch.arange(GROUP - 1, -1, -1, device=device)
    table, grid = torch.as_tensor(grid_candidates(cls), device=device), torch.as_tensor(cls.GRID, device=device)
    flat = magnitudes.reshape(-1, GROUP)
    nearest = torch.empty(flat.shape[0], dtype=torch.long, device=device)
    for start in range(0, flat.shape[0], groups_per_chunk):
        chunk = flat[start : start + groups_per_chunk]
        index = ((chunk - levels[0]) / cls.LEVEL_STEP).round().clamp(0, len(levels) - 1).long()
        candidates = table[(index * radix).sum(-1)]
        distances = ((grid[candidates] - chunk.unsqueeze(-2)) ** 2).sum(-1)  # [chunk, C]
        nearest[start : start + groups_per_chunk] = candidates.gather(-1, distances.argmin(-1, keepdim=True)).squeeze(-1)
    return nearest.reshape(magnitudes.shape[:-1])


@dataclass(eq=False)
class IQ3SBlocks(GridBlocks):
    """IQ3_S (110 bytes per 256 weights, 3.44 bits): a 512-point grid of 4 odd magnitudes, a sign per weight, 4-bit scales."""

    codes: np.ndarray  # uint16 [n, 8, 8], 0..511: a grid point per group of 4 weights
    signs: np.ndarray  # uint8 [n, 8, 32], 0..1: 1 where the weight is negative
    scale_codes: np.ndarray  # uint8 [n, 8], 0..15: the level scale is d * (1 + 2 * scale_code)
    d: np.ndarray  # float32 [n], fp16 values

    GGML_TYPE = GGMLQuantizationType.IQ3_S
    SUB_BLOCKS = QK_K // 32
    GROUPS_PER_SUB_BLOCK = 32 // GROUP
    GRID = _grid(gguf.quants.IQ3_S)
    LEVEL_STEP = 2.0
    LAYOUT = (("d", HALF_BYTES), ("qs", QK_K // 4), ("qh", QK_K // 32), ("signs", QK_K // 8), ("scales", QK_K // 64))
    FIELDS = {"codes": IntField(0, len(GRID) - 1, np.uint16), "signs": IntField(0, 1), "scale_codes": IntField(0, 15), "d": HALF}

    @classmethod
    def _unpack(cls, m):
        n = m["d"].shape[0]
        high = np.unpackbits(m["qh"], axis=-1, bitorder="little").reshape(n, cls.SUB_BLOCKS, cls.GROUPS_PER_SUB_BLOCK)
        codes = m["qs"].reshape(n, cls.SUB_BLOCKS, cls.GROUPS_PER_SUB_BLOCK).astype(np.uint16) | (high.astype(np.uint16) << 8)
        signs = np.unpackbits(m["signs"], axis=-1, bitorder="little").reshape(n, cls.SUB_BLOCKS, cls.WEIGHTS_PER_SUB_BLOCK)
        scales = unpack_planes(m["scales"], 4).transpose(0, 2, 1).reshape(n, cls.SUB_BLOCKS)  # nibble k of byte j: 2j + k
        return {"codes": codes, "signs": signs, "scale_codes": scales, "d": read_half(m["d"])}

    def _pack(self, f):
        n, codes = f["d"].shape[0], f["codes"]
        qs = (codes & 0xFF).astype(np.uint8).reshape(n, QK_K // 4)
        qh = np.packbits((codes >> 8).astype(np.uint8).reshape(n, -1), axis=-1, bitorder="little")
        signs = np.packbits(f["signs"].reshape(n, -1), axis=-1, bitorder="little")
        scales = pack_planes(f["scale_codes"].reshape(n, QK_K // 64, 2).transpose(0, 2, 1), 4)
        return {"d": write_half(f["d"]), "qs": qs, "qh": qh, "signs": signs, "scales": scales}

    @staticmethod
    def level_scale(scale_codes, d):
        return (d[:, None] * (1 + 2 * scale_codes))[:, :, None]


def even_sign_parity(signs, magnitudes, group: int):
    """torch signs (1: negative) and the magnitudes they go with, [..., W] -> signs with an even number of negatives in
    each `group` consecutive weights: where a group has an odd number, the sign of its smallest magnitude flips (where
    that costs least; ggml's IQ3_XXS quantizer flips the weight of least importance-weighted magnitude alike)."""
    import torch

    grouped = signs.reshape(*signs.shape[:-1], -1, group)
    odd = grouped.sum(-1, keepdim=True).remainder(2) == 1
    smallest = torch.zeros_like(grouped, dtype=torch.bool).scatter_(
        -1, magnitudes.reshape(grouped.shape).argmin(-1, keepdim=True), True)
    return torch.where(odd & smallest, 1 - grouped, grouped).reshape(signs.shape)


@dataclass(eq=False)
class IQ3XXSBlocks(GridBlocks):
    """IQ3_XXS (98 bytes per 256 weights, 3.06 bits): a 256-point grid of 4 magnitudes, 7 stored signs per 8 weights, 4-bit scales."""

    codes: np.ndarray  # uint8 [n, 8, 8]: a grid point per group of 4 weights
    signs: np.ndarray  # uint8 [n, 8, 32], 0..1: 1 where the weight is negative; an even number in each 8
    scale_codes: np.ndarray  # uint8 [n, 8], 0..15: the level scale is d * (0.5 + scale_code) * 0.5
    d: np.ndarray  # float32 [n], fp16 values

    GGML_TYPE = GGMLQuantizationType.IQ3_XXS
    SUB_BLOCKS = QK_K // 32
    GROUPS_PER_SUB_BLOCK = 32 // GROUP
    SIGN_PARITY_GROUP = 8
    GRID = _grid(gguf.quants.IQ3_XXS)
    LEVEL_STEP = 8.0  # 4, 12, .., 52 and then 62: nearest_grid_points compares exact distances among its candidates
    LAYOUT = (("d", HALF_BYTES), ("qs", QK_K // 4), ("scales_and_signs", QK_K // 8))
    FIELDS = {"codes": IntField(0, len(GRID) - 1), "signs": IntField(0, 1), "scale_codes": IntField(0, 15), "d": HALF}

    @classmethod
    def _unpack(cls, m):
        n = m["d"].shape[0]
        words = np.ascontiguousarray(m["scales_and_signs"]).view("<u4")  # [n, 8]
        stored = (words[:, :, None] >> np.arange(0, 28, 7, dtype=np.uint32)) & 0x7F  # [n, 8, 4]: 7 signs per 8 weights
        bits = np.unpackbits(stored.astype(np.uint8)[..., None], axis=-1, bitorder="little")  # [n, 8, 4, 8], bit 7 is 0
        bits[..., 7] = bits[..., :7].sum(-1) % 2  # the implied sign: an even number of negatives (ggml's ksigns)
        return {"codes": m["qs"].reshape(n, cls.SUB_BLOCKS, cls.GROUPS_PER_SUB_BLOCK), "signs": bits.reshape(n, cls.SUB_BLOCKS, -1),
                "scale_codes": (words >> 28).astype(np.uint8), "d": read_half(m["d"])}

    def _pack(self, f):
        n = f["d"].shape[0]
        bits = f["signs"].reshape(n, self.SUB_BLOCKS, -1, self.SIGN_PARITY_GROUP)
        if (bits.sum(-1) % 2).any():
            raise RecoverLoraError("IQ3_XXS signs must hold an even number of negatives in each 8 weights (the 8th is implied); "
                                   "fix them with iq_grid.even_sign_parity")
        stored = np.packbits(bits[..., :7], axis=-1, bitorder="little")[..., 0].astype(np.uint32)  # [n, 8, 4]
        words = (stored << np.arange(0, 28, 7, dtype=np.uint32)).sum(-1, dtype=np.uint32) | (f["scale_codes"].astype(np.uint32) << 28)
        return {"d": write_half(f["d"]), "qs": f["codes"].reshape(n, -1),
                "scales_and_signs": np.ascontiguousarray(words.astype("<u4")).view(np.uint8).reshape(n, -1)}

    @staticmethod
    def level_scale(scale_codes, d):
        return (d[:, None] * (0.5 + scale_codes) * 0.5)[:, :, None]  # ggml: d * (0.5f + sc) * 0.5f


GRID_TYPES = (IQ3SBlocks, IQ3XXSBlocks)
