"""Checks on GGUF files before llama.cpp sees them.

llama.cpp aborts the process or prints pages of log on a truncated file or an adapter made for
another model; we read the files with gguf-py first and turn every such case into one
`RecoverLoraError` line. Whether an adapter fits its base (general.type, adapter.type,
architecture, `<tensor>.lora_a` / `.lora_b` pairs and their shapes) is decided by the same
function recovery/ uses when it writes adapters, so writer and loader agree.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from recover_lora.errors import RecoverLoraError
from recover_lora.recovery.adapter_gguf import AdapterSummary, check_adapter_against_base

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFSummary:
    """What the runtime needs to know about a model GGUF without loading it."""

    path: Path
    architecture: str
    file_type: str  # general.type: "model" or "adapter"
    size_bytes: int
    tensor_shapes: dict[str, tuple[int, ...]]  # torch order: a linear weight is (out, in)
    tensor_types: dict[str, str]  # tensor name -> ggml type name
    metadata: dict[str, object] = field(default_factory=dict)  # scalar/string fields only

    @property
    def type_counts(self) -> dict[str, int]:
        """Number of tensors per ggml type, e.g. {'Q4_K': 120, 'Q2_K': 60, 'F32': 61}."""
        return dict(sorted(Counter(self.tensor_types.values()).items()))

    @property
    def n_weights(self) -> int:
        total = 0
        for shape in self.tensor_shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


def read_gguf_summary(path: str | os.PathLike, what: str = "model") -> GGUFSummary:
    """Read a GGUF header and tensor table; a missing, truncated or foreign file -> RecoverLoraError.

    Example:
        read_gguf_summary("w4.gguf").type_counts  # {'F32': 61, 'Q4_K': 150, 'Q6_K': 1}
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise RecoverLoraError(f"{what} file {path} does not exist; give the path to a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise RecoverLoraError(f"{what} file {path} is not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
        shapes, types = {}, {}
        for tensor in reader.tensors:
            shapes[tensor.name] = tuple(int(d) for d in reversed(tensor.shape))
            types[tensor.name] = tensor.tensor_type.name
            # GGUFReader maps tensor data lazily; touching the last byte catches a truncated file.
            if tensor.n_bytes and tensor.data.nbytes != tensor.n_bytes:
                raise ValueError(f"tensor {tensor.name} is cut short")
        metadata = {}
        for key, fld in reader.fields.items():
            if key.startswith("tokenizer.") or key.startswith("GGUF."):
                continue
            value = fld.contents()
            if isinstance(value, (str, int, float, bool)):
                metadata[key] = value
    except RecoverLoraError:
        raise
    except Exception as e:  # gguf-py raises ValueError / struct / numpy errors on damaged files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecoverLoraError(f"{what} file {path} is damaged or truncated ({reason}); re-export or re-download it") from None
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str):
        raise RecoverLoraError(f"{what} file {path} has no general.architecture; it is not a llama.cpp model GGUF")
    return GGUFSummary(
        path=path,
        architecture=architecture,
        file_type=str(metadata.get("general.type", "model")),
        size_bytes=path.stat().st_size,
        tensor_shapes=shapes,
        tensor_types=types,
        metadata=metadata,
    )


def check_model_gguf(path: str | os.PathLike) -> GGUFSummary:
    """A loadable base model: a readable GGUF that is not an adapter."""
    summary = read_gguf_summary(path, "model")
    if summary.file_type == "adapter":
        raise RecoverLoraError(f"{summary.path} is a LoRA adapter, not a model; pass it with --lora and give the base model first")
    return summary


def check_adapter(base: GGUFSummary, adapter_path: str | os.PathLike) -> AdapterSummary:
    """Check that a LoRA adapter GGUF fits `base` (type, architecture, tensor names, shapes).

    The file is first read on its own (a damaged adapter gets its own message); the fit is the
    one check recovery/ runs when it writes adapters (`check_adapter_against_base`).

    Example:
        check_adapter(check_model_gguf("gateup.gguf"), "adapter.gguf").ranks  # [16]
    """
    adapter = read_gguf_summary(adapter_path, "adapter")
    if adapter.file_type != "adapter":
        raise RecoverLoraError(f"{adapter.path} has general.type={adapter.file_type!r}, not 'adapter'; --lora needs a LoRA adapter GGUF")
    return check_adapter_against_base(adapter.path, base.path)
