"""HF -> GGUF conversion: every supported architecture loads in llama.cpp with torch's logits."""

import numpy as np
import pytest

from conftest import llama_cpp_logits, sample_tokens, torch_logits
from recover_lora.errors import RecoverLoraError
from recover_lora.export.gguf_io import read_gguf, write_gguf
from recover_lora.export.model import permute_for_llama_cpp, unpermute_from_llama_cpp
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
    import llama_cpp

    gguf_path = write_gguf(load_model(stories_dir), tmp_path / "stories.gguf")
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, n_threads=2, verbose=False)
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
