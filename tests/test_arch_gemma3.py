"""Gemma 3: a tiny random model with Gemma-3-270M's head layout, checked stage by stage against llama.cpp.

The model: hidden 320 (pads to 512), intermediate 640 (pads to 768), 4 query heads / 1 KV head of 256,
6 layers of which 2 are global (not llama.cpp's default period of 6, so the per-layer pattern in the
GGUF is what makes llama.cpp agree), a sliding window of 8 over 48-token inputs, a local rope base
(100) unlike the global one (10000), tied embeddings, (1 + w) norms away from their init.
llama.cpp's CPU GELU goes through an F16 lookup table and its default KV cache is F16: its logits on
the same F32 weights differ from torch by ~1e-3 of the logit scale (measured 8.7e-4 here, 4.4e-4 with an
F32 KV cache), not 1e-5.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import llama_cpp_logits, make_tiny_hf_model, sample_tokens, torch_logits, torch_threads
from recover_lora.errors import RecoverLoraError
from recover_lora.export.archs.gemma3 import FULL, SLIDING, Gemma3
from recover_lora.export.gguf_io import read_gguf, write_gguf
from recover_lora.export.model import ModelConfig
from recover_lora.export.pad import pad_model
from recover_lora.export.sources import load_model
from recover_lora.export.torch_model import to_hf_model

# llama.cpp (F16 GELU table, F16 KV cache) vs torch on the same F32 weights, relative to the logit scale.
F32_FILE_MAX_RELATIVE = 2e-3
SHAPES_DIR = Path(__file__).parents[1] / "devices" / "shapes"


def max_rel(candidate: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(candidate - reference)) / np.max(np.abs(reference)))


def assert_same_logits(candidate: np.ndarray, reference: np.ndarray, max_relative: float) -> None:
    assert max_rel(candidate, reference) < max_relative
    # Same top-1 wherever the reference's top-1 leads by more than the tolerance (random models have near ties).
    top2 = np.sort(reference, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * max_relative * np.abs(reference).max()
    assert clear.mean() > 0.5 and (candidate.argmax(-1) == reference.argmax(-1))[clear].all()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_hf_model(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3", "gemma3", hidden=320, intermediate=640)


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    return sample_tokens(48)


@pytest.fixture(scope="module")
def reference(tiny, tokens) -> np.ndarray:
    """The Hugging Face model's logits, built by transformers itself from the saved folder."""
    torch = torch_threads()
    import transformers

    return torch_logits(transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), tokens)


@pytest.fixture(scope="module")
def f32_files(tiny, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gemma3-f32")
    teacher = load_model(tiny)
    return {
        "unpadded": write_gguf(teacher, folder / "unpadded.f32.gguf"),
        "padded": write_gguf(pad_model(teacher), folder / "padded.f32.gguf"),
    }


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory) -> dict[str, Path]:
    """w4 and gateup exports by the project's exporter (which also loads each in llama.cpp)."""
    from recover_lora.export.quantize import export_model

    folder = tmp_path_factory.mktemp("gemma3-q")
    return {policy: export_model(tiny, folder / f"tiny.{policy}.gguf", policy, threads=2).path for policy in ("w4", "gateup")}


# ---- config ---------------------------------------------------------------------------------------------------


def test_config_reads_transformers_5_and_4_spellings_and_survives_the_gguf(tiny, f32_files):
    config = load_model(tiny).config  # transformers 5 config.json: rope_parameters per layer type
    assert (config.rope_theta, config.rope_scaling) == (10000.0, None)
    assert config.arch_params == {
        "layer_types": [SLIDING, SLIDING, FULL] * 2, "sliding_window": 8, "rope_local_base_freq": 100.0,
        "query_pre_attn_scalar": 256, "final_logit_softcapping": None,
    }
    back = read_gguf(f32_files["unpadded"]).config
    assert back.arch_params == config.arch_params and back.rope_theta == config.rope_theta
    reader = gguf.GGUFReader(f32_files["unpadded"])
    assert reader.get_field("gemma3.attention.sliding_window_pattern").contents() == [True, True, False] * 2
    # transformers 4 spelling (the released checkpoints): rope_theta / rope_local_base_freq / sliding_window_pattern.
    old = json.loads((SHAPES_DIR / "gemma-3-1b.json").read_text())
    parsed = ModelConfig.from_hf_config({**old, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert parsed.rope_theta == 1e6 and parsed.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert parsed.arch_params["rope_local_base_freq"] == 1e4
    assert [i for i, t in enumerate(parsed.arch_params["layer_types"]) if t == FULL] == [5, 11, 17, 23]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attn_logit_softcapping": 50.0}, "soft-capping"),
        ({"query_pre_attn_scalar": 128}, r"query_pre_attn_scalar=128 .*1/sqrt\(256\)"),
        ({"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
        ({"use_bidirectional_attention": True}, "bidirectional"),
        ({"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
         "sliding layers with rope type 'linear'"),
    ],
)
def test_what_llama_cpp_cannot_compute_is_refused(change, message):
    cfg = {**json.loads((SHAPES_DIR / "gemma-3-270m.json").read_text()), **change}
    with pytest.raises(RecoverLoraError, match=message):
        ModelConfig.from_hf_config(cfg)


def test_bundled_shapes_pad_like_the_exporter():
    from recover_lora.devices.shapes import load_model_shape, padded_shape
    from recover_lora.export.policy import Policy

    for name, hidden, padded_hidden, params in (("gemma-3-270m", 640, 768, 268_042_240), ("gemma-3-1b", 1152, 1280, 999_751_680)):
        shape = load_model_shape(name)
        assert shape.config.hidden_size == hidden and shape.config.num_linear_parameters() == params
        config = padded_shape(shape, Policy.named("gateup")).config
        # Only the hidden width pads: 4 x 256 query and 2048 / 6912 intermediate are whole K-quant blocks.
        assert (config.hidden_size, config.num_heads, config.num_kv_heads) == (padded_hidden, 4, 1)
        assert config.intermediate_size == shape.config.intermediate_size


# ---- full precision: torch and llama.cpp, padded and not -------------------------------------------------------


def test_torch_model_is_the_hugging_face_model(tiny, tokens, reference):
    assert max_rel(torch_logits(to_hf_model(load_model(tiny)), tokens), reference) == 0.0


def test_llama_cpp_matches_torch_on_the_f32_file(f32_files, tokens, reference):
    assert_same_logits(llama_cpp_logits(f32_files["unpadded"], tokens), reference, F32_FILE_MAX_RELATIVE)


def test_padding_is_exact_in_torch_and_in_llama_cpp(tiny, f32_files, tokens, reference):
    padded = pad_model(load_model(tiny))
    config = padded.config
    assert (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads) == (512, 768, 4, 1)
    # Embeddings (x sqrt(h/h_pad)), the (1 + w) norms and the tied head's final norm are compensated.
    assert_same_logits(torch_logits(to_hf_model(padded), tokens), reference, 1e-5)
    padded_llama = llama_cpp_logits(f32_files["padded"], tokens)
    assert_same_logits(padded_llama, reference, F32_FILE_MAX_RELATIVE)
    assert_same_logits(padded_llama, llama_cpp_logits(f32_files["unpadded"], tokens), F32_FILE_MAX_RELATIVE)
    assert read_gguf(f32_files["padded"]).unpadded == {"hidden_size": 320, "intermediate_size": 640, "num_heads": 4, "num_kv_heads": 1}


@pytest.mark.parametrize(
    "change",
    [
        {"layer_types": [FULL] * 6},  # no sliding window
        {"layer_types": [SLIDING] * 5 + [FULL]},  # llama.cpp's default pattern instead of the model's
        {"rope_local_base_freq": 10000.0},  # the global base on every layer
    ],
    ids=["no-window", "default-pattern", "one-rope-base"],
)
def test_windows_pattern_and_local_rope_base_change_the_logits(tiny, tokens, reference, change):
    """Negative controls: the 1e-3 agreement above would catch any of these mistakes."""
    weights = load_model(tiny)
    config = replace(weights.config, arch_params={**weights.config.arch_params, **change})
    assert max_rel(torch_logits(to_hf_model(weights.replace(config=config)), tokens), reference) > 20 * F32_FILE_MAX_RELATIVE


def test_final_softcapping_and_linear_rope_scaling_match_llama_cpp(tmp_path, tokens):
    """Gemma-3-4B+ scale global-layer positions linearly (sliding layers are not scaled); soft-capping bounds logits."""
    folder = make_tiny_hf_model(tmp_path / "capped", "gemma3", seed=1, hidden=256, intermediate=512,
                                final_logit_softcapping=1.0, rope_scaling={"rope_type": "linear", "factor": 4.0})
    weights = load_model(folder)
    assert weights.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    expected = torch_logits(to_hf_model(weights), tokens)
    assert np.abs(expected).max() < 1.0  # capped
    path = write_gguf(weights, tmp_path / "capped.f32.gguf")
    assert read_gguf(path).config.arch_params["final_logit_softcapping"] == 1.0
    assert_same_logits(llama_cpp_logits(path, tokens), expected, F32_FILE_MAX_RELATIVE)


# ---- quantized exports, the student, the adapter ---------------------------------------------------------------


_llama_cpp_f32_cache = functools.partial(llama_cpp_logits, f32_kv_cache=True)


@pytest.mark.parametrize("policy", ["w4", "gateup"])
def test_quantized_exports_load_in_llama_cpp_and_match_the_student(exports, policy, tokens, reference):
    from recover_lora.export.gguf_info import summarize_gguf
    from recover_lora.recovery.student import build_student

    summary = summarize_gguf(exports[policy])
    types = {t.name: t.ggml_type for t in summary.tensors}
    low = "Q2_K" if policy == "gateup" else "Q4_K"
    assert {types[f"blk.{i}.ffn_{k}.weight"] for i in range(6) for k in ("gate", "up")} == {low}
    assert {types[f"blk.{i}.{k}.weight"] for i in range(6) for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_down")} == {"Q4_K"}
    assert types["token_embd.weight"] == "Q6_K" and "output.weight" not in types  # tied
    assert {types[f"blk.0.{k}.weight"] for k in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")} == {"F32"}
    student, info = build_student(exports[policy])
    assert info.config.hidden_size == 512 and info.unpadded["hidden_size"] == 320
    llama, ours = _llama_cpp_f32_cache(exports[policy], tokens), torch_logits(student, tokens)
    # llama.cpp's quantized kernels round activations to 8 bits: the student tracks llama.cpp far better
    # than the full-precision model does.
    student_error = np.linalg.norm(ours - llama, axis=1) / np.linalg.norm(llama, axis=1)
    teacher_error = np.linalg.norm(reference - llama, axis=1) / np.linalg.norm(llama, axis=1)
    assert student_error.max() < 0.08
    assert student_error.mean() < 0.5 * teacher_error.mean()
    assert (ours.argmax(-1) == llama.argmax(-1)).mean() >= 0.9


def test_student_weights_are_the_dequantized_gguf(exports):
    from recover_lora.export.model import hf_name
    from recover_lora.recovery.student import build_student

    student, info = build_student(exports["gateup"])
    state = {name: tensor.numpy() for name, tensor in student.state_dict().items()}
    reader = gguf.GGUFReader(exports["gateup"])
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))
        if tensor.name.endswith("norm.weight"):
            values = values - np.float32(1.0)  # llama.cpp stores Gemma's norms as 1 + w
        assert np.array_equal(state[hf_name(tensor.name, info.config)], values), tensor.name


def test_adapter_gguf_in_llama_cpp_equals_the_torch_student_with_lora(exports, tokens, tmp_path):
    from test_adapter_gguf import random_lora

    from recover_lora.recovery.adapter_gguf import write_adapter_gguf

    base = exports["gateup"]
    rendered = write_gguf(read_gguf(base), tmp_path / "dequantized.f32.gguf")
    model, folder = random_lora(base, "all", tmp_path / "peft")
    summary = write_adapter_gguf(folder, base, tmp_path / "adapter.gguf", dtype="f32")
    assert {name.split(".")[2] for name in summary.base_tensors} == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    torch = torch_threads()
    with torch.no_grad():
        with_lora = model(torch.tensor([tokens])).logits[0].numpy()
        with model.disable_adapter():
            without = model(torch.tensor([tokens])).logits[0].numpy()
    assert max_rel(with_lora, without) > 0.1  # the adapter really changes the output
    # Same weights in F32 (no 8-bit activation rounding): llama.cpp's GELU table and float order only.
    assert max_rel(_llama_cpp_f32_cache(rendered, tokens, summary.path), with_lora) < F32_FILE_MAX_RELATIVE
    on_quantized = _llama_cpp_f32_cache(base, tokens, summary.path)
    assert max_rel(on_quantized, with_lora) < 0.2 * max_rel(on_quantized, without)


# ---- tokenizer ------------------------------------------------------------------------------------------------


def make_gemma_sentencepiece_folder(folder: Path) -> Path:
    """A tiny SentencePiece BPE with Gemma's settings: no dummy prefix, byte fallback, whitespace kept,
    digits split, <pad>/<eos>/<bos>/<unk> = 0/1/2/3 and <start_of_turn>/<end_of_turn> as user pieces."""
    import sentencepiece
    from test_tokenizer import CORPUS

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type="bpe", vocab_size=420, byte_fallback=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {"4": {"content": "<start_of_turn>", "special": True}, "5": {"content": "<end_of_turn>", "special": True}},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_gemma_sentencepiece_tokenizes_in_llama_cpp_as_in_sentencepiece_and_hf(tmp_path):
    import sentencepiece
    import transformers
    from test_tokenizer import TEXTS, LlamaCppVocab, write_vocab_gguf

    from recover_lora.export.tokenizer import TokenizerSpec

    folder = make_gemma_sentencepiece_folder(tmp_path / "tok")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    spec = TokenizerSpec.from_hf_folder(folder)
    assert spec.model == "llama" and spec.add_space_prefix is False and spec.add_bos is True
    assert spec.special_ids == {"bos": 2, "eos": 1, "unk": 3, "pad": 0}
    assert spec.token_types[4:6] == [gguf.TokenType.CONTROL] * 2  # special per tokenizer_config, as llama.cpp's converter
    vocab = LlamaCppVocab(write_vocab_gguf(spec, tmp_path / "vocab.gguf"))
    try:
        for text in TEXTS:  # accents, CJK, emoji (byte fallback), digits, whitespace runs, newlines
            expected = sp.encode(text)
            assert vocab.tokenize(text) == expected == hf(text, add_special_tokens=False).input_ids, text
            assert vocab.detokenize(expected) == sp.decode(expected), text
        turn = "<start_of_turn>user\nWie geht's? 日本<end_of_turn>\n"
        assert vocab.tokenize(turn, add_special=True, special=True) == hf(turn).input_ids == [2] + sp.encode(turn)
    finally:
        vocab.close()
