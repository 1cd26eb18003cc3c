"""A model's sizes for the memory plan, from its shape alone: parameters, tensors, file bytes, LoRA targets.

The teacher is the source model; the student its quantized export (the gateup policy's tensors, width-
padded as `recover-lora export` writes them) or, for `recover-lora train`, the base GGUF's own tensor table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as T

from recover_lora.devices.shapes import ModelShape, TensorInfo, padded_shape, tensors_for_policy
from recover_lora.export.model import ModelConfig
from recover_lora.export.policy import Policy
from recover_lora.export.quantize import F32_WORK_FILE_MAX_PARAMS


@dataclass(frozen=True)
class ModelSizes:
    """The shapes the arithmetic reads: teacher (the source model) and student (its quantized export)."""

    name: str
    teacher: ModelConfig
    student: ModelConfig  # width-padded as the export writes it
    student_tensors: tuple[TensorInfo, ...]  # the train base's GGUF tensors (the gateup export's for a pipeline)
    policy_tensors: dict[str, tuple[TensorInfo, ...]]  # policy -> the tensors an export with it writes
    teacher_file_bytes: int = 0  # a GGUF teacher is memory-mapped while it is read: its pages count as resident


def model_sizes(shape: ModelShape, student: ModelShape | None = None, policies: tuple[str, ...] = ("w4", "gateup"),
                teacher_file: str | Path | None = None) -> ModelSizes:
    """The sizes of `shape` as teacher; the student is `student` (a GGUF's real tensors) or `shape` exported under gateup."""
    policy_tensors = {p: tensors_for_policy(shape, Policy.named(p)) for p in policies}
    if student is None:
        gateup = Policy.named("gateup")
        student_config, student_tensors = padded_shape(shape, gateup).config, tensors_for_policy(shape, gateup)
    else:
        student_config, student_tensors = student.config, student.file_tensors or tensors_for_policy(student, Policy.named("gateup"))
    source = Path(teacher_file) if teacher_file is not None else Path(shape.source) if shape.is_gguf else None
    file_bytes = source.stat().st_size if source is not None and source.is_file() and source.suffix == ".gguf" else 0
    return ModelSizes(shape.name, shape.config, student_config, tuple(student_tensors), policy_tensors, file_bytes)


def n_params(config: ModelConfig) -> int:
    """Parameters of the torch model (tied head counted once)."""
    return sum(math.prod(s) for s in config.arch.hf_tensor_shapes(config).values())


def largest_tensor(config: ModelConfig) -> int:
    return max(math.prod(s) for s in config.arch.hf_tensor_shapes(config).values())


def embedding_params(config: ModelConfig) -> int:
    """The token embedding and (untied) output head."""
    return config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)


def layer_params(config: ModelConfig) -> int:
    return sum(math.prod(s) for s in config.arch.block_tensor_shapes(config).values())


def file_bytes(tensors: tuple[TensorInfo, ...]) -> int:
    """A GGUF's tensor data: every tensor at its ggml type's block size (gguf.GGML_QUANT_SIZES)."""
    total = 0
    for t in tensors:
        block, block_bytes = gguf.GGML_QUANT_SIZES[t.ggml_type]
        total += t.n_elements // block * block_bytes
    return total


def work_is_f32(config: ModelConfig) -> bool:
    return config.num_linear_parameters() <= F32_WORK_FILE_MAX_PARAMS


def work_file_bytes(config: ModelConfig) -> int:
    """export's full-precision intermediate GGUF: 2-D tensors in F32 (F16 past 2B linear parameters), 1-D in F32."""
    width = 4 if work_is_f32(config) else 2
    return sum(math.prod(s) * (width if len(s) == 2 else 4) for s in config.arch.hf_tensor_shapes(config).values())


def teacher_reading(sizes: ModelSizes) -> dict[str, int]:
    """What reading the teacher into torch holds besides the model (export.torch_model.to_hf_model, tensor by tensor):
    a GGUF teacher's mapped pages (resident until the read ends) and, unless it is F32 (read in place), one tensor's
    float32 copy; a Hugging Face checkpoint's tensor in bf16 and as float32."""
    c = sizes.teacher
    if not sizes.teacher_file_bytes:
        return {"largest tensor converted": largest_tensor(c) * 6}
    in_place = sizes.teacher_file_bytes >= 3.5 * n_params(c)  # F32: dequantize returns a view of the mapping
    return {"teacher source mapped": sizes.teacher_file_bytes, "largest tensor converted": 0 if in_place else largest_tensor(c) * 4}


def kv_elements_per_token(config: ModelConfig) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim


def lora_targets(sizes: ModelSizes, targets: str) -> list[TensorInfo]:
    """The student's linears that get LoRA: recovery.student's own selection, on the tensor table alone."""
    from recover_lora.recovery.student import StudentInfo, target_tensor_names

    if targets == "none":
        return []
    info = StudentInfo(gguf_path=Path(f"{sizes.name}.gguf"), config=sizes.student, gguf_arch=sizes.student.arch.gguf_arch,
                       tensor_types={t.name: t.ggml_type for t in sizes.student_tensors})
    chosen = set(target_tensor_names(info, targets))
    return [t for t in sizes.student_tensors if t.name in chosen]


def block_scale_tensors(sizes: ModelSizes) -> list[TensorInfo]:
    return [t for t in lora_targets(sizes, "low-bit") if t.ggml_type == T.Q2_K]
