"""What every stage needs to know about one architecture, in one class.

An `Architecture` answers, from a `ModelConfig` alone: which tensors a Hugging Face checkpoint
holds and their shapes, their llama.cpp names (gguf-py's own `TensorNameMap`, not a copy of it),
how a tensor changes on the way into a GGUF and back (llama.cpp's rotary permutation, Gemma's
norm offset), which hyper-parameters the GGUF carries, the config.json that transformers builds
the torch model from, and how every axis of every tensor is padded. The base class is the llama
family (llama, mistral, qwen2, qwen3 only set flags); an architecture with a different block
subclasses it in its own module of this package and registers itself with `@register`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import gguf
import numpy as np

from recover_lora.errors import RecoverLoraError

# Kinds of tensor axis, for padding: every axis of every tensor is one kind, or a concatenation
# of several (a fused qkv projection's rows are ("q", "kv", "kv")).
HIDDEN, FF, Q_HEADS, KV_HEADS, VOCAB, HEAD_DIM = "hidden", "ff", "q", "kv", "vocab", "head_dim"

# Pseudo tensor of Llama-3 rope scaling: not in Hugging Face checkpoints, only in GGUFs.
ROPE_FREQS = "rope_freqs.weight"


@functools.lru_cache(maxsize=32)
def _tensor_name_map(model_arch: gguf.MODEL_ARCH, num_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(model_arch, num_layers)


class Architecture:
    """The llama family; subclasses override what their block does differently.

    Class attributes are the facts; methods derive everything else from them and a ModelConfig.
    """

    model_type: ClassVar[str] = "llama"  # config.json "model_type"
    hf_class: ClassVar[str] = "LlamaForCausalLM"  # config.json "architectures"[0]
    gguf_arch: ClassVar[str] = "llama"  # general.architecture
    # llama.cpp's "llama" graph rotates interleaved pairs where Hugging Face rotates halves: q/k rows
    # are permuted on the way in (qwen2, qwen3, gemma3, phi3 use NEOX rotation, as HF does).
    rope_interleaved: ClassVar[bool] = True
    attention_bias: ClassVar[bool] = False  # q/k/v biases
    qk_norm: ClassVar[bool] = False  # per-head RMSNorm on q and k
    # llama.cpp's loader checks attn_q as n_embd x n_embd (qwen2, phi3): after padding, query
    # heads x head_dim must equal the padded hidden width exactly.
    query_width_is_hidden: ClassVar[bool] = False
    hidden_act: ClassVar[str] = "silu"
    rope_scaling_types: ClassVar[tuple[str, ...]] = ("llama3", "linear")
    # Reading a GGUF of `gguf_arch`: the first registered architecture that reads it wins.
    reads_gguf: ClassVar[bool] = True

    # ------------------------------------------------------------------------------ config
    @classmethod
    def describe(cls) -> str:
        return f"{cls.hf_class} ({cls.model_type})"

    @classmethod
    def model_arch(cls) -> gguf.MODEL_ARCH:
        """gguf-py's enum for this GGUF architecture (its tensor-name tables are keyed by it)."""
        for arch, name in gguf.MODEL_ARCH_NAMES.items():
            if name == cls.gguf_arch:
                return arch
        raise RecoverLoraError(f"internal error: gguf-py does not know architecture {cls.gguf_arch!r}")

    @classmethod
    def flat_hf_config(cls, cfg: Mapping[str, Any]) -> Mapping[str, Any]:
        """config.json in the spelling ModelConfig.from_hf_config reads (rope_theta / rope_scaling at
        the top), for architectures whose newer transformers nest them (Gemma 3: per layer type)."""
        return cfg

    @classmethod
    def check_hf_config(cls, cfg: Mapping[str, Any]) -> None:
        """Refuse config.json settings this architecture's llama.cpp graph cannot compute."""

    @classmethod
    def arch_params_from_hf(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """Hyper-parameters beyond ModelConfig's common fields (sliding windows, ...)."""
        return {}

    @classmethod
    def hf_config(cls, config) -> dict[str, Any]:
        """The config.json dict transformers builds this model from."""
        cfg = {
            "architectures": [cls.hf_class],
            "model_type": cls.model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "rms_norm_eps": config.rms_norm_eps,
            "rope_theta": config.rope_theta,
            "max_position_embeddings": config.context_length,
            "tie_word_embeddings": config.tie_word_embeddings,
            "hidden_act": cls.hidden_act,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
        }
        if config.rope_scaling is not None:
            cfg["rope_scaling"] = dict(config.rope_scaling)
        return cfg

    @classmethod
    def write_hparams(cls, writer: gguf.GGUFWriter, config) -> None:
        """Architecture-specific GGUF keys (the common ones are written by export.gguf_io)."""
        if config.rope_scaling is not None and config.rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))

    @classmethod
    def rope_dimension_count(cls, config) -> int:
        """Rotated dimensions of each head (llama.cpp's n_rot): all of them unless rotary is partial."""
        return config.head_dim

    @classmethod
    def read_hparams(cls, value: Callable[[str, Any], Any], tensor_names: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """ModelConfig fields beyond the common ones, from a GGUF's keys (`value(key, default)`,
        keys with `{arch}` filled in) and tensors: rope scaling and arch_params. `tensor_names` maps
        every GGUF tensor name to its float32 values, read only on access (Phi-3's rope factors)."""
        if value(gguf.Keys.Rope.SCALING_TYPE, None) == "linear":
            return {"rope_scaling": {"rope_type": "linear", "factor": float(value(gguf.Keys.Rope.SCALING_FACTOR, 1.0))}}
        return {}

    # ------------------------------------------------------------------------------ tensors
    @classmethod
    def block_tensor_shapes(cls, config) -> dict[str, tuple[int, ...]]:
        """Hugging Face name within `model.layers.N.` -> (out, in) shape."""
        h, hd = config.hidden_size, config.head_dim
        q_rows, kv_rows = config.num_heads * hd, config.num_kv_heads * hd
        shapes = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q_rows, h),
            "self_attn.k_proj.weight": (kv_rows, h),
            "self_attn.v_proj.weight": (kv_rows, h),
            "self_attn.o_proj.weight": (h, q_rows),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (config.intermediate_size, h),
            "mlp.up_proj.weight": (config.intermediate_size, h),
            "mlp.down_proj.weight": (h, config.intermediate_size),
        }
        if cls.attention_bias:
            shapes.update({"self_attn.q_proj.bias": (q_rows,), "self_attn.k_proj.bias": (kv_rows,), "self_attn.v_proj.bias": (kv_rows,)})
        if cls.qk_norm:
            shapes.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
        return shapes

    @classmethod
    def hf_tensor_shapes(cls, config) -> dict[str, tuple[int, ...]]:
        """Every tensor of the Hugging Face checkpoint (tied head left out), name -> shape."""
        shapes = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size), "model.norm.weight": (config.hidden_size,)}
        if not config.tie_word_embeddings:
            shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
        block = cls.block_tensor_shapes(config)
        for layer in range(config.num_layers):
            shapes.update({f"model.layers.{layer}.{name}": shape for name, shape in block.items()})
        return shapes

    @classmethod
    def extra_gguf_tensors(cls, config) -> dict[str, np.ndarray]:
        """Tensors the GGUF holds that the checkpoint does not (computed from the config)."""
        if config.rope_type == "llama3":
            return {ROPE_FREQS: llama3_rope_freq_factors(config)}
        return {}

    @classmethod
    def gguf_name(cls, hf_tensor_name: str, num_layers: int = 1) -> str:
        """'model.layers.3.mlp.gate_proj.weight' -> 'blk.3.ffn_gate.weight' (gguf-py's tables)."""
        if hf_tensor_name == ROPE_FREQS:
            return ROPE_FREQS
        layer = hf_tensor_name.split(".")[2] if hf_tensor_name.startswith("model.layers.") else "0"
        blocks = max(num_layers, int(layer) + 1) if layer.isdigit() else num_layers
        name = _tensor_name_map(cls.model_arch(), blocks).get_name(hf_tensor_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RecoverLoraError(f"tensor {hf_tensor_name!r} has no llama.cpp name for {cls.describe()}; is this checkpoint of that architecture?")
        return name

    @classmethod
    def gguf_names(cls, config) -> dict[str, str]:
        """GGUF name -> Hugging Face name for every tensor of the model (the reverse of `gguf_name`)."""
        names = {cls.gguf_name(hf, config.num_layers): hf for hf in cls.hf_tensor_shapes(config)}
        if config.tie_word_embeddings:  # a GGUF read back never has output.weight when tied
            names.pop("output.weight", None)
        else:
            names["output.weight"] = "lm_head.weight"
        for name in (*cls.extra_gguf_tensors(config), ROPE_FREQS):  # ROPE_FREQS: passed through from a GGUF
            names[name] = name
        return names

    @classmethod
    def gguf_tensor_shapes(cls, config) -> dict[str, tuple[int, ...]]:
        """GGUF name -> numpy-order shape ((out, in) for a linear) of every tensor the GGUF holds."""
        shapes = {cls.gguf_name(hf, config.num_layers): shape for hf, shape in cls.hf_tensor_shapes(config).items()}
        shapes.update({name: array.shape for name, array in cls.extra_gguf_tensors(config).items()})
        return shapes

    @classmethod
    def rotary_heads(cls, hf_tensor_name: str, config) -> int | None:
        """Head count to permute a q/k tensor by for llama.cpp, or None if stored as is."""
        if not cls.rope_interleaved:
            return None
        if hf_tensor_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return config.num_heads
        if hf_tensor_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return config.num_kv_heads
        return None

    @classmethod
    def to_gguf(cls, hf_tensor_name: str, array: np.ndarray, config) -> np.ndarray:
        """A Hugging Face tensor as llama.cpp stores it."""
        heads = cls.rotary_heads(hf_tensor_name, config)
        return array if heads is None else permute_for_llama_cpp(array, heads)

    @classmethod
    def from_gguf(cls, hf_tensor_name: str, array: np.ndarray, config) -> np.ndarray:
        """The inverse of `to_gguf`."""
        heads = cls.rotary_heads(hf_tensor_name, config)
        return array if heads is None else unpermute_from_llama_cpp(array, heads)

    @classmethod
    def lora_delta_to_gguf(cls, hf_module: str, lora_b: np.ndarray, config) -> np.ndarray:
        """LoRA B (out x r) in llama.cpp's row order: delta W = B A, so B's rows move like W's."""
        heads = cls.rotary_heads(f"{hf_module}.weight", config)
        return lora_b if heads is None else permute_for_llama_cpp(lora_b, heads)

    # ------------------------------------------------------------------------------ padding
    @classmethod
    def tensor_axes(cls, hf_tensor_name: str) -> tuple[tuple[str, ...], ...]:
        """Per axis of a tensor, the kinds of its segments (see HIDDEN, FF, Q_HEADS, ...)."""
        suffix = hf_tensor_name.rsplit(".", 2)[-2] + "." + hf_tensor_name.rsplit(".", 1)[-1]
        axes = {
            "embed_tokens.weight": ((VOCAB,), (HIDDEN,)),
            "lm_head.weight": ((VOCAB,), (HIDDEN,)),
            "q_proj.weight": ((Q_HEADS,), (HIDDEN,)),
            "k_proj.weight": ((KV_HEADS,), (HIDDEN,)),
            "v_proj.weight": ((KV_HEADS,), (HIDDEN,)),
            "o_proj.weight": ((HIDDEN,), (Q_HEADS,)),
            "q_proj.bias": ((Q_HEADS,),),
            "k_proj.bias": ((KV_HEADS,),),
            "v_proj.bias": ((KV_HEADS,),),
            "q_norm.weight": ((HEAD_DIM,),),
            "k_norm.weight": ((HEAD_DIM,),),
            "gate_proj.weight": ((FF,), (HIDDEN,)),
            "up_proj.weight": ((FF,), (HIDDEN,)),
            "down_proj.weight": ((HIDDEN,), (FF,)),
        }
        if suffix in axes:
            return axes[suffix]
        if hf_tensor_name.endswith("norm.weight"):
            return ((HIDDEN,),)
        raise RecoverLoraError(f"no padding rule for tensor {hf_tensor_name!r} of {cls.describe()}")

    @classmethod
    def is_hidden_norm(cls, hf_tensor_name: str) -> bool:
        """RMSNorms over the hidden width: padding dilutes their mean, so they are compensated."""
        return hf_tensor_name.endswith("norm.weight") and cls.tensor_axes(hf_tensor_name) == ((HIDDEN,),)

    @classmethod
    def scale_norm(cls, weight: np.ndarray, scale: np.float32) -> np.ndarray:
        """An RMSNorm weight whose output is `scale` times the original's (y = x_hat * w)."""
        return weight * scale

    @classmethod
    def adjust_padded(cls, hf_tensor_name: str, array: np.ndarray, old, new) -> np.ndarray:
        """Last touch after padding a tensor (Gemma's √hidden embedding scale needs one)."""
        return array


# ---------------------------------------------------------------------------------------------
# llama.cpp's rotary layout and Llama-3 rope scaling (facts shared by several architectures).


def permute_for_llama_cpp(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows (or biases) from Hugging Face's rotate-half layout to llama.cpp's
    interleaved rotary layout; each head's first and second halves become pairs."""
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_from_llama_cpp(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute_for_llama_cpp`."""
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_freq_factors(config) -> np.ndarray:
    """Per-frequency divisors for Llama-3.x rope scaling, as llama.cpp reads from `rope_freqs.weight`
    (same schedule as Meta's reference `apply_scaling`)."""
    import math

    s = config.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    freqs = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)
