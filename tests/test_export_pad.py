"""Width padding is exact: same logits in torch and in llama.cpp (F32)."""

import numpy as np
import pytest

from conftest import llama_cpp_logits, sample_tokens, torch_logits
from recover_lora.errors import RecoverLoraError
from recover_lora.export.gguf_io import read_gguf, write_gguf
from recover_lora.export.model import ModelConfig
from recover_lora.export.pad import pad_model, padded_config
from recover_lora.export.sources import load_model
from recover_lora.export.torch_model import to_hf_model


def _config(**overrides):
    base = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e5,
                context_length=8192, tie_word_embeddings=True)
    return ModelConfig(**{**base, **overrides})


def test_padded_config_of_the_default_model_shape():
    padded = padded_config(_config())
    assert (padded.hidden_size, padded.intermediate_size) == (768, 1536)
    # One zero query head per KV group (3 x 3 -> 3 x 4): the KV heads and the KV cache stay as they are.
    assert (padded.num_heads, padded.num_kv_heads, padded.head_dim) == (12, 3, 64)
    assert padded.rms_norm_eps == pytest.approx(1e-5 * 576 / 768)
    shapes = padded.arch.gguf_tensor_shapes(padded)
    assert all(shape[-1] % 256 == 0 for name, shape in shapes.items() if len(shape) == 2)


def test_padded_config_of_stories260k_shape():
    padded = padded_config(_config(hidden_size=64, intermediate_size=172, num_heads=8, num_kv_heads=4, head_dim=8))
    assert (padded.hidden_size, padded.intermediate_size) == (256, 256)
    # Zero query heads go inside the KV groups (2 -> 8 per group): KV heads, and so the KV cache, stay 4.
    assert (padded.num_heads, padded.num_kv_heads) == (32, 4)
    assert padded.num_heads * padded.head_dim % 256 == 0


def test_aligned_config_is_left_alone():
    config = _config(hidden_size=2560, intermediate_size=9728, num_heads=32, num_kv_heads=8, head_dim=128)
    assert padded_config(config) == config


def test_qwen3_hidden_padding_with_a_large_shared_epsilon_is_refused():
    with pytest.raises(RecoverLoraError, match="epsilon"):
        padded_config(_config(model_type="qwen3", rms_norm_eps=1e-4))


def test_qwen3_padding_with_a_small_epsilon_is_exact_in_torch_and_llama_cpp(tiny_hf_model, tmp_path):
    """q/k norms share the rescaled epsilon in llama.cpp; at 1e-6 the difference is below float32 resolution."""
    tokens = sample_tokens(40)
    original = load_model(tiny_hf_model("qwen3", hidden=192, intermediate=320, rms_norm_eps=1e-6))
    padded = pad_model(original)
    assert padded.config.hidden_size == 256
    reference = torch_logits(to_hf_model(original), tokens)
    _assert_same_logits(reference, torch_logits(to_hf_model(padded), tokens), 1e-5)
    write_gguf(padded, tmp_path / "padded.gguf")
    _assert_same_logits(reference, llama_cpp_logits(tmp_path / "padded.gguf", tokens), 1e-3)


def _assert_same_logits(reference: np.ndarray, candidate: np.ndarray, max_relative: float):
    scale = np.abs(reference).max()
    assert np.abs(reference - candidate).max() / scale < max_relative
    assert (reference.argmax(-1) == candidate.argmax(-1)).mean() == 1.0


def test_padding_is_exact_in_torch(stories_dir):
    tokens = sample_tokens(64)
    original = load_model(stories_dir)
    padded = pad_model(original)
    assert padded.config.hidden_size == 256
    _assert_same_logits(torch_logits(to_hf_model(original), tokens), torch_logits(to_hf_model(padded), tokens), 1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_padding_is_exact_on_random_models(tiny_hf_model, arch):
    tokens = sample_tokens(40)
    # 6 query heads of 32 (2 KV heads): qwen2's loader needs heads x 32 = 256, i.e. 8 heads in groups of 4.
    original = load_model(tiny_hf_model(arch, hidden=192, intermediate=320, num_attention_heads=6, head_dim=32))
    padded = pad_model(original)
    assert (padded.config.hidden_size, padded.config.intermediate_size) == (256, 512)
    _assert_same_logits(torch_logits(to_hf_model(original), tokens), torch_logits(to_hf_model(padded), tokens), 1e-5)


def test_padding_is_exact_in_llama_cpp(stories_dir, tmp_path):
    tokens = sample_tokens(64)
    original = load_model(stories_dir)
    write_gguf(original, tmp_path / "original.gguf")
    write_gguf(pad_model(original), tmp_path / "padded.gguf")
    reference = llama_cpp_logits(tmp_path / "original.gguf", tokens)
    # F16 KV cache in llama.cpp: ~1e-4 of the logit scale (measured 1.3e-4 here; 4e-4 on SmolLM2).
    _assert_same_logits(reference, llama_cpp_logits(tmp_path / "padded.gguf", tokens), 1e-3)
    # The padded file remembers what it was padded from.
    assert read_gguf(tmp_path / "padded.gguf").unpadded == {
        "hidden_size": 64, "intermediate_size": 172, "num_heads": 8, "num_kv_heads": 4,
    }
