"""HF -> GGUF conversion: every supported architecture loads in llama.cpp with torch's logits."""

from dataclasses import replace

import numpy as np
import pytest

from conftest import llama_cpp_logits, sample_tokens, torch_logits
from recover_lora.errors import RecoverLoraError
from recover_lora.export.gguf_io import read_gguf, write_gguf
from recover_lora.export.archs.base import permute_for_llama_cpp, unpermute_from_llama_cpp
from recover_lora.export.sources import load_model
from recover_lora.export.torch_model import to_hf_model


def test_rotary_permutation_round_trips():
    weight = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    permuted = permute_for_llama_cpp(weight, n_heads=2)
    assert not np.array_equal(permuted, weight)
    # Each head's first half and second half rows become interleaved pairs.
    assert np.array_equal(permuted[:4], weight[[0, 2, 1, 3]])
    assert np.array_equal(unpermute_from_llama_cpp(permuted, n_heads=2), weight)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_llama_cpp_logits_match_torch(tiny_hf_model, tmp_path, arch):
    weights = load_model(tiny_hf_model(arch))
    gguf_path = write_gguf(weights, tmp_path / f"{arch}.gguf")
    tokens = sample_tokens(48)
    reference = torch_logits(to_hf_model(weights), tokens)
    candidate = llama_cpp_logits(gguf_path, tokens)
    assert candidate.shape == reference.shape
    # llama.cpp keeps the KV cache in F16: agreement is to ~1e-4 of the logit scale, not bitwise.
    relative = np.abs(candidate - reference).max() / np.abs(reference).max()
    assert relative < 1e-3, relative
    assert (candidate.argmax(-1) == reference.argmax(-1)).mean() >= 0.95


def test_llama3_rope_scaling_matches_torch(tiny_hf_model, tmp_path):
    # Llama-3.x rope scaling reaches llama.cpp as a rope_freqs tensor of per-frequency divisors.
    scaling = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    weights = load_model(tiny_hf_model("llama", rope_parameters=scaling, max_position_embeddings=128))
    assert weights.config.rope_scaling["rope_type"] == "llama3"
    gguf_path = write_gguf(weights, tmp_path / "llama3.gguf")
    tokens = sample_tokens(64)
    reference = torch_logits(to_hf_model(weights), tokens)
    unscaled = torch_logits(to_hf_model(weights.replace(config=replace(weights.config, rope_scaling=None))), tokens)
    assert np.abs(unscaled - reference).max() / np.abs(reference).max() > 1e-2  # the scaling matters here
    candidate = llama_cpp_logits(gguf_path, tokens)
    assert np.abs(candidate - reference).max() / np.abs(reference).max() < 1e-3


def test_help_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys; from recover_lora.cli import app; print(sorted(m for m in ('torch', 'llama_cpp', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_round_trip_is_exact(tiny_hf_model, tmp_path, arch):
    original = load_model(tiny_hf_model(arch))
    back = read_gguf(write_gguf(original, tmp_path / "model.gguf"))
    assert back.config.hidden_size == original.config.hidden_size
    assert back.config.tie_word_embeddings == original.config.tie_word_embeddings
    assert set(back.tensors) == set(original.tensors) - ({"lm_head.weight"} if original.config.tie_word_embeddings else set())
    for name in back.tensors:
        assert np.array_equal(back.tensors[name], original.tensors[name]), name


def test_real_tiny_llama_generates_its_story(stories_dir, tmp_path):
    from recover_lora.runtime.llama import LlamaOptions, load_llama

    gguf_path = write_gguf(load_model(stories_dir), tmp_path / "stories.gguf")
    llm = load_llama(gguf_path, options=LlamaOptions(n_ctx=256, threads=2)).llm
    out = llm("Once upon a time, there was a little girl named Lily.", max_tokens=12, temperature=0.0)
    llm.close()
    assert "She loved to play" in out["choices"][0]["text"]


def test_unsupported_architecture_lists_supported(tiny_hf_model):
    import json

    folder = tiny_hf_model("llama")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RecoverLoraError, match=r"unsupported architecture 'gpt2'.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model(folder)
