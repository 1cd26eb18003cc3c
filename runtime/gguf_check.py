"""Checks on GGUF files before llama.cpp sees them.

llama.cpp aborts the process or prints pages of log on a truncated file or an adapter made for
another model; we read the files' headers first (export.gguf_header: milliseconds, whatever the
vocabulary) and turn every such case into one `RecoverLoraError` line. Whether an adapter fits its
base (general.type, adapter.type, architecture, `<tensor>.lora_a` / `.lora_b` pairs and their
shapes) is decided by the same function recovery/ uses when it writes adapters, so writer and
loader agree.
"""

from __future__ import annotations

import os
from pathlib import Path

from recover_lora.errors import RecoverLoraError
from recover_lora.export.gguf_header import read_gguf_header
from recover_lora.export.gguf_info import GGUFSummary, summary_from_reader
from recover_lora.recovery.adapter_gguf import AdapterSummary, check_adapter_against_base


def read_gguf_summary(path: str | os.PathLike, what: str = "model") -> GGUFSummary:
    """Read a GGUF header and tensor table; a missing, truncated or foreign file -> RecoverLoraError.

    Example:
        read_gguf_summary("w4.gguf").count_by_type()  # {'F32': 61, 'Q4_K': 150, 'Q6_K': 1}
    """
    # The fast header reader checks magic, layout and that every tensor lies inside the file.
    summary = summary_from_reader(read_gguf_header(path, what), path)
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
