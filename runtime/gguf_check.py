"""Checks on GGUF files before llama.cpp sees them.

llama.cpp aborts the process or prints pages of log on a truncated file or an adapter made for
another model; we read the files with gguf-py first and turn every such case into one
`RecoverLoraError` line. Whether an adapter fits its base (general.type, adapter.type,
architecture, `<tensor>.lora_a` / `.lora_b` pairs and their shapes) is decided by the same
function recovery/ uses when it writes adapters, so writer and loader agree.
"""

from __future__ import annotations

import os
from pathlib import Path

from recover_lora.errors import RecoverLoraError
from recover_lora.export.gguf_info import GGUFSummary, summary_from_reader
from recover_lora.recovery.adapter_gguf import AdapterSummary, check_adapter_against_base

GGUF_MAGIC = b"GGUF"


def read_gguf_summary(path: str | os.PathLike, what: str = "model") -> GGUFSummary:
    """Read a GGUF header and tensor table; a missing, truncated or foreign file -> RecoverLoraError.

    Example:
        read_gguf_summary("w4.gguf").count_by_type()  # {'F32': 61, 'Q4_K': 150, 'Q6_K': 1}
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
        for tensor in reader.tensors:
            # GGUFReader maps tensor data lazily; touching the last byte catches a truncated file.
            if tensor.n_bytes and tensor.data.nbytes != tensor.n_bytes:
                raise ValueError(f"tensor {tensor.name} is cut short")
        summary = summary_from_reader(reader, path)
    except Exception as e:  # gguf-py raises ValueError / struct / numpy errors on damaged files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecoverLoraError(f"{what} file {path} is damaged or truncated ({reason}); re-export or re-download it") from None
    if not isinstance(summary.architecture, str):
        raise RecoverLoraError(f"{what} file {path} has no general.architecture; it is not a llama.cpp model GGUF")
    return summary


def check_model_gguf(path: str | os.PathLike) -> GGUFSummary:
    """A loadable base model: a readable GGUF that is not an adapter."""
    summary = read_gguf_summary(path, "model")
    if summary.general_type == "adapter":
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
    if adapter.general_type != "adapter":
        raise RecoverLoraError(f"{adapter.path} has general.type={adapter.general_type!r}, not 'adapter'; --lora needs a LoRA adapter GGUF")
    return check_adapter_against_base(adapter.path, base.path)
