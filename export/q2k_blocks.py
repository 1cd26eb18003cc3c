"""llama.cpp's Q2_K blocks as arrays: the 2-bit codes, and the scales that may change around them.

A Q2_K super-block (ggml-common.h `block_q2_K`, 84 bytes for 256 weights) holds, in this order:
16 bytes of sub-block scales and mins (low nibble: scale code, high nibble: min code, one byte per
sub-block of 16 weights), 64 bytes of 2-bit codes, then the super-block scale `d` and `dmin` as
fp16. A weight is `d * scale_code * code - dmin * min_code` (ggml's dequantize_row_q2_K).

The codes are laid out for SIMD: byte l of the half n (32 bytes) holds, at bit shifts 0/2/4/6,
the codes of sub-blocks 8n + 2·shift_index + (l >= 16), position l % 16. `Q2KBlocks` unpacks them
into [blocks, 16 sub-blocks, 16] in weight order, so that dequantizing is one broadcast; `pack`
writes the same bytes back, so changing only the scales changes only the scale bytes.

Example:
    blocks = Q2KBlocks.from_bytes(raw_tensor_bytes)
    weights = blocks.dequantize().reshape(rows, columns)   # == gguf.quants.dequantize(raw, Q2_K)
    blocks.to_bytes() == raw_tensor_bytes                  # True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recover_lora.errors import RecoverLoraError

WEIGHTS_PER_BLOCK = 256
SUB_BLOCKS = 16
WEIGHTS_PER_SUB_BLOCK = 16
BLOCK_BYTES = 84  # 16 scale bytes + 64 code bytes + fp16 d + fp16 dmin
MAX_SCALE_CODE = 15  # 4-bit scale and min codes
_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)


@dataclass
class Q2KBlocks:
    """A Q2_K tensor's blocks; arrays indexed [block, sub-block(, position)] in weight order."""

    codes: np.ndarray  # uint8 [n, 16, 16], values 0..3
    scale_codes: np.ndarray  # uint8 [n, 16], 0..15
    min_codes: np.ndarray  # uint8 [n, 16], 0..15
    d: np.ndarray  # float16 [n]
    dmin: np.ndarray  # float16 [n]

    @property
    def n_blocks(self) -> int:
        return self.codes.shape[0]

    @classmethod
    def from_bytes(cls, raw: np.ndarray | bytes) -> "Q2KBlocks":
        data = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray)) else np.ascontiguousarray(raw).view(np.uint8)
        data = data.reshape(-1)
        if data.size % BLOCK_BYTES:
            raise RecoverLoraError(f"{data.size} bytes is not a whole number of Q2_K blocks ({BLOCK_BYTES} bytes each)")
        blocks = data.reshape(-1, BLOCK_BYTES)
        scales = blocks[:, :SUB_BLOCKS]
        qs = blocks[:, SUB_BLOCKS : SUB_BLOCKS + 64].reshape(-1, 2, 1, 32)  # [n, half, 1, byte]
        codes = (qs >> _SHIFTS[None, None, :, None]) & 3  # [n, half, shift, byte]
        codes = codes.reshape(-1, 2, 4, 2, 16).reshape(-1, SUB_BLOCKS, WEIGHTS_PER_SUB_BLOCK)
        d, dmin = blocks[:, 80:82].copy().view(np.float16)[:, 0], blocks[:, 82:84].copy().view(np.float16)[:, 0]
        return cls(codes=np.ascontiguousarray(codes), scale_codes=scales & 0xF, min_codes=scales >> 4, d=d, dmin=dmin)

    def to_bytes(self) -> np.ndarray:
        """The blocks as ggml stores them: uint8 [n, 84]."""
        n = self.n_blocks
        for name in ("scale_codes", "min_codes"):
            values = getattr(self, name)
            if values.max(initial=0) > MAX_SCALE_CODE:
                raise RecoverLoraError(f"Q2_K {name} must be 0..{MAX_SCALE_CODE}; got {int(values.max())}")
        out = np.empty((n, BLOCK_BYTES), dtype=np.uint8)
        out[:, :SUB_BLOCKS] = (self.min_codes.astype(np.uint8) << 4) | self.scale_codes.astype(np.uint8)
        codes = self.codes.astype(np.uint8).reshape(n, 2, 4, 32)  # [n, half, shift, byte]
        out[:, SUB_BLOCKS : SUB_BLOCKS + 64] = np.bitwise_or.reduce(codes << _SHIFTS[None, None, :, None], axis=2).reshape(n, 64)
        out[:, 80:82] = self.d.astype(np.float16).reshape(n, 1).view(np.uint8)
        out[:, 82:84] = self.dmin.astype(np.float16).reshape(n, 1).view(np.uint8)
        return out

    def sub_block_scales(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, min) per sub-block in float32, [n, 16]: weight = scale * code - min."""
        d, dmin = self.d.astype(np.float32)[:, None], self.dmin.astype(np.float32)[:, None]
        return d * self.scale_codes, dmin * self.min_codes

    def dequantize(self) -> np.ndarray:
        """float32 [n * 256], in ggml's weight order."""
        scale, minimum = self.sub_block_scales()
        return (scale[:, :, None] * self.codes - minimum[:, :, None]).reshape(-1)
