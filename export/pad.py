"""Exact width padding so every linear row is a multiple of llama.cpp's K-quant block (256).

llama.cpp's K-quants need each row (a linear layer's input width) to be a multiple of 256
and silently fall back to Q4_0/Q5_0/Q8_0 otherwise; SmolLM2-135M (hidden 576) gets not one
K-quant tensor without this. Padding adds zero rows/columns so the padded model computes the
same logits:
- hidden h -> h_pad: zero columns in every input projection and the embeddings, zero rows in
  every output projection, so the extra residual channels stay exactly zero;
- RMSNorm sees a mean over h_pad values, h/h_pad of the true mean: weights x sqrt(h/h_pad) and
  epsilon x h/h_pad restore the same output;
- intermediate f -> f_pad: zero gate/up rows give silu(0) * 0 = 0 into zero down columns;
- attention: o_proj's input width is heads x head_dim; we add whole zero query heads plus zero
  KV heads (keeping heads per KV head), since a zero query attends uniformly to zero values.
The head dimension stays as it is and is written explicitly into the GGUF.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from recover_lora.errors import RecoverLoraError
from recover_lora.export.model import LazyTensors, ModelConfig, ModelWeights

K_QUANT_BLOCK = 256  # QK_K in ggml-common.h


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def padded_config(config: ModelConfig, multiple: int = K_QUANT_BLOCK) -> ModelConfig:
    """The config after padding every linear input width to a multiple of `multiple`."""
    hidden = _round_up(config.hidden_size, multiple)
    intermediate = _round_up(config.intermediate_size, multiple)
    group = config.heads_per_kv_head
    # Smallest number of whole KV groups whose query width is a multiple of the block.
    groups_step = multiple // math.gcd(group * config.head_dim, multiple)
    kv_heads = _round_up(config.num_kv_heads, groups_step)
    if hidden != config.hidden_size and config.arch.qk_norm:
        raise RecoverLoraError(
            f"cannot pad {config.model_type} hidden {config.hidden_size} -> {hidden} exactly: its per-head q/k "
            "RMSNorm shares the epsilon that padding must rescale; export with --pad none and non-K-quant types"
        )
    return replace(
        config,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_heads=kv_heads * group,
        num_kv_heads=kv_heads,
        rms_norm_eps=config.rms_norm_eps if hidden == config.hidden_size else config.rms_norm_eps * config.hidden_size / hidden,
    )


def needs_padding(config: ModelConfig, multiple: int = K_QUANT_BLOCK) -> bool:
    return padded_config(config, multiple) != config


def linear_row_widths(config: ModelConfig) -> dict[str, int]:
    """Input width (ggml row length) of each linear kind, by llama.cpp tensor suffix."""
    return {
        "attn_q": config.hidden_size,
        "attn_k": config.hidden_size,
        "attn_v": config.hidden_size,
        "attn_output": config.num_heads * config.head_dim,
        "ffn_gate": config.hidden_size,
        "ffn_up": config.hidden_size,
        "ffn_down": config.intermediate_size,
        "token_embd": config.hidden_size,
        "output": config.hidden_size,
    }


def _pad_to(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if array.shape == shape:
        return array
    return np.pad(array, [(0, target - size) for size, target in zip(array.shape, shape)])


def pad_model(weights: ModelWeights, multiple: int = K_QUANT_BLOCK) -> ModelWeights:
    """Pad hidden, intermediate and attention widths to multiples of `multiple`, exactly.

    Example:
        padded = pad_model(load_model())   # SmolLM2-135M: hidden 576 -> 768, heads 9/3 -> 12/4
    """
    old = weights.config
    new = padded_config(old, multiple)
    if new == old:
        return weights
    h, hd = new.hidden_size, old.head_dim
    q_rows, kv_rows = new.num_heads * hd, new.num_kv_heads * hd
    norm_scale = np.float32(math.sqrt(old.hidden_size / h))
    # Target shape per Hugging Face tensor suffix (heads are appended after the existing ones, so
    # query head i still reads KV head i // heads_per_kv_head).
    shapes = {
        "embed_tokens.weight": (old.vocab_size, h),
        "lm_head.weight": (old.vocab_size, h),
        "q_proj.weight": (q_rows, h),
        "k_proj.weight": (kv_rows, h),
        "v_proj.weight": (kv_rows, h),
        "o_proj.weight": (h, q_rows),
        "q_proj.bias": (q_rows,),
        "k_proj.bias": (kv_rows,),
        "v_proj.bias": (kv_rows,),
        "gate_proj.weight": (new.intermediate_size, h),
        "up_proj.weight": (new.intermediate_size, h),
        "down_proj.weight": (h, new.intermediate_size),
    }
    hidden_norms = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")

    def pad(name: str, array: np.ndarray) -> np.ndarray:
        if name.endswith(hidden_norms):
            return _pad_to(array * norm_scale, (h,))
        for suffix, shape in shapes.items():
            if name.endswith(suffix):
                return _pad_to(array, shape)
        return array  # q_norm / k_norm act on head_dim, which does not change; rope factors too

    unpadded = {
        "hidden_size": old.hidden_size,
        "intermediate_size": old.intermediate_size,
        "num_heads": old.num_heads,
        "num_kv_heads": old.num_kv_heads,
    }
    tensors = weights.tensors if isinstance(weights.tensors, LazyTensors) else LazyTensors.from_arrays(weights.tensors)
    return replace(weights, config=new, tensors=tensors.map(pad), unpadded=unpadded)
