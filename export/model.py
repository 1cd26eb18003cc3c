"""The model in memory: architecture config, weights by Hugging Face name, tokenizer.

Every source (a Hugging Face folder, a GGUF file, the default model) is read into a
`ModelWeights`, and every writer (GGUF, torch) takes one. Tensors keep Hugging Face names
and layout (a linear weight is (out, in), float32); the GGUF naming and llama.cpp's rotary
permutation of q/k live only at the GGUF boundary, in each architecture's class (export/archs/).
Tensors are lazy (`LazyTensors`): a 4B model never has to sit in memory as float32 at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from recover_lora.errors import RecoverLoraError


def _archs():
    # The registry imports this module (its classes read ModelConfig): import it lazily.
    from recover_lora.export import archs

    return archs


def supported_architectures() -> str:
    return _archs().supported()


@dataclass(frozen=True)
class ModelConfig:
    """The hyper-parameters llama.cpp and transformers both need (the head dimension explicit)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    context_length: int
    tie_word_embeddings: bool
    # Hugging Face rope scaling dict (e.g. {"rope_type": "llama3", "factor": 8.0, ...}) or None.
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = "model"
    # Architecture-specific hyper-parameters (Gemma 3's sliding window, ...), see export/archs/.
    arch_params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _archs().for_model_type(self.model_type)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise RecoverLoraError(f"model config {key}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise RecoverLoraError(
                f"model config num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def arch(self):
        """The registered `export.archs.base.Architecture` of this model type."""
        return _archs().for_model_type(self.model_type)

    @property
    def rope_type(self) -> str | None:
        if self.rope_scaling is None:
            return None
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))

    @property
    def heads_per_kv_head(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_linear_parameters(self) -> int:
        """Weights of the linear layers and embeddings (norms and biases are negligible)."""
        return sum(math.prod(shape) for shape in self.arch.hf_tensor_shapes(self).values() if len(shape) == 2)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str = "model") -> "ModelConfig":
        """Read a Hugging Face config.json (transformers 4.x or 5.x key spellings)."""
        model_type = cfg.get("model_type")
        if model_type is None:
            raise RecoverLoraError("config.json has no 'model_type'; is this a Hugging Face model folder?")
        arch = _archs().for_model_type(model_type)
        cfg = arch.flat_hf_config(cfg)
        classes = cfg.get("architectures") or [arch.hf_class]
        if classes[0] != arch.hf_class:
            raise RecoverLoraError(f"unsupported architecture {classes[0]!r}; supported: {supported_architectures()}")
        rope = dict(cfg.get("rope_parameters") or {})  # transformers >= 5
        rope_theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        rope_scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rope_type not in arch.rope_scaling_types:
                supported = ", ".join(arch.rope_scaling_types) or "none"
                raise RecoverLoraError(f"rope scaling {rope_type!r} is not supported for {model_type}; supported: {supported}")
        arch.check_hf_config(cfg)
        num_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            context_length=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=rope_scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            name=name,
            arch_params=arch.arch_params_from_hf(cfg),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict that transformers loads into the matching *ForCausalLM."""
        return self.arch.hf_config(self)


class LazyTensors(Mapping[str, np.ndarray]):
    """A read-only name -> array mapping whose arrays are made on access (one at a time).

    Each value is a zero-argument function; `map` wraps every loader with a transform, so
    padding or dequantizing a 4B model streams tensor by tensor.
    """

    def __init__(self, loaders: Mapping[str, Callable[[], np.ndarray]]):
        self._loaders = dict(loaders)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "LazyTensors":
        return cls({name: (lambda a=a: a) for name, a in arrays.items()})

    def __getitem__(self, name: str) -> np.ndarray:
        return self._loaders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def map(self, transform: Callable[[str, np.ndarray], np.ndarray]) -> "LazyTensors":
        return LazyTensors({n: (lambda n=n, f=f: transform(n, f())) for n, f in self._loaders.items()})


@dataclass
class ModelWeights:
    """A whole model: config, tensors by Hugging Face name, tokenizer (GGUF vocab fields)."""

    config: ModelConfig
    tensors: Mapping[str, np.ndarray]
    tokenizer: Any = None  # export.tokenizer.TokenizerSpec
    source: str = ""
    # Hugging Face hidden size before width padding (None if not padded); recorded in the GGUF.
    unpadded: dict[str, int] | None = field(default=None)

    def replace(self, **changes) -> "ModelWeights":
        return replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Hugging Face <-> llama.cpp tensor names: the model's architecture decides (export/archs/).


def gguf_name(hf_tensor_name: str, config: ModelConfig) -> str:
    """'model.layers.3.mlp.gate_proj.weight' -> 'blk.3.ffn_gate.weight'."""
    return config.arch.gguf_name(hf_tensor_name, config.num_layers)


def hf_name(gguf_tensor_name: str, config: ModelConfig) -> str:
    """'blk.3.ffn_gate.weight' -> 'model.layers.3.mlp.gate_proj.weight'."""
    names = config.arch.gguf_names(config)
    if gguf_tensor_name not in names:
        raise RecoverLoraError(f"GGUF tensor {gguf_tensor_name!r} is not part of a {config.arch.describe()} model of this shape")
    return names[gguf_tensor_name]


def hf_module_name(gguf_tensor_name: str, config: ModelConfig) -> str:
    """'blk.3.ffn_gate.weight' -> 'model.layers.3.mlp.gate_proj' (the torch module holding it)."""
    return hf_name(gguf_tensor_name, config).rsplit(".", 1)[0]
