"""Phi-3 / Phi-3.5 / Phi-4-mini (`Phi3ForCausalLM`, GGUF "phi3"): fused projections, partial NEOX rotary, LongRoPE.

What differs from the llama family (llama.cpp src/models/phi3.cpp, conversion/phi.py Phi3MiniModel;
transformers models/phi3):
- one fused `qkv_proj` (rows q | k | v) -> `attn_qkv`, and one fused `gate_up_proj` (rows gate | up)
  -> `ffn_up`, which llama.cpp's loader expects as {n_embd, 2 n_ff} with no `ffn_gate`; its SWIGLU
  takes silu of the first half times the second, as transformers' `chunk(2)` does. Every policy,
  LoRA target and adapter tensor therefore names the fused tensors (the gateup policy puts the whole
  `ffn_up` at 2 bits, because it *is* gate and up).
- NEOX rotary (no row permutation) over `head_dim x partial_rotary_factor` dimensions (Phi-4-mini:
  0.75 -> 96 of 128), written as `rope.dimension_count`.
- LongRoPE ("longrope", older "su"): per-frequency divisors `rope_factors_long/short.weight` and
  `rope.scaling.attn_factor` (transformers' attention_scaling, here computed as transformers does,
  so torch and llama.cpp agree even where a config sets `factor` or `attention_factor`). llama.cpp
  takes the long factors when the context size exceeds `rope.scaling.original_context_length`,
  transformers when the sequence does: they agree whenever the sequence and the context are on the
  same side of it (always while context <= original_max_position_embeddings).
- `sliding_window` is accepted and dropped: llama.cpp's phi3 graph turns Phi SWA off ("Phi SWA is
  currently disabled", llama.cpp PR 13676) and attends to the whole context, so the GGUF carries no
  window and the torch teacher/student attend fully as well, computing what llama.cpp deploys. This
  differs from the Hugging Face reference only past the window (Phi-3-mini-4k: 2047 tokens; Phi-3.5
  and Phi-4-mini: 262144, beyond their context).
- llama.cpp's loader checks attn_output as n_embd x n_embd: query heads x head_dim must equal the
  hidden width, before and after padding (`query_width_is_hidden`). No biases.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from recover_lora.errors import RecoverLoraError
from recover_lora.export.archs import register
from recover_lora.export.archs.base import FF, HIDDEN, KV_HEADS, Q_HEADS, Architecture

ROPE_FACTORS_LONG = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight"
ROPE_FACTORS_SHORT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight"
LONGROPE_TYPES = ("longrope", "su")  # "su" is the earlier name of the same scheme (transformers maps it)


def _rope_dims(head_dim: int, partial_rotary_factor: float) -> int:
    return int(head_dim * partial_rotary_factor)  # as transformers' rotary embedding and llama.cpp's converter


def _is_longrope(config) -> bool:
    return config.rope_type in LONGROPE_TYPES


def longrope_attention_factor(config) -> float:
    """transformers' `_compute_longrope_parameters` attention scaling: the config's attention_factor, else
    sqrt(1 + ln(factor) / ln(original context)) with factor = rope `factor` or context / original context."""
    scaling = config.rope_scaling
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = config.arch_params["original_max_position_embeddings"]
    factor = scaling.get("factor") or config.context_length / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


@register
class Phi3(Architecture):
    model_type = "phi3"
    hf_class = "Phi3ForCausalLM"
    gguf_arch = "phi3"
    rope_interleaved = False
    query_width_is_hidden = True
    rope_scaling_types = LONGROPE_TYPES

    # ------------------------------------------------------------------------------ config
    @classmethod
    def check_hf_config(cls, cfg):
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or hidden // heads
        if heads * head_dim != hidden:
            raise RecoverLoraError(
                f"phi3 with {heads} heads x head_dim {head_dim} != hidden_size {hidden} is not supported: "
                "llama.cpp's phi3 loader needs the query width to equal the hidden width"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise RecoverLoraError(f"phi3 with hidden_act={cfg['hidden_act']!r} is not supported: llama.cpp's phi3 graph uses SwiGLU (silu)")
        params = cls.arch_params_from_hf(cfg)
        rope_dims = _rope_dims(head_dim, params["partial_rotary_factor"])
        if rope_dims <= 0 or rope_dims % 2:
            raise RecoverLoraError(
                f"phi3 partial_rotary_factor {params['partial_rotary_factor']} gives {rope_dims} rotary dimensions of head_dim "
                f"{head_dim}; it must be a positive even number"
            )
        scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        if scaling.get("rope_type", scaling.get("type")) in LONGROPE_TYPES:
            for key in ("long_factor", "short_factor"):
                if len(scaling.get(key) or ()) != rope_dims // 2:
                    raise RecoverLoraError(
                        f"phi3 rope scaling {key} has {len(scaling.get(key) or ())} values; {rope_dims} rotary dimensions need {rope_dims // 2}"
                    )

    @classmethod
    def arch_params_from_hf(cls, cfg):
        rope = {**(cfg.get("rope_parameters") or {}), **(cfg.get("rope_scaling") or {})}
        factor = cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
        # transformers gives the top-level original_max_position_embeddings priority (Phi-3 keeps it there).
        original = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        return {
            "partial_rotary_factor": float(factor),
            "original_max_position_embeddings": int(original or cfg.get("max_position_embeddings", 2048)),
        }

    @classmethod
    def hf_config(cls, config):
        params = config.arch_params
        cfg = {
            **super().hf_config(config),
            "pad_token_id": None,  # Phi3Config defaults to 32000, past a small vocabulary
            "sliding_window": None,  # llama.cpp attends fully (see the module docstring)
            "partial_rotary_factor": params["partial_rotary_factor"],
            "original_max_position_embeddings": params["original_max_position_embeddings"],
        }
        if _is_longrope(config):
            scaling = config.rope_scaling
            cfg["rope_scaling"] = {
                "rope_type": "longrope",
                "long_factor": [float(x) for x in scaling["long_factor"]],
                "short_factor": [float(x) for x in scaling["short_factor"]],
                # Explicit, as llama.cpp reads it; `factor` only silences transformers' advice to set it.
                "attention_factor": longrope_attention_factor(config),
                "factor": scaling.get("factor") or config.context_length / params["original_max_position_embeddings"],
            }
        return cfg

    @classmethod
    def rope_dimension_count(cls, config):
        return _rope_dims(config.head_dim, config.arch_params["partial_rotary_factor"])

    @classmethod
    def write_hparams(cls, writer, config):
        writer.add_rope_scaling_orig_ctx_len(config.arch_params["original_max_position_embeddings"])
        if _is_longrope(config):
            writer.add_rope_scaling_attn_factors(longrope_attention_factor(config))

    @classmethod
    def read_hparams(cls, value, tensors):
        heads = int(value(gguf.Keys.Attention.HEAD_COUNT, 1))
        head_dim = int(value(gguf.Keys.Attention.KEY_LENGTH, None) or int(value(gguf.Keys.LLM.EMBEDDING_LENGTH, 0)) // heads)
        rope_dims = int(value(gguf.Keys.Rope.DIMENSION_COUNT, head_dim))
        factor = rope_dims / head_dim
        if _rope_dims(head_dim, factor) != rope_dims:  # float rounding below the integer
            factor = math.nextafter(factor, 2.0)
        context = int(value(gguf.Keys.LLM.CONTEXT_LENGTH, 2048))
        params = {
            "partial_rotary_factor": factor,
            "original_max_position_embeddings": int(value(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN, context)),
        }
        rope_scaling = None
        if ROPE_FACTORS_LONG in tensors and ROPE_FACTORS_SHORT in tensors:
            rope_scaling = {
                "rope_type": "longrope",
                "long_factor": np.asarray(tensors[ROPE_FACTORS_LONG], dtype=np.float32).reshape(-1).tolist(),
                "short_factor": np.asarray(tensors[ROPE_FACTORS_SHORT], dtype=np.float32).reshape(-1).tolist(),
                "attention_factor": float(value(gguf.Keys.Rope.SCALING_ATTN_FACTOR, 1.0)),
            }
        return {"rope_scaling": rope_scaling, "arch_params": params}

    # ------------------------------------------------------------------------------ tensors
    @classmethod
    def block_tensor_shapes(cls, config):
        h, ff = config.hidden_size, config.intermediate_size
        q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        return {
            "input_layernorm.weight": (h,),
            "self_attn.qkv_proj.weight": (q_rows + 2 * kv_rows, h),
            "self_attn.o_proj.weight": (h, q_rows),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_up_proj.weight": (2 * ff, h),
            "mlp.down_proj.weight": (h, ff),
        }

    @classmethod
    def extra_gguf_tensors(cls, config):
        if not _is_longrope(config):
            return {}
        scaling = config.rope_scaling
        return {
            ROPE_FACTORS_LONG: np.asarray(scaling["long_factor"], dtype=np.float32),
            ROPE_FACTORS_SHORT: np.asarray(scaling["short_factor"], dtype=np.float32),
        }

    @classmethod
    def tensor_axes(cls, hf_tensor_name):
        # Fused rows pad segment by segment: q heads inside their KV groups, then k, then v; gate, then up.
        if hf_tensor_name.endswith("self_attn.qkv_proj.weight"):
            return ((Q_HEADS, KV_HEADS, KV_HEADS), (HIDDEN,))
        if hf_tensor_name.endswith("mlp.gate_up_proj.weight"):
            return ((FF, FF), (HIDDEN,))
        return super().tensor_axes(hf_tensor_name)
