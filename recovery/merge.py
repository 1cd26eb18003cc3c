"""`recover-lora merge`: fold a training run into one GGUF that stock llama.cpp loads with no adapter.

A run trained on a quantized base (`train --base gateup.gguf`) may hold two things:
- a LoRA adapter (run/adapter/): each of its linears becomes Q(W + (alpha / r) · B · A), the
  full-precision weight of the teacher (padded as the base was) plus the LoRA product, quantized
  again by llama.cpp at that tensor's type in the base (with the base's importance matrix when given).
  For the 4-bit linears the new rounding noise is small next to the correction it carries; for
  the 2-bit gate/up it is not (the naive baseline, kept to show what it loses).
- trained Q2_K block scales (run/block_scales.safetensors, `train --block-scales`): written as the
  exact bytes the student trained against.
Every other tensor is copied byte for byte from the base, so the result has exactly the base's
tensor types and sizes — and so its decode speed. The output is written to a temporary file,
checked (types, sizes, llama.cpp loads it) and renamed.

Example:
    merge_run("out/gateup.gguf", "out/recover", "out/recovered.gguf", imatrix="out/imatrix.gguf")
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output, check_output


@dataclass
class MergeResult:
    path: Path
    lora_tensors: list[str] = field(default_factory=list)  # GGUF names re-quantized with the LoRA merged in
    block_scale_tensors: list[str] = field(default_factory=list)  # GGUF names written from trained blocks
    file_bytes: int = 0


def lora_deltas(adapter_dir: Path, base_gguf: Path) -> dict[str, np.ndarray]:
    """Hugging Face tensor name -> (alpha / r) · B · A, checked against the base first."""
    from recover_lora.recovery.adapter_gguf import check_peft_adapter_against_base, gguf_alpha, read_peft_adapter

    peft_config, _, _ = check_peft_adapter_against_base(adapter_dir, base_gguf)  # another base's adapter fails here
    scaling = gguf_alpha(peft_config) / int(peft_config["r"])
    _, pairs = read_peft_adapter(adapter_dir)
    return {f"{module}.weight": scaling * (b @ a) for module, (a, b) in pairs.items()}


def replace_tensor_bytes(base_gguf: Path, out_tmp: Path, replacements: dict[str, np.ndarray]) -> None:
    """Copy the base and overwrite the data of the named tensors (same type, same byte count) in place."""
    from recover_lora.export.gguf_header import read_gguf_header

    tensors = {t.name: t for t in read_gguf_header(base_gguf).tensors}
    shutil.copyfile(base_gguf, out_tmp)
    with open(out_tmp, "r+b") as handle:
        for name, raw in replacements.items():
            data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
            tensor = tensors[name]
            if data.size != int(tensor.n_bytes):
                raise RecoverLoraError(f"{name}: {data.size} new bytes for a tensor of {int(tensor.n_bytes)} in {base_gguf.name}")
            handle.seek(int(tensor.data_offset))
            handle.write(data.tobytes())


def requantized_tensors(info, deltas: dict[str, np.ndarray], teacher, imatrix, work_dir: Path,
                        threads: int | None) -> dict[str, np.ndarray]:
    """GGUF name -> bytes of Q(teacher + delta) at the base's type (`info`: the base's StudentInfo), for every
    tensor a delta touches."""
    from recover_lora.export.gguf_header import read_gguf_header
    from recover_lora.export.model import gguf_name
    from recover_lora.export.policy import Policy, TensorTypeRule
    from recover_lora.export.quantize import export_model

    types = {n: t for n, t in info.tensor_types.items() if t != gguf.GGMLQuantizationType.F32}
    # One exact rule per tensor: the merged file asks llama.cpp for the base's types, whatever the policy was.
    rules = [TensorTypeRule(re.escape(name), ggml_type) for name, ggml_type in types.items()]
    merged = work_dir / "merged.gguf"
    export_model(teacher, merged, Policy.named("w4", rules=rules), force=True, threads=threads, imatrix=imatrix, deltas=deltas)
    touched = {gguf_name(hf, info.config) for hf in deltas}
    tensors = {t.name: t for t in read_gguf_header(merged).tensors}
    return {name: np.array(tensors[name].data) for name in sorted(touched)}


def merge_run(
    base_gguf: str | Path,
    run_dir: str | Path,
    out_path: str | Path,
    teacher: str | Path | None = None,
    imatrix: str | Path | None = None,
    threads: int | None = None,
    force: bool = False,
) -> MergeResult:
    """One GGUF from a base and a training run (its adapter and/or trained block scales).

    Args:
        base_gguf: the quantized GGUF the run trained on.
        run_dir: the `recover-lora train` output folder.
        out_path: the GGUF to write.
        teacher: the full-precision model the LoRA is merged into (default: the run's --teacher).
        imatrix: the importance matrix the base was exported with (re-quantizing merged tensors uses it).
    """
    from recover_lora.export.llama_load import llama_cpp_load_check
    from recover_lora.export.model import gguf_name
    from recover_lora.export.quantize import check_types
    from recover_lora.recovery.block_scales import BLOCK_SCALES_FILE, check_same_codes, load_block_scales
    from recover_lora.recovery.distill import ADAPTER_DIR
    from recover_lora.recovery.student import read_student_info

    base_gguf, run_dir = Path(base_gguf), Path(run_dir)
    out_path = check_output(out_path, force)
    if not base_gguf.is_file():
        raise RecoverLoraError(f"base GGUF {base_gguf} does not exist; give the quantized file the run trained on")
    adapter_dir, blocks_path = run_dir / ADAPTER_DIR, run_dir / BLOCK_SCALES_FILE
    has_adapter, has_blocks = (adapter_dir / "adapter_model.safetensors").is_file(), blocks_path.is_file()
    if not (has_adapter or has_blocks):
        raise RecoverLoraError(f"{run_dir} holds neither an adapter/ nor {BLOCK_SCALES_FILE}; give a finished `recover-lora train` folder")
    if teacher is None:
        run_config = run_dir / "run_config.json"
        teacher = json.loads(run_config.read_text()).get("teacher") if run_config.is_file() else None

    # Everything is checked against the base before any work.
    blocks = load_block_scales(blocks_path) if has_blocks else {}
    if blocks:
        check_same_codes(blocks, base_gguf)
    deltas = lora_deltas(adapter_dir, base_gguf) if has_adapter else {}
    info = read_student_info(base_gguf)
    overlap = sorted(set(blocks) & {gguf_name(n, info.config) for n in deltas})
    if overlap:
        raise RecoverLoraError(f"{run_dir} trains both a LoRA and the block scales of {overlap[0]}; merge one or the other")

    replacements = dict(blocks)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".recover-lora-merge-") as work:
        if deltas:
            replacements.update(requantized_tensors(info, deltas, teacher, imatrix, Path(work), threads))
        with atomic_output(out_path, force=force) as tmp:
            replace_tensor_bytes(base_gguf, tmp, replacements)
            check_types(tmp, info.tensor_types)
            llama_cpp_load_check(tmp, name=str(out_path))
    return MergeResult(
        path=out_path,
        lora_tensors=sorted(n for n in replacements if n not in blocks),
        block_scale_tensors=sorted(blocks),
        file_bytes=out_path.stat().st_size,
    )

