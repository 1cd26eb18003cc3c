"""Gemma 3 (text): (1 + w) RMSNorms, four norms per block, GELU-tanh MLP, sliding-window layers.

What differs from the llama family, each checked against llama.cpp's `src/models/gemma3.cpp` and
`convert_hf_to_gguf.py` (class Gemma3Model), and transformers' `modeling_gemma3.py`:
- Hugging Face's RMSNorm computes x_hat * (1 + w); llama.cpp computes x_hat * w and stores w + 1
  for every norm, q/k norms included.
- A block is attn_norm -> attention (q/k per-head norms, NEOX rotary) -> post_attention_norm ->
  residual -> ffn_norm -> GELU-tanh gated MLP -> post_ffw_norm -> residual.
- Sliding-window layers (`layer_types`) attend to the last `sliding_window` tokens and rotate
  with their own base (`rope_local_base_freq`, no scaling); the other layers use `rope_theta`
  and any linear rope scaling. The GGUF carries the per-layer pattern as an array, so llama.cpp
  uses exactly the Hugging Face layers (its default is every sixth layer global).
- Attention scores are scaled by query_pre_attn_scalar^-1/2 in Hugging Face; llama.cpp has no key
  for it and uses head_dim (hidden / heads for its 62-layer "27B"): other values are refused.
- Both multiply the token embeddings by sqrt(hidden): padding the hidden width changes that
  factor, so the padded embedding is scaled by sqrt(h / h_pad), and with tied embeddings the
  final norm gives back what the output head (the same matrix) would lose.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from recover_lora.errors import RecoverLoraError
from recover_lora.export.archs import register
from recover_lora.export.archs.base import Architecture

SLIDING, FULL = "sliding_attention", "full_attention"
# llama.cpp's default without a pattern key (llama_model_gemma3::load_arch_hparams: load_swa_pattern(ml, 6))
# and transformers' Gemma3TextConfig default: layer i is global when (i + 1) % 6 == 0.
DEFAULT_SLIDING_WINDOW_PATTERN = 6
# llama.cpp's default base of sliding layers when a GGUF has no rope.freq_base_swa (llama_hparams).
LLAMA_CPP_DEFAULT_FREQ_BASE_SWA = 10000.0
# llama.cpp scales queries by hidden / heads instead of head_dim for this block count (LLM_TYPE_27B).
LLAMA_CPP_27B_LAYERS = 62
EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"


def _periodic_layer_types(num_layers: int, period: int) -> list[str]:
    return [SLIDING if period == 0 or (i + 1) % period else FULL for i in range(num_layers)]


def llama_cpp_query_scalar(num_layers: int, hidden_size: int, num_heads: int, head_dim: int) -> int:
    """The query_pre_attn_scalar llama.cpp's gemma3 graph uses (it has no key for it)."""
    return hidden_size // num_heads if num_layers == LLAMA_CPP_27B_LAYERS else head_dim


@register
class Gemma3(Architecture):
    model_type = "gemma3_text"
    hf_class = "Gemma3ForCausalLM"
    gguf_arch = "gemma3"
    rope_interleaved = False
    qk_norm = True
    hidden_act = "gelu_pytorch_tanh"
    rope_scaling_types = ("linear",)

    # ------------------------------------------------------------------------------ config
    @classmethod
    def flat_hf_config(cls, cfg):
        """transformers >= 5 writes rope_parameters per layer type; read them as rope_theta,
        rope_scaling (global layers) and rope_local_base_freq (sliding layers)."""
        rope = cfg.get("rope_parameters") or {}
        if FULL not in rope and SLIDING not in rope:
            return cfg
        flat = {k: v for k, v in cfg.items() if k != "rope_parameters"}
        full, local = dict(rope.get(FULL) or {}), dict(rope.get(SLIDING) or {})
        if local.get("rope_type", "default") != "default":
            raise RecoverLoraError(
                f"gemma3 sliding layers with rope type {local['rope_type']!r} are not supported: llama.cpp scales only the global layers"
            )
        flat["rope_local_base_freq"] = local.get("rope_theta", LLAMA_CPP_DEFAULT_FREQ_BASE_SWA)
        if "rope_theta" in full:
            flat["rope_theta"] = full.pop("rope_theta")
        flat["rope_scaling"] = full if full.get("rope_type", "default") != "default" else None
        return flat

    @classmethod
    def check_hf_config(cls, cfg):
        refusals = {
            "attn_logit_softcapping": "attention logit soft-capping (llama.cpp's gemma3 graph has none)",
            "use_bidirectional_attention": "bidirectional attention (llama.cpp's gemma3 graph is causal)",
            "attention_bias": "q/k/v/o biases (llama.cpp's gemma3 graph has none)",
        }
        for key, what in refusals.items():
            if cfg.get(key):
                raise RecoverLoraError(f"gemma3 with {key}={cfg[key]!r} is not supported: {what}")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or cls.hidden_act
        if act != cls.hidden_act:
            raise RecoverLoraError(f"gemma3 with hidden_activation={act!r} is not supported; llama.cpp's gemma3 MLP is {cls.hidden_act}")
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        _check_query_scalar(cfg.get("query_pre_attn_scalar", head_dim), cfg["num_hidden_layers"], cfg["hidden_size"], num_heads, head_dim)

    @classmethod
    def arch_params_from_hf(cls, cfg):
        num_layers = cfg["num_hidden_layers"]
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            period = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", DEFAULT_SLIDING_WINDOW_PATTERN))
            layer_types = _periodic_layer_types(num_layers, period)
        window = cfg.get("sliding_window")
        if not window:  # no window: every layer attends to everything
            layer_types = [FULL] * num_layers
        unknown = sorted(set(layer_types) - {SLIDING, FULL})
        if len(layer_types) != num_layers or unknown:
            raise RecoverLoraError(f"gemma3 layer_types must be {num_layers} of {SLIDING!r}/{FULL!r}; got {layer_types!r}")
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        return {
            "layer_types": list(layer_types),
            "sliding_window": int(window) if window else None,
            "rope_local_base_freq": float(cfg.get("rope_local_base_freq", LLAMA_CPP_DEFAULT_FREQ_BASE_SWA)),
            "query_pre_attn_scalar": cfg.get("query_pre_attn_scalar", head_dim),
            "final_logit_softcapping": cfg.get("final_logit_softcapping"),
        }

    @classmethod
    def hf_config(cls, config):
        p = config.arch_params
        return {
            **super().hf_config(config),
            "hidden_activation": cls.hidden_act,
            "layer_types": list(p["layer_types"]),
            # transformers needs a window even when no layer slides; it is then unused.
            "sliding_window": p["sliding_window"] or config.context_length,
            "rope_local_base_freq": p["rope_local_base_freq"],
            "query_pre_attn_scalar": p["query_pre_attn_scalar"],
            "final_logit_softcapping": p["final_logit_softcapping"],
            "attn_logit_softcapping": None,
            "attention_bias": False,
            "use_bidirectional_attention": False,
        }

    @classmethod
    def write_hparams(cls, writer: gguf.GGUFWriter, config) -> None:
        super().write_hparams(writer, config)
        p = config.arch_params
        # The file fixes the attention scale llama.cpp will use: check it on the (padded) config it describes.
        _check_query_scalar(p["query_pre_attn_scalar"], config.num_layers, config.hidden_size, config.num_heads, config.head_dim)
        sliding = [t == SLIDING for t in p["layer_types"]]
        if any(sliding):
            writer.add_sliding_window(p["sliding_window"])
            writer.add_sliding_window_pattern(sliding)  # one bool per layer (llama_model_base::load_swa_pattern)
            writer.add_rope_freq_base_swa(p["rope_local_base_freq"])
        if p["final_logit_softcapping"]:
            writer.add_final_logit_softcapping(float(p["final_logit_softcapping"]))

    @classmethod
    def read_hparams(cls, value, tensor_names):
        params = super().read_hparams(value, tensor_names)
        num_layers = int(value(gguf.Keys.LLM.BLOCK_COUNT, 0))
        hidden = int(value(gguf.Keys.LLM.EMBEDDING_LENGTH, 0))
        num_heads = int(value(gguf.Keys.Attention.HEAD_COUNT, 1))
        head_dim = int(value(gguf.Keys.Attention.KEY_LENGTH, hidden // num_heads))
        window = value(gguf.Keys.Attention.SLIDING_WINDOW, None)
        if window:  # as llama.cpp reads it: an array of per-layer flags, or a period (default 6)
            pattern = value(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN, DEFAULT_SLIDING_WINDOW_PATTERN)
            if isinstance(pattern, list):
                layer_types = [SLIDING if flag else FULL for flag in pattern][:num_layers]
            else:
                layer_types = [SLIDING if int(pattern) == 0 or i % int(pattern) < int(pattern) - 1 else FULL for i in range(num_layers)]
        else:
            layer_types = [FULL] * num_layers
        softcap = value(gguf.Keys.LLM.FINAL_LOGIT_SOFTCAPPING, None)
        params["arch_params"] = {
            "layer_types": layer_types,
            "sliding_window": int(window) if window else None,
            "rope_local_base_freq": float(value(gguf.Keys.Rope.FREQ_BASE_SWA, LLAMA_CPP_DEFAULT_FREQ_BASE_SWA)),
            "query_pre_attn_scalar": llama_cpp_query_scalar(num_layers, hidden, num_heads, head_dim),
            "final_logit_softcapping": float(softcap) if softcap else None,
        }
        return params

    # ------------------------------------------------------------------------------ tensors
    @classmethod
    def block_tensor_shapes(cls, config):
        h = config.hidden_size
        return {**super().block_tensor_shapes(config), "pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,)}

    @classmethod
    def to_gguf(cls, hf_tensor_name, array, config):
        # llama.cpp's norms compute x_hat * w: every Gemma norm is stored as 1 + w (convert_hf_to_gguf's norm_shift).
        return array + np.float32(1.0) if hf_tensor_name.endswith("norm.weight") else array

    @classmethod
    def from_gguf(cls, hf_tensor_name, array, config):
        return array - np.float32(1.0) if hf_tensor_name.endswith("norm.weight") else array

    # ------------------------------------------------------------------------------ padding
    @classmethod
    def scale_norm(cls, weight, scale):
        return (np.float32(1.0) + weight) * scale - np.float32(1.0)  # (1 + w') = (1 + w) * scale

    @classmethod
    def adjust_padded(cls, hf_tensor_name, array, old, new):
        if new.hidden_size == old.hidden_size:
            return array
        # Embeddings are multiplied by sqrt(hidden) in both graphs: keep sqrt(h) * e exactly.
        scale = np.float32(math.sqrt(old.hidden_size / new.hidden_size))
        if hf_tensor_name == EMBEDDING:
            return array * scale
        if hf_tensor_name == FINAL_NORM and old.tie_word_embeddings:
            # The output head is that scaled embedding too: the final norm (already compensated for the
            # padded mean like every hidden norm) gives the factor back on the real hidden channels.
            array = array.copy()
            array[: old.hidden_size] = cls.scale_norm(array[: old.hidden_size], np.float32(1.0) / scale)
        return array


def _check_query_scalar(scalar, num_layers: int, hidden_size: int, num_heads: int, head_dim: int) -> None:
    expected = llama_cpp_query_scalar(num_layers, hidden_size, num_heads, head_dim)
    if float(scalar) != float(expected):
        raise RecoverLoraError(
            f"gemma3 with query_pre_attn_scalar={scalar} is not supported: llama.cpp scales queries by "
            f"1/sqrt({expected}) for this shape ({num_layers} layers, hidden {hidden_size}, {num_heads} heads, head_dim {head_dim})"
        )

