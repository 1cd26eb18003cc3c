"""Qwen3: per-head q/k RMSNorm, NEOX rotary, no biases."""

from __future__ import annotations

from recover_lora.export.archs import register
from recover_lora.export.archs.base import Architecture


@register
class Qwen3(Architecture):
    model_type = "qwen3"
    hf_class = "Qwen3ForCausalLM"
    gguf_arch = "qwen3"
    rope_interleaved = False
    qk_norm = True

    @classmethod
    def hf_config(cls, config):
        return {**super().hf_config(config), "use_sliding_window": False}
