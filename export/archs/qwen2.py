"""Qwen2 / Qwen2.5: q/k/v biases, NEOX rotary, and a loader that ties the query width to n_embd."""

from __future__ import annotations

from recover_lora.errors import RecoverLoraError
from recover_lora.export.archs import register
from recover_lora.export.archs.base import Architecture


@register
class Qwen2(Architecture):
    model_type = "qwen2"
    hf_class = "Qwen2ForCausalLM"
    gguf_arch = "qwen2"
    rope_interleaved = False
    attention_bias = True
    # llama.cpp's qwen2 loader checks attn_q as n_embd x n_embd whatever attention.key_length says.
    query_width_is_hidden = True

    @classmethod
    def check_hf_config(cls, cfg):
        if cfg.get("use_sliding_window"):
            raise RecoverLoraError("qwen2 with use_sliding_window=true is not supported by llama.cpp's qwen2 graph")

    @classmethod
    def hf_config(cls, config):
        return {**super().hf_config(config), "use_sliding_window": False}
