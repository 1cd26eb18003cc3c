"""The model in memory: architecture config, weights by Hugging Face name, tokenizer.

Every source (a Hugging Face folder, a GGUF file, the default model) is read into a
`ModelWeights`, and every writer (GGUF, torch) takes one. Tensors keep Hugging Face names
and layout (a linear weight is (out, in), float32); the GGUF naming and llama.cpp's rotary
permutation of q/k live only at the GGUF boundary (`gguf_name`, `permute_for_llama_cpp`).
Tensors are lazy (`LazyTensors`): a 4B model never has to sit in memory as float32 at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from recover_lora.errors import RecoverLoraError


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face architecture maps onto llama.cpp."""

    model_type: str  # config.json "model_type"
    hf_class: str  # config.json "architectures"[0]
    gguf_arch: str  # general.architecture in the GGUF
    # llama.cpp's "llama" graph uses interleaved (GPT-J style) rotary embeddings where Hugging
    # Face rotates halves, so q/k rows are permuted on the way in; qwen2/qwen3 use NEOX rope.
    permute_qk: bool
    attention_bias: bool = False  # q/k/v biases (qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (qwen3)


# First match wins; unsupported architectures get this list in their error.
ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("llama", "LlamaForCausalLM", "llama", permute_qk=True),
    ArchSpec("mistral", "MistralForCausalLM", "llama", permute_qk=True),
    ArchSpec("qwen2", "Qwen2ForCausalLM", "qwen2", permute_qk=False, attention_bias=True),
    ArchSpec("qwen3", "Qwen3ForCausalLM", "qwen3", permute_qk=False, qk_norm=True),
)


def supported_architectures() -> str:
    return ", ".join(f"{a.hf_class} ({a.model_type})" for a in ARCHITECTURES)


def arch_for_model_type(model_type: str) -> ArchSpec:
    for arch in ARCHITECTURES:
        if arch.model_type == model_type:
            return arch
    raise RecoverLoraError(f"unsupported architecture {model_type!r}; supported: {supported_architectures()}")


def arch_for_gguf(gguf_arch: str) -> ArchSpec:
    for arch in ARCHITECTURES:  # "llama" maps back to llama (mistral is the same graph)
        if arch.gguf_arch == gguf_arch:
            return arch
    supported = sorted({a.gguf_arch for a in ARCHITECTURES})
    raise RecoverLoraError(f"unsupported GGUF architecture {gguf_arch!r}; supported: {', '.join(supported)}")


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

    def __post_init__(self) -> None:
        arch_for_model_type(self.model_type)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise RecoverLoraError(f"model config {key}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise RecoverLoraError(
                f"model config num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def arch(self) -> ArchSpec:
        return arch_for_model_type(self.model_type)

    @property
    def heads_per_kv_head(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_linear_parameters(self) -> int:
        """Weights of the linear layers and embeddings (norms and biases are negligible)."""
        attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attention + mlp) + embeddings

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str = "model") -> "ModelConfig":
        """Read a Hugging Face config.json (transformers 4.x or 5.x key spellings)."""
        model_type = cfg.get("model_type")
        if model_type is None:
            raise RecoverLoraError("config.json has no 'model_type'; is this a Hugging Face model folder?")
        arch = arch_for_model_type(model_type)
        classes = cfg.get("architectures") or [arch.hf_class]
        if classes[0] != arch.hf_class:
            raise RecoverLoraError(f"unsupported architecture {classes[0]!r}; supported: {supported_architectures()}")
        rope = dict(cfg.get("rope_parameters") or {})  # transformers >= 5
        rope_theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        rope_scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rope_type not in ("llama3", "linear"):
                raise RecoverLoraError(f"rope scaling {rope_type!r} is not supported; supported: llama3, linear")
        if model_type == "qwen2" and cfg.get("use_sliding_window"):
            raise RecoverLoraError("qwen2 with use_sliding_window=true is not supported by llama.cpp's qwen2 graph")
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
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict that transformers loads into the matching *ForCausalLM."""
        cfg = {
            "architectures": [self.arch.hf_class],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.context_length,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        if self.model_type == "llama":
            cfg["attention_bias"] = False
            cfg["mlp_bias"] = False
        if self.model_type in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = False
        return cfg


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
# Hugging Face <-> llama.cpp tensor names (llama.cpp's gguf-py tensor_mapping, llama family).

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "rope_freqs.weight": "rope_freqs.weight",
}
_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES_BACK = {v: k for k, v in _GLOBAL_NAMES.items()}
_BLOCK_NAMES_BACK = {v: k for k, v in _BLOCK_NAMES.items()}
_HF_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_GGUF_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_name(hf_name: str) -> str:
    """'model.layers.3.mlp.gate_proj.weight' -> 'blk.3.ffn_gate.weight'."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    match = _HF_BLOCK_RE.fullmatch(hf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"blk.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    raise RecoverLoraError(f"tensor {hf_name!r} has no llama.cpp name; is the architecture supported?")


def hf_name(gguf_tensor_name: str) -> str:
    """'blk.3.ffn_gate.weight' -> 'model.layers.3.mlp.gate_proj.weight'."""
    if gguf_tensor_name in _GLOBAL_NAMES_BACK:
        return _GLOBAL_NAMES_BACK[gguf_tensor_name]
    match = _GGUF_BLOCK_RE.fullmatch(gguf_tensor_name)
    if match and match.group(2) in _BLOCK_NAMES_BACK:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES_BACK[match.group(2)]}"
    raise RecoverLoraError(f"GGUF tensor {gguf_tensor_name!r} is not part of a supported llama-family model")


def hf_module_name(gguf_tensor_name: str) -> str:
    """'blk.3.ffn_gate.weight' -> 'model.layers.3.mlp.gate_proj' (the torch module holding it)."""
    return hf_name(gguf_tensor_name).rsplit(".", 1)[0]


def permute_for_llama_cpp(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows (or biases) from Hugging Face's rotate-half layout to llama.cpp's
    interleaved rotary layout; each head's first and second halves become pairs."""
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_from_llama_cpp(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute_for_llama_cpp`."""
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def rotary_heads(hf_tensor_name: str, config: ModelConfig) -> int | None:
    """The head count to permute a tensor by, or None if llama.cpp stores it as is."""
    if not config.arch.permute_qk:
        return None
    if hf_tensor_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return config.num_heads
    if hf_tensor_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return config.num_kv_heads
    return None
