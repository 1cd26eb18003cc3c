"""What every ggml block type shares: its C struct as named byte members, checks, dequantize in numpy and torch.

A type (block32.py, k_quants.py) is a dataclass of plain numpy arrays in weight order, with
    codes        [n_blocks, SUB_BLOCKS, WEIGHTS_PER_SUB_BLOCK]
    scale_codes  [n_blocks, SUB_BLOCKS]  (and min_codes) where the type has sub-block scales
    d            [n_blocks]              (and dmin, or Q4_1/Q5_1's m) fp16 values held as float32
and a subclass supplies only its layout (`LAYOUT`: ggml-common.h's struct members and their sizes),
its field ranges (`FIELDS`), how members map to fields (`_unpack`/`_pack`) and ggml's formula.

The same conventions for every type:
- Integer fields hold the bits as ggml stores them: unsigned, with the offset ggml subtracts named
  `CODE_OFFSET` / `SCALE_OFFSET` (Q4_0's code 0..15 means code - 8). Q8_0's codes and Q6_K's scales
  are int8 in the struct and stay int8 here.
- `to_bytes` is strict: a value the bits cannot hold (a scale code of 16 in 4 bits, a d that is not an
  fp16 number) raises, since writing anything else would be a silent bug.
- `encode` is lenient where that is the caller's intent: integer fields (codes, scale and min codes)
  are rounded to nearest (ties to even, as ggml's nearest_int) and clamped into range, because a
  trained real value past the grid's edge means the edge (what a straight-through clamp trains
  against). It raises where clamping would hide a bug: NaN anywhere, or an fp16 field past ±65504,
  which would turn into inf (clamping a super-block scale would silently change every weight).
- `dequantize` (numpy) and `torch_dequantize` (torch) run one `_formula` per type, written with
  ggml's operations in ggml's order on float32, so both equal gguf.quants.dequantize bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from recover_lora.errors import RecoverLoraError

HALF_BYTES = 2  # sizeof(ggml_half); GGUF is little-endian, as numpy's float16 on every machine we run on
FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class IntField:
    """An integer field and the values its bits hold, as stored."""

    low: int
    high: int
    dtype: type = np.uint8


@dataclass(frozen=True)
class HalfField:
    """A ggml_half member (d, dmin, m), held as float32."""


HALF = HalfField()


def unpack_planes(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., L] -> [..., 8 // bits, L]: plane k holds bits k·bits .. k·bits + bits - 1 of every byte."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return (packed[..., None, :] >> shifts[:, None]) & np.uint8((1 << bits) - 1)


def pack_planes(planes: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of unpack_planes: [..., 8 // bits, L] (each value < 2**bits) -> uint8 [..., L]."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return np.bitwise_or.reduce(planes.astype(np.uint8) << shifts[:, None], axis=-2)


def read_half(member: np.ndarray) -> np.ndarray:
    """uint8 [n, 2] -> float32 [n]."""
    return np.ascontiguousarray(member).view(np.float16)[:, 0].astype(np.float32)


def write_half(values: np.ndarray) -> np.ndarray:
    """float32 [n] (fp16 values) -> uint8 [n, 2]."""
    return np.asarray(values, dtype=np.float32).astype(np.float16).reshape(-1, 1).view(np.uint8)


def as_numpy(values) -> np.ndarray:
    """numpy, or a torch tensor on any device (detached), as a numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


class GGMLBlocks:
    """The API every block type has; subclasses are dataclasses of the fields named in FIELDS."""

    GGML_TYPE: ClassVar[GGMLQuantizationType]
    SUB_BLOCKS: ClassVar[int]
    LAYOUT: ClassVar[tuple[tuple[str, int], ...]]  # ggml-common.h's struct members, in order: (name, bytes)
    FIELDS: ClassVar[dict[str, IntField | HalfField]]  # every dataclass field and what its bits hold
    CODE_OFFSET: ClassVar[int] = 0  # ggml's weight uses code - CODE_OFFSET
    # From gguf-py (GGML_QUANT_SIZES = ggml's block size and sizeof(block_*)), set for each subclass:
    WEIGHTS_PER_BLOCK: ClassVar[int]
    BLOCK_BYTES: ClassVar[int]
    WEIGHTS_PER_SUB_BLOCK: ClassVar[int]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not hasattr(cls, "GGML_TYPE"):  # a family's shared base (codebook.CodebookBlocks), not a type
            return
        cls.WEIGHTS_PER_BLOCK, cls.BLOCK_BYTES = GGML_QUANT_SIZES[cls.GGML_TYPE]
        cls.WEIGHTS_PER_SUB_BLOCK = cls.WEIGHTS_PER_BLOCK // cls.SUB_BLOCKS
        layout_bytes = sum(size for _, size in cls.LAYOUT)
        assert layout_bytes == cls.BLOCK_BYTES, f"{cls.__name__}: layout of {layout_bytes} bytes, ggml's block has {cls.BLOCK_BYTES}"

    # -- what a type supplies --------------------------------------------------------------------
    @classmethod
    def _unpack(cls, members: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Struct members (uint8 [n, size]) -> dataclass fields."""
        raise NotImplementedError

    def _pack(self, fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Checked fields (in their storage dtypes) -> struct members (uint8 [n, size])."""
        raise NotImplementedError

    @staticmethod
    def _formula(**fields):
        """ggml's dequantize_row_* on float32 fields, numpy arrays or torch tensors alike -> [n, S, W]."""
        raise NotImplementedError

    def sub_block_scales(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, min) per sub-block, float32 [n, SUB_BLOCKS]: weight ≈ scale · code - min (code as stored).

        Exact for Q2_K/Q4_K/Q5_K (ggml computes just that); for the others the offset folded into
        `min` may round the last bit differently from `dequantize`. Used to fit codes to weights.
        """
        raise NotImplementedError

    # -- the shared API ------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return self.codes.shape[0]

    @classmethod
    def from_bytes(cls, raw: np.ndarray | bytes):
        """A tensor's raw bytes (GGUFReader's `tensor.data`, any shape, or bytes) -> its blocks."""
        if isinstance(raw, (bytes, bytearray, memoryview)):
            data = np.frombuffer(raw, dtype=np.uint8)
        else:
            data = np.ascontiguousarray(raw).view(np.uint8)
        data = data.reshape(-1)
        name = cls.GGML_TYPE.name
        if data.size % cls.BLOCK_BYTES:
            raise RecoverLoraError(f"{data.size} bytes is not a whole number of {name} blocks ({cls.BLOCK_BYTES} bytes each); "
                                   f"pass the tensor's raw bytes (GGUFReader's tensor.data)")
        blocks, members, start = data.reshape(-1, cls.BLOCK_BYTES), {}, 0
        for member, size in cls.LAYOUT:
            members[member] = blocks[:, start : start + size]
            start += size
        # Copies, never views of `raw`: changing a field must not write into the tensor it came from.
        return cls(**{name: np.array(values) for name, values in cls._unpack(members).items()})

    def to_bytes(self) -> np.ndarray:
        """The blocks as ggml stores them: uint8 [n_blocks, BLOCK_BYTES]. Raises on a value the bits cannot hold."""
        members = self._pack(self.checked_fields())
        n = self.n_blocks
        return np.concatenate([np.asarray(members[m], dtype=np.uint8).reshape(n, size) for m, size in self.LAYOUT], axis=1)

    def checked_fields(self) -> dict[str, np.ndarray]:
        """Every field in its storage dtype, after checking its shape and that its bits can hold it."""
        n, out = self.n_blocks, {}
        kind = self.GGML_TYPE.name
        for name, spec in self.FIELDS.items():
            values = np.asarray(getattr(self, name))
            shape = self._field_shape(name, n)
            if values.shape != shape:
                raise RecoverLoraError(f"{kind} {name} has shape {values.shape}; {n} blocks need {shape}")
            if isinstance(spec, HalfField):
                as_float = values.astype(np.float32)
                if not np.array_equal(as_float.astype(np.float16).astype(np.float32), as_float, equal_nan=True):
                    raise RecoverLoraError(f"{kind} {name} must hold fp16 values; round them with {type(self).__name__}.encode")
                out[name] = as_float
                continue
            bad = (values < spec.low) | (values > spec.high)
            if values.dtype.kind == "f":
                bad |= np.rint(values) != values  # also catches NaN
            if bad.any():
                raise RecoverLoraError(f"{kind} {name} must be {spec.low}..{spec.high} integers; got {values[bad].flat[0]} "
                                       f"(round and clamp with {type(self).__name__}.encode)")
            out[name] = values.astype(spec.dtype)
        return out

    def dequantize(self) -> np.ndarray:
        """float32 [n_blocks · WEIGHTS_PER_BLOCK] in ggml's weight order: == gguf.quants.dequantize(raw, type)."""
        fields = {name: np.asarray(getattr(self, name), dtype=np.float32) for name in self.FIELDS}
        return self._formula(**fields).reshape(-1)

    def to_torch(self, device=None) -> dict:
        """Every field as a float32 torch tensor, keyed as torch_dequantize takes them."""
        import torch

        return {name: torch.as_tensor(np.asarray(getattr(self, name), dtype=np.float32), device=device) for name in self.FIELDS}

    @classmethod
    def torch_dequantize(cls, **fields):
        """The weights from float32 torch tensors of every field: [n_blocks · WEIGHTS_PER_BLOCK], differentiable.

        Same operations in the same order as `dequantize` (ggml's), so with the stored values it is
        bit-identical; put a straight-through or learned rounding on the codes and scale codes
        upstream. Example: `Q4KBlocks.torch_dequantize(**blocks.to_torch())`.
        """
        if set(fields) != set(cls.FIELDS):
            raise RecoverLoraError(f"{cls.__name__}.torch_dequantize takes {', '.join(cls.FIELDS)}; got {', '.join(fields)}")
        return cls._formula(**fields).reshape(-1)

    @classmethod
    def encode(cls, *, weights=None, codes=None, **fields):
        """Valid blocks from chosen values (numpy or torch): integer fields rounded and clamped, fp16 fields rounded.

        Args:
            weights: the float weights (n_blocks · WEIGHTS_PER_BLOCK, any shape, ggml's order); the
                codes are fitted to them, nearest under the given scales. Give this or `codes`.
            codes: the chosen codes, as stored (e.g. 0..15 for Q4_0), real values allowed.
            **fields: every other field of the type (scale_codes, min_codes, d, dmin, m; an IQ grid type's signs).
        Example:
            Q2KBlocks.encode(weights=w, scale_codes=sc, min_codes=mc, d=d, dmin=dmin).to_bytes()
        """
        others = [name for name in cls.FIELDS if name != "codes"]
        if set(fields) != set(others) or (weights is None) == (codes is None):
            raise RecoverLoraError(f"{cls.__name__}.encode takes weights or codes, and {', '.join(others)}; got {', '.join(fields)}")
        n = as_numpy(fields["d"]).size
        values = {name: cls._encode_field(name, as_numpy(fields[name]), n) for name in others}
        if codes is None:
            shape = (n, cls.SUB_BLOCKS, cls.WEIGHTS_PER_SUB_BLOCK)
            weights = as_numpy(weights).astype(np.float32)
            if weights.size != np.prod(shape):
                raise RecoverLoraError(f"{weights.size} weights for {n} {cls.GGML_TYPE.name} blocks of {cls.WEIGHTS_PER_BLOCK}")
            blank = cls(codes=np.zeros(cls._field_shape("codes", n), np.uint8), **values)
            codes = blank._fit_codes(weights.reshape(shape))
        values["codes"] = cls._encode_field("codes", as_numpy(codes), n)
        return cls(**values)

    def _fit_codes(self, weights: np.ndarray) -> np.ndarray:
        """Real-valued codes nearest to `weights` [n, S, W] under these scales (encode rounds and clamps them)."""
        scale, minimum = self.sub_block_scales()
        scale, minimum = scale[..., None], minimum[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = (weights + minimum) / scale
        # A sub-block of scale 0 holds the same weight whatever its codes: take the code of value 0.
        return np.where(scale == 0, self.CODE_OFFSET, codes)

    @classmethod
    def _field_shape(cls, name: str, n: int) -> tuple[int, ...]:
        if name == "codes":
            return (n, cls.SUB_BLOCKS, cls.WEIGHTS_PER_SUB_BLOCK)
        return (n,) if isinstance(cls.FIELDS[name], HalfField) else (n, cls.SUB_BLOCKS)

    @classmethod
    def _encode_field(cls, name: str, values: np.ndarray, n: int) -> np.ndarray:
        spec, shape, kind = cls.FIELDS[name], cls._field_shape(name, n), cls.GGML_TYPE.name
        if values.size != np.prod(shape):
            raise RecoverLoraError(f"{kind} {name} has {values.size} values; {n} blocks need {shape}")
        values = values.reshape(shape).astype(np.float32 if isinstance(spec, HalfField) else np.float64)
        if np.isnan(values).any():
            raise RecoverLoraError(f"{kind} {name} holds NaN; fix the values (a diverged fit?) before encoding")
        if isinstance(spec, HalfField):
            with np.errstate(over="ignore"):
                half = values.astype(np.float16)  # round to nearest even, as GGML_FP32_TO_FP16
            if not np.isfinite(half).all():
                raise RecoverLoraError(f"{kind} {name} reaches {float(np.abs(values).max()):g}, past fp16's ±{FP16_MAX:g}; "
                                       f"rescale it (clamping it would change every weight of the block)")
            return half.astype(np.float32)
        return np.clip(np.rint(values), spec.low, spec.high).astype(spec.dtype)
