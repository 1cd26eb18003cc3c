"""A fast GGUF header reader: metadata and tensor table in milliseconds, whatever the vocabulary.

gguf-py's `GGUFReader` builds a numpy view for every element of every metadata array when it
opens a file, so a 152k–262k-token vocabulary (tokens, types, scores, merges) costs 15–50 s before
anything else — also before a truncated file or an unsupported architecture could be refused.
This reader walks the same layout (ggml/src/gguf.cpp; gguf-py's gguf_reader.py) with `struct` over
an mmap: numeric arrays are stepped over by size, string arrays by their length prefixes, and a
value is decoded only when asked for (then cached). Every tensor must lie inside the file, so a
truncated file is refused at open, in one line.

`GGUFHeader` answers what the rest of recover-lora asks of a `GGUFReader`: `fields` (key -> field,
in file order, with GGUFReader's `GGUF.version` / `GGUF.tensor_count` / `GGUF.kv_count` first),
`get_field(key).contents()`, and `tensors[i]` with `.name .tensor_type .shape .n_elements .n_bytes
.data_offset .data` — `.data` a numpy memmap slice shaped exactly like GGUFReader's, ready for
`gguf.quants.dequantize`.

Example:
    header = read_gguf_header("smollm2.gateup.gguf")
    header.get_field("general.architecture").contents()    # 'llama'
    [t.name for t in header.tensors][:2]                     # ['token_embd.weight', 'blk.0.attn_norm.weight']
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from recover_lora.errors import RecoverLoraError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # as gguf-py's READER_SUPPORTED_VERSIONS
# Sanity bounds against corrupt lengths (ggml/src/gguf.cpp's GGUF_MAX_* limits).
MAX_STRING_BYTES = 1 << 30
MAX_ARRAY_ELEMENTS = 1 << 30
GGML_MAX_DIMS = 4  # ggml.h (gguf-py 0.19 does not export it)
# Numpy element types GGUFReader gives unquantized tensors; every other type is raw bytes.
PLAIN_TENSOR_DTYPES = {
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class _Corrupt(Exception):
    """Internal: the bytes are not a valid GGUF (the reason becomes part of a RecoverLoraError)."""


@dataclass(eq=False)
class HeaderField:
    """One metadata key: where its value lies and how to decode it (on demand, then cached).

    `types` follows GGUFReader: [STRING], [UINT32], ..., or [ARRAY, element type] ([ARRAY] if empty).
    """

    offset: int  # where the key/value pair starts in the file
    name: str
    types: list[GGUFValueType]
    value_offset: int  # for arrays: the first element
    count: int = 1  # number of array elements
    _header: "GGUFHeader | None" = field(default=None, repr=False)
    _value: Any = field(default=None, repr=False)
    _decoded: bool = field(default=False, repr=False)

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        """The value as GGUFReader's `ReaderField.contents()` gives it (str, int, float, bool, list)."""
        if not self._decoded:
            try:
                self._value = self._header._decode(self)
            except _Corrupt as e:
                raise RecoverLoraError(f"{self._header.path} is damaged ({e}); re-export or re-download it") from None
            self._decoded = True
        if self.types[0] == GGUFValueType.ARRAY:
            return self._value[index_or_slice]
        return self._value


@dataclass(eq=False)
class HeaderTensor:
    """One tensor-table entry; `shape` is in ggml order (ne[0] first) as GGUFReader's."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # uint64, ggml order
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in bytes from the start of the file
    _header: "GGUFHeader" = field(repr=False)

    @property
    def data(self) -> np.ndarray:
        """The tensor's bytes as a read-only memmap slice, shaped and typed like GGUFReader's `.data`."""
        return self._header._tensor_data(self)


class GGUFHeader:
    """A GGUF file's metadata and tensor table; see the module docstring. Open with `read_gguf_header`."""

    def __init__(self, path: Path, buffer: mmap.mmap | bytes):
        self.path = path
        self._buffer = buffer
        self._memmap: np.memmap | None = None
        self.file_bytes = len(buffer)
        self.fields: dict[str, HeaderField] = {}
        self.tensors: list[HeaderTensor] = []
        self.alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        self._parse()

    def get_field(self, key: str) -> HeaderField | None:
        return self.fields.get(key)

    # ----------------------------------------------------------------------------------------
    # Parsing: header, key/value pairs (arrays skipped), tensor infos, bounds of tensor data.

    def _unpack(self, fmt: str, offset: int) -> tuple:
        try:
            return struct.unpack_from(self._order + fmt, self._buffer, offset)
        except struct.error:
            raise _Corrupt(f"the header runs past the end of the file ({self.file_bytes:,} bytes)") from None

    def _read_string(self, offset: int, what: str) -> tuple[str, int]:
        (length,) = self._unpack("Q", offset)
        end = offset + 8 + length
        if length > MAX_STRING_BYTES or end > self.file_bytes:
            raise _Corrupt(
                f"{what} of {length:,} bytes at offset {offset:,} runs past the end of the file ({self.file_bytes:,} bytes)"
            )
        try:
            return bytes(self._buffer[offset + 8 : end]).decode("utf-8"), end
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} at offset {offset:,} is not UTF-8") from None

    def _scalar_dtype(self, value_type: GGUFValueType) -> np.dtype:
        # GGUFReader's own table of scalar types; '<' or '>' as the file's byte order.
        return np.dtype(gguf.GGUFReader.gguf_scalar_to_np[value_type]).newbyteorder(self._order)

    def _skip_value(self, offset: int, value_type: GGUFValueType, key: str) -> int:
        """Offset just past a value, reading only string lengths (the cheap walk over a vocabulary)."""
        if value_type == GGUFValueType.STRING:
            (length,) = self._unpack("Q", offset)
            return offset + 8 + length
        if value_type in gguf.GGUFReader.gguf_scalar_to_np:
            return offset + self._scalar_dtype(value_type).itemsize
        raise _Corrupt(f"key {key!r} has value type {int(value_type)}, which GGUF does not define here")

    def _parse(self) -> None:
        if bytes(self._buffer[:4]) != GGUF_MAGIC:
            raise _Corrupt("bad magic")  # replaced by a clearer message in read_gguf_header
        self._order = "<"
        (version,) = self._unpack("I", 4)
        if version & 0xFFFF == 0:  # written for the other byte order (gguf-py's test)
            self._order = ">"
            (version,) = self._unpack("I", 4)
        if version not in SUPPORTED_VERSIONS:
            raise _Corrupt(f"GGUF version {version} is not supported (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        tensor_count, kv_count = self._unpack("QQ", 8)
        if tensor_count > MAX_ARRAY_ELEMENTS or kv_count > MAX_ARRAY_ELEMENTS:
            raise _Corrupt(f"implausible counts: {tensor_count:,} tensors, {kv_count:,} metadata keys")
        # The same pseudo-fields GGUFReader puts first.
        for name, value_type, offset in (
            ("GGUF.version", GGUFValueType.UINT32, 4),
            ("GGUF.tensor_count", GGUFValueType.UINT64, 8),
            ("GGUF.kv_count", GGUFValueType.UINT64, 16),
        ):
            self.fields[name] = HeaderField(offset, name, [value_type], offset, _header=self)
        offset = 24
        for _ in range(kv_count):
            offset = self._parse_kv(offset)
        offset = self._parse_tensor_infos(offset, tensor_count)
        alignment = self.fields.get("general.alignment")
        if alignment is not None:
            if alignment.types != [GGUFValueType.UINT32]:
                raise _Corrupt("general.alignment is not a uint32")
            self.alignment = int(alignment.contents())
            if self.alignment == 0 or self.alignment & (self.alignment - 1):
                raise _Corrupt(f"general.alignment {self.alignment} is not a power of two")
        self.data_offset = offset + (-offset % self.alignment)
        self._place_tensors()

    def _parse_kv(self, offset: int) -> int:
        start = offset
        key, offset = self._read_string(offset, "a metadata key")
        if key in self.fields:
            raise _Corrupt(f"duplicate metadata key {key!r}")
        (raw_type,) = self._unpack("I", offset)
        offset += 4
        value_type = self._value_type(raw_type, key)
        if value_type != GGUFValueType.ARRAY:
            self.fields[key] = HeaderField(start, key, [value_type], offset, _header=self)
            return self._check_end(self._skip_value(offset, value_type, key), key)
        raw_item_type, count = self._unpack("IQ", offset)
        offset += 12
        item_type = self._value_type(raw_item_type, key)
        if item_type == GGUFValueType.ARRAY:
            raise _Corrupt(f"key {key!r} is an array of arrays, which llama.cpp does not read")
        if count > MAX_ARRAY_ELEMENTS:
            raise _Corrupt(f"key {key!r} claims {count:,} array elements")
        types = [GGUFValueType.ARRAY] + ([item_type] if count else [])
        self.fields[key] = HeaderField(start, key, types, offset, count, _header=self)
        if item_type == GGUFValueType.STRING:
            unpack_length = struct.Struct(self._order + "Q").unpack_from
            buffer, last_length_offset = self._buffer, self.file_bytes - 8
            for _ in range(count):  # only the lengths are read: tens of ms for 262k tokens
                if offset > last_length_offset:
                    break
                offset += 8 + unpack_length(buffer, offset)[0]
            else:
                if offset <= self.file_bytes:
                    return offset
            raise _Corrupt(f"the string array {key!r} runs past the end of the file ({self.file_bytes:,} bytes)")
        return self._check_end(offset + count * self._scalar_dtype(item_type).itemsize, key)

    def _check_end(self, offset: int, key: str) -> int:
        if offset > self.file_bytes:
            raise _Corrupt(f"the value of {key!r} runs past the end of the file ({self.file_bytes:,} bytes)")
        return offset

    @staticmethod
    def _value_type(raw: int, key: str) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise _Corrupt(f"key {key!r} has unknown value type {raw}") from None

    def _parse_tensor_infos(self, offset: int, count: int) -> int:
        self._tensor_infos = []
        seen = set()
        for index in range(count):
            name, offset = self._read_string(offset, f"the name of tensor {index}")
            if name in seen:
                raise _Corrupt(f"duplicate tensor name {name!r}")
            seen.add(name)
            (n_dims,) = self._unpack("I", offset)
            if n_dims > GGML_MAX_DIMS:
                raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
            dims = self._unpack("Q" * n_dims, offset + 4)
            raw_type, relative_offset = self._unpack("IQ", offset + 4 + 8 * n_dims)
            offset += 4 + 8 * n_dims + 12
            try:
                ggml_type = GGMLQuantizationType(raw_type)
            except ValueError:
                raise _Corrupt(f"tensor {name!r} has ggml type {raw_type}, unknown to this gguf-py (newer llama.cpp?)") from None
            self._tensor_infos.append((name, ggml_type, dims, relative_offset))
        return offset

    def _place_tensors(self) -> None:
        for name, ggml_type, dims, relative_offset in self._tensor_infos:
            n_elements = 1
            for dim in dims:
                n_elements *= int(dim)
            block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
            if dims and dims[0] % block_size:
                raise _Corrupt(
                    f"tensor {name!r} has rows of {dims[0]}, not a multiple of {ggml_type.name}'s block of {block_size}"
                )
            n_bytes = n_elements * type_size // block_size
            start = self.data_offset + relative_offset
            if start + n_bytes > self.file_bytes:
                raise _Corrupt(
                    f"tensor {name!r} needs bytes {start:,}..{start + n_bytes:,} but the file ends at {self.file_bytes:,}"
                )
            shape = np.array(dims, dtype=np.uint64)
            self.tensors.append(HeaderTensor(name, ggml_type, shape, n_elements, n_bytes, start, _header=self))
        del self._tensor_infos

    # ----------------------------------------------------------------------------------------
    # Decoding on demand.

    def _decode(self, f: HeaderField) -> Any:
        value_type = f.types[0]
        if value_type == GGUFValueType.STRING:
            return self._read_string(f.value_offset, f"the value of {f.name!r}")[0]
        if value_type != GGUFValueType.ARRAY:
            return np.frombuffer(self._buffer, self._scalar_dtype(value_type), 1, f.value_offset)[0].item()
        if f.count == 0:
            return []
        item_type = f.types[1]
        if item_type != GGUFValueType.STRING:
            return np.frombuffer(self._buffer, self._scalar_dtype(item_type), f.count, f.value_offset).tolist()
        # The walk at open proved every length stays inside the file; decode in one tight loop.
        unpack_length = struct.Struct(self._order + "Q").unpack_from
        buffer, offset, strings = self._buffer, f.value_offset, []
        append = strings.append
        try:
            for _ in range(f.count):
                start = offset + 8
                offset = start + unpack_length(buffer, offset)[0]
                append(buffer[start:offset].decode("utf-8"))
        except UnicodeDecodeError:
            raise _Corrupt(f"an element of {f.name!r} is not UTF-8") from None
        return strings

    def _tensor_data(self, t: HeaderTensor) -> np.ndarray:
        if self._memmap is None:
            self._memmap = np.memmap(self.path, mode="r")
        raw = self._memmap[t.data_offset : t.data_offset + t.n_bytes]
        numpy_shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        dtype = PLAIN_TENSOR_DTYPES.get(t.tensor_type)
        if dtype is None:
            return raw.reshape(gguf.quants.quant_shape_to_byte_shape(numpy_shape, t.tensor_type))
        return raw.view(np.dtype(dtype).newbyteorder(self._order)).reshape(numpy_shape)


def read_gguf_header(path: str | os.PathLike, what: str = "GGUF") -> GGUFHeader:
    """Open a GGUF's header and tensor table; a missing, foreign, corrupt or truncated file is one line.

    Args:
        path: the .gguf file.
        what: how the file is named in error messages ("model", "adapter", "GGUF").

    Example:
        read_gguf_header("w4.gguf").tensors[0].tensor_type   # GGMLQuantizationType.Q6_K
    """
    path = Path(path)
    if not path.is_file():
        raise RecoverLoraError(f"{what} file {path} does not exist; give the path to a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise RecoverLoraError(f"{what} file {path} is not a GGUF file (starts with {magic!r}, not b'GGUF')")
        # mmap: pages of the vocabulary that are skipped are never read from disk.
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return GGUFHeader(path, buffer)
    except _Corrupt as e:
        raise RecoverLoraError(
            f"{what} file {path} is not a readable GGUF file (damaged or truncated: {e}); re-export or re-download it"
        ) from None
