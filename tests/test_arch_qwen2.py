"""Qwen2 padding that llama.cpp loads: its loader wants attn_q as n_embd x n_embd, so padded query
heads x head_dim must equal the padded hidden width (Qwen2.5-0.5B: 896 -> 1024 = 16 heads of 64)."""

import numpy as np
import pytest

from conftest import llama_cpp_logits, sample_tokens, torch_logits
from recover_lora.errors import RecoverLoraError
from recover_lora.export.gguf_io import write_gguf
from recover_lora.export.model import ModelConfig
from recover_lora.export.pad import pad_model, padded_config
from recover_lora.export.quantize import export_model
from recover_lora.export.sources import load_model
from recover_lora.export.torch_model import to_hf_model


def _qwen2_config(**overrides):
    # Qwen2.5-0.5B-Instruct's geometry (config.json of the Hugging Face checkpoint).
    base = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6,
                context_length=32768, tie_word_embeddings=True)
    return ModelConfig(**{**base, **overrides})


def test_qwen2_0_5b_pads_to_query_width_equal_to_hidden():
    padded = padded_config(_qwen2_config())
    assert (padded.hidden_size, padded.intermediate_size) == (1024, 4864)  # 4864 = 19 x 256 already
    # One zero query head per KV group (7 -> 8): 16 x 64 = 1024 = n_embd; KV heads stay 2.
    assert (padded.num_heads, padded.num_kv_heads) == (16, 2)
    shapes = padded.arch.gguf_tensor_shapes(padded)
    assert shapes["blk.0.attn_q.weight"] == (1024, 1024) and shapes["blk.0.attn_k.weight"] == (128, 1024)
    assert shapes["blk.0.attn_output.weight"] == (1024, 1024)


def test_qwen2_padding_without_an_exact_layout_is_refused_before_work():
    # 15 query heads in 3 groups of 5, head_dim 64, hidden 960 -> 1024 = 16 heads: no whole groups of >= 5 fit.
    with pytest.raises(RecoverLoraError, match="cannot pad qwen2 exactly.*query heads x head_dim"):
        padded_config(_qwen2_config(hidden_size=960, num_heads=15, num_kv_heads=3))


def _tiny_qwen2(tiny_hf_model):
    # The real model's ratios: 7 query heads per KV head, q/k/v biases; hidden 224 = 14 x 16 -> 256 = 16 x 16.
    return tiny_hf_model("qwen2", hidden=224, intermediate=320, num_attention_heads=14, num_key_value_heads=2, head_dim=16)


def _max_relative(reference, candidate):
    return np.abs(reference - candidate).max() / np.abs(reference).max()


def test_padded_qwen2_loads_and_matches_in_llama_cpp(tiny_hf_model, tmp_path):
    original = load_model(_tiny_qwen2(tiny_hf_model))
    padded = pad_model(original)
    assert (padded.config.num_heads, padded.config.num_kv_heads, padded.config.hidden_size) == (16, 2, 256)
    tokens = sample_tokens(40)
    reference = torch_logits(to_hf_model(original), tokens)
    assert _max_relative(reference, torch_logits(to_hf_model(padded), tokens)) < 1e-5
    write_gguf(original, tmp_path / "original.gguf")
    write_gguf(padded, tmp_path / "padded.gguf")
    in_llama_cpp = llama_cpp_logits(tmp_path / "padded.gguf", tokens)
    assert _max_relative(llama_cpp_logits(tmp_path / "original.gguf", tokens), in_llama_cpp) < 1e-3
    assert _max_relative(reference, in_llama_cpp) < 1e-3


@pytest.mark.parametrize("policy", ["w4", "gateup"])
def test_padded_qwen2_exports_load_in_llama_cpp(tiny_hf_model, tmp_path, policy):
    folder = _tiny_qwen2(tiny_hf_model)
    result = export_model(folder, tmp_path / f"{policy}.gguf", policy)
    assert result.padded
    tokens = sample_tokens(40)
    quantized = llama_cpp_logits(result.path, tokens)  # llama.cpp loads the file: shapes accepted
    reference = torch_logits(to_hf_model(load_model(folder)), tokens)
    assert np.isfinite(quantized).all()
    # Random tiny weights quantize coarsely; the padded file still tracks the model, far from noise.
    assert np.corrcoef(reference.ravel(), quantized.ravel())[0, 1] > 0.5


def test_adapter_on_padded_qwen2_matches_torch_in_llama_cpp(tiny_hf_model, tmp_path):
    """LoRA on every linear of the padded 7:1 qwen2 (NEOX rotary: no row permutation) in llama.cpp = torch."""
    from test_adapter_gguf import llama_logits, max_rel, random_lora, torch_logits

    from recover_lora.export.gguf_io import read_gguf
    from recover_lora.recovery.adapter_gguf import write_adapter_gguf

    quantized = export_model(_tiny_qwen2(tiny_hf_model), tmp_path / "gateup.gguf", "gateup", threads=2).path
    rendered = write_gguf(read_gguf(quantized), tmp_path / "gateup.f32.gguf")  # same weights, exact maths
    model, folder = random_lora(quantized, "all", tmp_path / "peft")
    adapter = write_adapter_gguf(folder, quantized, tmp_path / "adapter.gguf", dtype="f32").path
    tokens = sample_tokens(40)
    with_lora, without = torch_logits(model, tokens), torch_logits(model, tokens, adapter=False)
    assert max_rel(with_lora, without) > 0.1  # the adapter really changes the output
    assert max_rel(with_lora, llama_logits(rendered, tokens, adapter)) < 1e-4
