"""Llama (SmolLM2, TinyLlama, Llama-2/3.x) and Mistral: the base llama family as it is."""

from __future__ import annotations

from recover_lora.export.archs import register
from recover_lora.export.archs.base import Architecture


@register
class Llama(Architecture):
    @classmethod
    def hf_config(cls, config):
        return {**super().hf_config(config), "attention_bias": False, "mlp_bias": False}


@register
class Mistral(Architecture):
    model_type = "mistral"
    hf_class = "MistralForCausalLM"
    reads_gguf = False  # llama.cpp runs Mistral as "llama"; a GGUF reads back as Llama
