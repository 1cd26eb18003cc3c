"""Teacher and student models, and which of the student's linears get LoRA.

The student *is* the deployed model: every tensor of the quantized GGUF dequantized with
`gguf.quants.dequantize` (via `export.gguf_io.read_gguf`, which also undoes llama.cpp's q/k
rotary permutation), padding included. The teacher is the full-precision source model.
Padding changes widths but never the vocabulary, so teacher and student logits compare directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf

from recover_lora.errors import RecoverLoraError
from recover_lora.export.model import ModelConfig, hf_module_name
from recover_lora.export.policy import BLOCK_LINEARS, is_block_linear

# "low-bit" targets: block linears stored at fewer than this many bits per weight: every 1-, 2- and
# 3-bit type (Q2_K 2.625, IQ2_XS 2.3125, IQ3_XXS 3.0625, Q3_K 3.4375), never a 4-bit one (IQ4_XS 4.25,
# Q4_K 4.5), i.e. the gate/up tensors of a `gateup` export whatever its --low-bit-type.
LOW_BIT_MAX_BITS_PER_WEIGHT = 3.5
TARGET_CHOICES = ("'low-bit' (the 2-bit linears), 'high-bit' (the quantized linears that are not), 'all' (every quantized linear), "
                  "or llama.cpp linear names like 'ffn_gate,ffn_up'")


def bits_per_weight(ggml_type: gguf.GGMLQuantizationType) -> float:
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
    return 8.0 * block_bytes / block_size


def is_quantized(ggml_type: gguf.GGMLQuantizationType) -> bool:
    return ggml_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)


@dataclass
class StudentInfo:
    """What the student was built from: the GGUF, its config and every tensor's ggml type."""

    gguf_path: Path
    config: ModelConfig
    gguf_arch: str
    tensor_types: dict[str, gguf.GGMLQuantizationType]  # GGUF tensor name -> type
    unpadded: dict[str, int] | None = None
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # GGUF name -> (out, in)

    def block_linears(self) -> list[str]:
        return [name for name in self.tensor_types if is_block_linear(name)]


def read_student_info(gguf_path: str | Path) -> StudentInfo:
    """Config and tensor types of a GGUF, without dequantizing anything."""
    from recover_lora.export.gguf_io import UNPADDED_KEY_PREFIX, config_from_gguf, field_value, open_gguf

    reader = open_gguf(gguf_path)
    config = config_from_gguf(reader)
    unpadded = {}
    for key in reader.fields:
        if key.startswith(UNPADDED_KEY_PREFIX):
            unpadded[key[len(UNPADDED_KEY_PREFIX):]] = int(field_value(reader, key))
    return StudentInfo(
        gguf_path=Path(gguf_path),
        config=config,
        gguf_arch=field_value(reader, gguf.Keys.General.ARCHITECTURE),
        tensor_types={t.name: gguf.GGMLQuantizationType(int(t.tensor_type)) for t in reader.tensors},
        unpadded=unpadded or None,
        tensor_shapes={t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors},
    )


def build_student(gguf_path: str | Path, dtype=None):
    """The deployed model in torch: (transformers *ForCausalLM, StudentInfo).

    Example:
        student, info = build_student("smollm2.gateup.gguf")
        info.tensor_types["blk.0.ffn_gate.weight"]  # GGMLQuantizationType.Q2_K
    """
    import torch

    from recover_lora.export.gguf_io import read_gguf
    from recover_lora.export.torch_model import to_hf_model

    info = read_student_info(gguf_path)
    model = to_hf_model(read_gguf(gguf_path), dtype=dtype or torch.float32)
    model.eval()
    return model, info


def build_teacher(source: str | Path | None, dtype=None):
    """The full-precision model (HF folder, GGUF, or None = the default model) in torch."""
    import torch

    from recover_lora.export.sources import load_model
    from recover_lora.export.torch_model import to_hf_model

    weights = load_model(source)
    model = to_hf_model(weights, dtype=dtype or torch.float32)
    model.eval()
    return model, weights.config


def resolve_dtype(name: str, device):
    """The torch dtype of `--dtype` on this device: auto = bfloat16 on a CUDA GPU that supports it, else float32."""
    import torch

    from recover_lora.recovery.train_config import DTYPES

    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if name not in DTYPES:
        raise RecoverLoraError(f"--dtype {name!r} is unknown; use one of: {', '.join(DTYPES)}")
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RecoverLoraError("--dtype bfloat16: this GPU has no bfloat16 support; use --dtype float32")
    return getattr(torch, name)


def causal_lm(model):
    """The transformers *ForCausalLM inside a peft wrapper (LoRA layers in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_hidden_states(model, input_ids):
    """The last hidden states [B, L, H] of a causal LM: its forward up to, not including, lm_head.

    No KV cache: nothing is generated, and for a large model the cache of a batch is big.
    """
    return causal_lm(model).get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state


def output_logits(model, hidden, weight=None):
    """Logits from last hidden states: lm_head (its weight replaced by `weight` when given) and what
    *ForCausalLM.forward does after it.

    Of the architectures in export/archs only Gemma 3 does more: final logit soft-capping, the same
    three operations in the same order as transformers' Gemma3ForCausalLM.forward (tests check every
    architecture against the model's own logits).
    """
    import torch

    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    logits = head(hidden) if weight is None else torch.func.functional_call(head, {"weight": weight}, (hidden,))
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if softcap is not None:
        logits = logits / softcap
        logits = torch.tanh(logits)
        logits = logits * softcap
    return logits


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (same math).

    Non-reentrant torch checkpointing: the reentrant kind only backpropagates into a checkpointed
    layer when its input requires grad, which the frozen embeddings' output does not, so LoRA
    parameters inside would silently get no gradient (peft's `enable_input_require_grads` works
    around that; non-reentrant needs no workaround).
    """
    causal_lm(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def check_teacher_matches(teacher_config: ModelConfig, info: StudentInfo) -> None:
    """Refuse a teacher that cannot be the source of the student GGUF (before any training)."""
    student = info.config
    checks = [(key, getattr(teacher_config, key), getattr(student, key)) for key in ("model_type", "vocab_size", "num_layers")]
    # Width padding changes these; the GGUF records their values before padding.
    for key in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads"):
        unpadded = (info.unpadded or {}).get(key)
        checks.append((key, getattr(teacher_config, key), unpadded if unpadded is not None else getattr(student, key)))
    for what, teacher_value, student_value in checks:
        if teacher_value != student_value:
            raise RecoverLoraError(
                f"teacher {what}={teacher_value} but the student GGUF {info.gguf_path.name} has {student_value}; "
                f"pass the model the GGUF was exported from as --teacher"
            )


def target_tensor_names(info: StudentInfo, targets: str = "low-bit") -> list[str]:
    """GGUF names of the linears that get LoRA.

    targets: "low-bit" (block linears below 3.5 bits/weight: the 1-3-bit gate/up of a gateup export),
    "high-bit" (the other quantized block linears: attention and ffn_down of a gateup export),
    "all" (every quantized block linear), or a comma list of llama.cpp linear kinds
    ("ffn_gate,ffn_up", "attn_q", ...).
    """
    linears = info.block_linears()
    if targets == "low-bit":
        chosen = [n for n in linears if bits_per_weight(info.tensor_types[n]) < LOW_BIT_MAX_BITS_PER_WEIGHT]
        if not chosen:
            found = sorted({info.tensor_types[n].name for n in linears})
            raise RecoverLoraError(
                f"{info.gguf_path.name} has no linear below {LOW_BIT_MAX_BITS_PER_WEIGHT:g} bits/weight "
                f"(types found: {', '.join(found)}); use --targets all or name the linears, e.g. --targets ffn_gate,ffn_up"
            )
        return chosen
    if targets == "high-bit":  # the 4-bit linears that can carry a correction for the 2-bit ones (`merge`)
        chosen = [n for n in linears if is_quantized(info.tensor_types[n])
                  and bits_per_weight(info.tensor_types[n]) >= LOW_BIT_MAX_BITS_PER_WEIGHT]
        if not chosen:
            raise RecoverLoraError(f"{info.gguf_path.name} has no quantized linear at {LOW_BIT_MAX_BITS_PER_WEIGHT:g} bits/weight "
                                   f"or more; use --targets low-bit, all, or name the linears")
        return chosen
    if targets == "all":
        chosen = [n for n in linears if is_quantized(info.tensor_types[n])]
        if not chosen:
            raise RecoverLoraError(f"{info.gguf_path.name} has no quantized linear; LoRA recovery needs a quantized GGUF")
        return chosen
    kinds = [k.strip() for k in targets.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in BLOCK_LINEARS]
    if not kinds or unknown:
        raise RecoverLoraError(f"--targets {targets!r} is not valid; use {TARGET_CHOICES} (kinds: {', '.join(BLOCK_LINEARS)})")
    chosen = [n for n in linears if n.split(".")[2] in kinds]
    if not chosen:  # e.g. ffn_gate on Phi-3, whose gate rows live in the fused ffn_up
        present = sorted({n.split(".")[2] for n in linears})
        raise RecoverLoraError(f"--targets {targets!r} names no linear of {info.gguf_path.name}; its linears are: {', '.join(present)}")
    return chosen


def target_module_names(info: StudentInfo, targets: str = "low-bit") -> list[str]:
    """Torch module names for peft, e.g. ['model.layers.0.mlp.gate_proj', ...]."""
    return [hf_module_name(n, info.config) for n in target_tensor_names(info, targets)]
