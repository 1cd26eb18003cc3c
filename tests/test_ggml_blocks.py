"""ggml block formats as arrays (export/ggml_blocks): llama.cpp's own quantizer and gguf-py as the oracles, exact bytes.

Raw bytes come from llama.cpp's quantizer (ggml_quantize_chunk, what GGUF files hold), with and without
importance weights (two code paths in ggml), and from gguf-py's numpy quantizer where it has one.
Torch's dequantize is asserted bit-equal, not within an ulp: it runs the same float32 operations in the
same order as gguf-py's (ggml's), each one correctly rounded, so there is nothing to differ.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from recover_lora.errors import RecoverLoraError
from recover_lora.export.ggml_blocks import BLOCK_TYPES, CodebookBlocks, GridBlocks, HalfField, Q2KBlocks, blocks_for, from_bytes
from recover_lora.export.ggml_quantize import quantize_rows

T = gguf.GGMLQuantizationType
TYPES = list(BLOCK_TYPES)
WIDTH = 2 * gguf.QK_K


def weight_rows() -> np.ndarray:
    """Rows of 512 with what trips quantizers: an all-zero row and super-block, outliers, fp16-subnormal scales, a constant block."""
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((7, WIDTH)).astype(np.float32)
    rows[1] = 0.0
    rows[2, : gguf.QK_K] = 0.0
    rows[3, [5, 300, 511]] = [1e4, -3e3, 2e3]  # large-magnitude outliers, kept inside fp16 for d
    rows[4] *= 1e-5  # scales fall to fp16 subnormals
    rows[5] = rng.laplace(size=WIDTH) * np.repeat(rng.uniform(0.01, 3, WIDTH // 32), 32)
    rows[6, :64] = 0.5  # constant blocks: d = 0 for the min-plus-scale types
    return rows


ROWS = weight_rows()
IMPORTANCE = np.random.default_rng(3).uniform(0.1, 2.0, WIDTH).astype(np.float32)


def raw_sources(ggml_type) -> list[np.ndarray]:
    sources = [quantize_rows(ROWS, ggml_type, threads=1), quantize_rows(ROWS, ggml_type, IMPORTANCE, threads=1)]
    try:
        sources.append(gguf.quants.quantize(ROWS, ggml_type))
    except NotImplementedError:  # gguf-py only dequantizes the K-quants, IQ4_NL and IQ4_XS
        pass
    return sources


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_unpack_pack_is_identity_and_dequantize_is_gguf_pys(ggml_type):
    cls = blocks_for(ggml_type)
    for raw in raw_sources(ggml_type):
        blocks = from_bytes(raw, ggml_type)
        assert type(blocks) is cls and blocks.n_blocks == raw.size // cls.BLOCK_BYTES
        assert blocks.codes.shape == cls._field_shape("codes", blocks.n_blocks)  # an IQ grid type: a code per group of weights
        np.testing.assert_array_equal(blocks.to_bytes().reshape(raw.shape), raw)
        expected = gguf.quants.dequantize(raw, ggml_type).reshape(-1)
        np.testing.assert_array_equal(blocks.dequantize(), expected)
        assert torch.equal(cls.torch_dequantize(**blocks.to_torch()), torch.from_numpy(expected))
        # bytes and a flat buffer read the same
        np.testing.assert_array_equal(cls.from_bytes(raw.tobytes()).to_bytes().reshape(raw.shape), raw)
    # The fields are copies: a read-only tensor (GGUFReader's memmap) can be read, and edits stay out of it.
    raw.setflags(write=False)
    blocks, kept = cls.from_bytes(raw), raw.copy()
    for name in cls.FIELDS:
        getattr(blocks, name)[...] = 0
    np.testing.assert_array_equal(raw, kept)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_any_bit_pattern_round_trips(ggml_type):
    """Random bytes reach values no quantizer writes (Q8_0's -128, negative K-quant d, any hmask); fp16 fields finite."""
    cls = blocks_for(ggml_type)
    raw = np.random.default_rng(int(ggml_type)).integers(0, 256, (40, cls.BLOCK_BYTES), dtype=np.uint8)
    start = 0
    for member, size in cls.LAYOUT:
        if isinstance(cls.FIELDS.get(member), HalfField):
            raw[:, start + 1] &= 0b1011_1011  # exponent below 31: no inf/NaN
        start += size
    blocks = cls.from_bytes(raw)
    np.testing.assert_array_equal(blocks.to_bytes(), raw)
    expected = gguf.quants.dequantize(raw, ggml_type).reshape(-1)
    np.testing.assert_array_equal(blocks.dequantize(), expected)
    assert torch.equal(cls.torch_dequantize(**blocks.to_torch()), torch.from_numpy(expected))


def scale_bytes(ggml_type, field: str, s: int) -> set[int]:
    """Bytes of one block that hold sub-block s's `field`, read off ggml-common.h (an oracle independent of the code)."""
    if ggml_type == T.Q2_K:
        return {s}  # scales[s]: scale low nibble, min high nibble
    if ggml_type == T.Q3_K:
        return {96 + s % 8, 104 + s % 4}  # scales[12] after hmask[32] and qs[64]
    if ggml_type in (T.Q4_K, T.Q5_K):  # scales[12] after d and dmin; get_scale_min_k4
        if field == "scale_codes":
            return {4 + s} if s < 4 else {4 + s + 4, 4 + s - 4}
        return {4 + s + 4} if s < 4 else {4 + s + 4, 4 + s}
    if ggml_type == T.Q6_K:
        return {192 + s}  # scales[16] after ql[128] and qh[64]
    if ggml_type == T.IQ4_XS:
        if field == "d":
            return {0, 1}
        return {2 + s // 4, 4 + s // 2}  # scales_h (uint16, 2 bits per sub-block), then scales_l[4] (a nibble each)
    if ggml_type == T.IQ3_S:
        if field == "d":
            return {0, 1}
        return {2 + 64 + 8 + 32 + s // 2}  # scales[4] (a nibble each) after d, qs[64], qh[8] and signs[32]
    if ggml_type == T.IQ3_XXS:
        if field == "d":
            return {0, 1}
        return {2 + 64 + 4 * s + 3}  # the top byte of sub-block s's little-endian uint32 after d and the 64 grid indices
    return {0, 1} if field == "d" else {2, 3}  # 32-weight types: d, then Q4_1/Q5_1's m


def changed_value(spec, old):
    if isinstance(spec, HalfField):
        return np.float32(np.float16(old * 1.5 if old != 0 else 1.0))
    return old + 1 if old < spec.high else old - 1


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_changing_one_scale_changes_only_its_bytes_and_its_weights(ggml_type):
    cls = blocks_for(ggml_type)
    raw = quantize_rows(ROWS, ggml_type, threads=1).reshape(-1, cls.BLOCK_BYTES)
    base = cls.from_bytes(raw)
    before = gguf.quants.dequantize(raw, ggml_type).reshape(base.n_blocks, cls.SUB_BLOCKS, -1)
    block = 1  # row 0, the second block: plain random weights
    fields = [f for f in ("scale_codes", "min_codes") if f in cls.FIELDS] or [f for f in ("d", "m") if f in cls.FIELDS]
    for field in fields:
        for s in range(cls.SUB_BLOCKS if field.endswith("codes") else 1):
            blocks = cls.from_bytes(raw)
            values = getattr(blocks, field)
            index = (block, s) if field.endswith("codes") else (block,)
            values[index] = changed_value(cls.FIELDS[field], values[index])
            packed = blocks.to_bytes()
            changed = {int(i) for i in np.flatnonzero(packed != raw)}
            assert changed and changed <= {block * cls.BLOCK_BYTES + b for b in scale_bytes(ggml_type, field, s)}, (field, s, changed)
            after = gguf.quants.dequantize(packed, ggml_type).reshape(before.shape)
            np.testing.assert_array_equal(after.reshape(-1), blocks.dequantize())
            moved = np.argwhere(after != before)
            assert len(moved) and (moved[:, 0] == block).all(), (field, s)
            if field.endswith("codes"):
                assert (moved[:, 1] == s).all(), (field, s)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_encode_fits_codes_to_weights_and_clamps_integer_fields(ggml_type):
    cls = blocks_for(ggml_type)
    raw = quantize_rows(ROWS, ggml_type, IMPORTANCE, threads=1)
    blocks = cls.from_bytes(raw)
    others = {name: getattr(blocks, name) for name in cls.FIELDS if name != "codes"}
    # The codes fitted to the weights they dequantize to are those weights again (and the same codes
    # wherever the sub-block's scale is not 0, when every code gives the same weight).
    fitted = cls.encode(weights=torch.from_numpy(blocks.dequantize()), **others)
    np.testing.assert_array_equal(fitted.dequantize(), blocks.dequantize())
    np.testing.assert_array_equal(fitted.to_bytes().shape, raw.reshape(-1, cls.BLOCK_BYTES).shape)
    if issubclass(cls, (CodebookBlocks, GridBlocks)):
        live = np.broadcast_to(blocks.scale_values() != 0, blocks.codes.shape)
    else:
        live = np.broadcast_to((blocks.sub_block_scales()[0] != 0)[:, :, None], blocks.codes.shape)
    np.testing.assert_array_equal(fitted.codes[live], blocks.codes[live])
    # Real-valued trained values: rounded to nearest, clamped to the field; d rounded to fp16.
    low, high = cls.FIELDS["codes"].low, cls.FIELDS["codes"].high
    wild = blocks.codes.astype(np.float32) + np.random.default_rng(0).uniform(-0.4, 0.4, blocks.codes.shape)
    wild[0, 0, :3] = [high + 7.3, low - 5.0, high + 0.6]
    encoded = cls.encode(codes=wild, **{**others, "d": np.asarray(blocks.d) * np.float32(1.0001)})
    assert encoded.codes.dtype == blocks.codes.dtype and list(encoded.codes[0, 0, :3]) == [high, low, high]
    np.testing.assert_array_equal(encoded.codes.reshape(-1)[3:], blocks.codes.reshape(-1)[3:])
    np.testing.assert_array_equal(encoded.d, (np.asarray(blocks.d, np.float32) * np.float32(1.0001)).astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(cls.from_bytes(encoded.to_bytes()).codes, encoded.codes)
    # ...but a value the bits cannot hold fails: NaN, or a super-block scale past fp16.
    with pytest.raises(RecoverLoraError, match="past fp16"):
        cls.encode(codes=blocks.codes, **{**others, "d": np.full(blocks.n_blocks, 1e6, np.float32)})
    with pytest.raises(RecoverLoraError, match="NaN"):
        cls.encode(codes=np.full(blocks.codes.shape, np.nan), **others)
    with pytest.raises(RecoverLoraError, match="encode takes"):
        cls.encode(weights=blocks.dequantize(), codes=blocks.codes, **others)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_to_bytes_refuses_values_its_bits_cannot_hold(ggml_type):
    cls = blocks_for(ggml_type)
    blocks = cls.from_bytes(quantize_rows(ROWS[:1], ggml_type, threads=1))
    spec = cls.FIELDS["codes"]
    blocks.codes = blocks.codes.astype(np.int32)
    blocks.codes[0, 0, 0] = spec.high + 1
    with pytest.raises(RecoverLoraError, match=rf"{ggml_type.name} codes must be {spec.low}\.\.{spec.high} integers") as error:
        blocks.to_bytes()
    assert "\n" not in str(error.value)
    blocks.codes[0, 0, 0] = spec.low
    blocks.d = np.asarray(blocks.d, np.float32).copy()
    blocks.d[0] = 0.1  # between two fp16 numbers
    with pytest.raises(RecoverLoraError, match="must hold fp16 values"):
        blocks.to_bytes()


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_torch_dequantize_is_differentiable_in_the_float_fields(ggml_type):
    cls = blocks_for(ggml_type)
    blocks = cls.from_bytes(quantize_rows(ROWS[:1], ggml_type, threads=1))
    fields = {name: value.requires_grad_(True) for name, value in blocks.to_torch().items()}
    (cls.torch_dequantize(**fields) ** 2).sum().backward()
    for name, value in fields.items():
        if name == "codes" and issubclass(cls, (CodebookBlocks, GridBlocks)):
            assert value.grad is None  # codebook indices and grid points: a lookup has no gradient
            continue
        assert value.grad is not None and torch.isfinite(value.grad).all() and value.grad.abs().sum() > 0, name


def test_unsupported_types_and_bad_sizes_are_one_line_errors():
    for bad in (T.F16, T.IQ2_XXS, 999, "NOPE"):
        with pytest.raises(RecoverLoraError, match=r"no block format for ggml type .*; supported: Q4_0, .*Q6_K") as error:
            blocks_for(bad)
        assert "\n" not in str(error.value)
    with pytest.raises(RecoverLoraError, match="IQ2_XXS"):
        from_bytes(np.zeros(66, np.uint8), T.IQ2_XXS)
    with pytest.raises(RecoverLoraError, match="85 bytes is not a whole number of Q2_K blocks"):
        from_bytes(np.zeros(85, np.uint8), "Q2_K")
    assert blocks_for(int(T.Q5_K)) is blocks_for("Q5_K") is BLOCK_TYPES[T.Q5_K]


def test_q2k_keeps_the_constants_its_users_read():
    assert (Q2KBlocks.SUB_BLOCKS, Q2KBlocks.WEIGHTS_PER_SUB_BLOCK, Q2KBlocks.WEIGHTS_PER_BLOCK) == (16, 16, 256)
    assert (Q2KBlocks.BLOCK_BYTES, Q2KBlocks.MAX_CODE, Q2KBlocks.MAX_SCALE_CODE) == (84, 3, 15)
    blocks = Q2KBlocks.from_bytes(quantize_rows(ROWS[:1], T.Q2_K, threads=1))
    scale, minimum = blocks.sub_block_scales()
    np.testing.assert_array_equal((scale[:, :, None] * blocks.codes - minimum[:, :, None]).reshape(-1), blocks.dequantize())


GRIDS = [(T.IQ3_S, 512, {1, 3, 5, 7, 9, 11, 13, 15}), (T.IQ3_XXS, 256, {4, 12, 20, 28, 36, 44, 52, 62})]


@pytest.mark.parametrize("ggml_type,points,levels", GRIDS, ids=[g[0].name for g in GRIDS])
def test_grid_codes_are_the_nearest_grid_points_of_their_groups(ggml_type, points, levels):
    """nearest_grid_points compares each group with the grid points nearest its rounded levels: a grid point is its own
    nearest, and random magnitudes get the brute-force nearest point (over the whole grid) almost always, never far from it."""
    from recover_lora.export.ggml_blocks.iq_grid import nearest_grid_points

    cls = blocks_for(ggml_type)
    grid = torch.from_numpy(cls.GRID)
    assert grid.shape == (points, 4) and set(np.unique(cls.GRID)) == levels
    assert torch.equal(nearest_grid_points(grid, cls), torch.arange(points))
    magnitudes = torch.from_numpy(np.random.default_rng(0).uniform(0, max(levels) + 2, (20_000, 4)).astype(np.float32))
    chosen = nearest_grid_points(magnitudes, cls)
    distances = ((magnitudes[:, None, :] - grid[None]) ** 2).sum(-1)
    excess = distances.gather(1, chosen[:, None]).squeeze(1) - distances.min(-1).values
    assert (excess == 0).float().mean() > 0.999 and excess.max() < cls.LEVEL_STEP ** 2  # within one level step of the nearest


def test_iq3_xxs_stores_seven_signs_of_eight_and_refuses_an_odd_number_of_negatives():
    """The 8th sign of each 8 weights is implied (ggml's ksigns: an even number of negatives); even_sign_parity makes
    chosen signs storable by flipping the smallest magnitude of an odd group, and nothing else."""
    from recover_lora.export.ggml_blocks.iq_grid import even_sign_parity

    cls = blocks_for(T.IQ3_XXS)
    blocks = cls.from_bytes(quantize_rows(ROWS[:1], T.IQ3_XXS, threads=1))
    assert (blocks.signs.reshape(-1, 8).sum(-1) % 2 == 0).all()
    blocks.signs = blocks.signs.copy()
    blocks.signs[0, 0, 3] ^= 1
    with pytest.raises(RecoverLoraError, match="even number of negatives in each 8") as error:
        blocks.to_bytes()
    assert "\n" not in str(error.value)
    signs = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    magnitudes = torch.tensor([[5, 3, 9, 1, 4, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.float32)
    fixed = even_sign_parity(signs, magnitudes, 8)
    assert fixed.tolist() == [[1, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]]  # the first 8's smallest (1 at 3) flips
    blocks.signs[0, 0, :8] = fixed[0, :8].numpy()
    assert cls.from_bytes(blocks.to_bytes()).signs[0, 0, :8].tolist() == fixed[0, :8].tolist()
