"""Shared test fixtures: tiny real and random models, all built offline inside the tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
STORIES_DIR = FIXTURES / "stories260K"  # tiny real Llama (MIT, see its README.md)

# Tiny random configs, one per supported architecture (hidden 256 keeps K-quants possible;
# the stories260K tokenizer's 512 pieces serve as vocabulary).
TINY_CONFIGS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=False, use_sliding_window=False),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], tie_word_embeddings=True, use_sliding_window=False),
    # Phi3Config's pad_token_id defaults to 32000, past the tiny vocabulary.
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"], tie_word_embeddings=False, pad_token_id=None),
    # Gemma-3-270M's head layout (4:1 heads of 256); 6 layers, two of them global, a window of 8.
    "gemma3": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], tie_word_embeddings=True,
                   num_hidden_layers=6, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=8,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                   rope_theta=10000.0, rope_local_base_freq=100.0, rms_norm_eps=1e-6),
}


def torch_threads():
    import torch

    torch.set_num_threads(2)
    return torch


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return STORIES_DIR


@pytest.fixture(scope="session")
def stories_gateup(tmp_path_factory) -> Path:
    """stories260K exported under the gateup policy (padded to K-quant widths); read it, never change it."""
    from recover_lora.export.quantize import export_model

    torch_threads()
    return export_model(STORIES_DIR, tmp_path_factory.mktemp("stories-gateup") / "stories.gateup.gguf", "gateup", threads=2).path


def make_tiny_hf_model(
    folder: Path, arch: str, seed: int = 0, hidden: int = 256, intermediate: int = 512, **config_overrides
) -> Path:
    """Save a random-initialised model of `arch` with the stories260K tokenizer into `folder`."""
    torch = torch_threads()
    import transformers

    base = dict(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    spec = dict(TINY_CONFIGS[arch])
    model_type = spec.pop("model_type")
    spec.pop("architectures")
    config = transformers.AutoConfig.for_model(model_type, **{**base, **spec, **config_overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms and biases away from their init values so they are tested
        for name, param in model.named_parameters():
            if param.ndim == 1:  # a norm's init is 1 (llama) or 0 (Gemma's 1 + w): perturb around it
                param.copy_(param + 0.1 * torch.randn_like(param) if "norm" in name else 0.1 * torch.randn_like(param))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(STORIES_DIR / name, folder / name)
    return folder


@pytest.fixture
def tiny_hf_model(tmp_path):
    """Factory: tiny_hf_model("qwen2") -> folder of a random tiny Qwen2 model."""

    def build(arch: str, **kwargs) -> Path:
        return make_tiny_hf_model(tmp_path / f"tiny-{arch}", arch, **kwargs)

    return build


def llama_cpp_logits(gguf_path: Path, tokens: list[int], lora_path: Path | None = None, f32_kv_cache: bool = False) -> np.ndarray:
    """All-position logits of `tokens` from llama.cpp (CPU, F32 accumulation).

    `f32_kv_cache`: keys and values in F32 instead of llama.cpp's default F16, which rounds them at ~1e-3;
    for comparisons of adapter and student maths that must be tight.
    """
    from recover_lora.runtime.llama import LlamaOptions, load_llama

    options = LlamaOptions(n_ctx=max(64, len(tokens) + 8), n_batch=512, logits_all=True, threads=2, kv_cache_f32=f32_kv_cache)
    llm = load_llama(gguf_path, lora_path, options).llm
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return logits


def torch_logits(model, tokens: list[int]) -> np.ndarray:
    torch = torch_threads()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def sample_tokens(n: int = 48, vocab: int = 512, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, vocab, size=n - 1).tolist()
