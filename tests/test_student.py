"""The student is the deployed model: dequantized GGUF weights bit for bit, llama.cpp's logits."""

from __future__ import annotations

from pathlib import Path

import functools
import gguf
import numpy as np
import pytest

from conftest import STORIES_DIR, llama_cpp_logits, sample_tokens, torch_threads
from recover_lora.errors import RecoverLoraError
from recover_lora.recovery.student import (
    StudentInfo,
    build_student,
    build_teacher,
    check_teacher_matches,
    read_student_info,
    target_module_names,
    target_tensor_names,
)


@pytest.fixture(scope="module")
def gateup_gguf(tmp_path_factory) -> Path:
    """stories260K exported by the project's exporter with the gateup policy (widths padded 64 -> 256)."""
    from recover_lora.export.quantize import export_model

    path = tmp_path_factory.mktemp("student") / "stories.gateup.gguf"
    export_model(STORIES_DIR, path, "gateup", threads=2)
    return path


llama_cpp_logits_f32_cache = functools.partial(llama_cpp_logits, f32_kv_cache=True)


def student_logits(model, tokens: list[int]) -> np.ndarray:
    torch = torch_threads()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def undo_rotary_permutation(rows: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp (convert_hf_to_gguf.py) stores q/k rows of each head interleaved: HF row i of the first
    # half and row i of the second half become rows 2i and 2i+1. Written out here, independently.
    out_features = rows.shape[0]
    return rows.reshape(n_heads, out_features // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(rows.shape)


def test_student_weights_equal_dequantized_gguf_bit_for_bit(gateup_gguf):
    model, info = build_student(gateup_gguf)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    reader = gguf.GGUFReader(gateup_gguf)
    heads = {"attn_q": info.config.num_heads, "attn_k": info.config.num_kv_heads}
    kinds = set()
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        expected = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        kind = tensor.name.split(".")[-2]
        if kind in heads:
            expected = undo_rotary_permutation(expected, heads[kind])
        from recover_lora.export.model import hf_name

        actual = state[hf_name(tensor.name, info.config)]
        assert actual.shape == expected.shape, tensor.name
        assert np.array_equal(actual, expected), f"{tensor.name} differs from its dequantized GGUF values"
        kinds.add(gguf.GGMLQuantizationType(int(tensor.tensor_type)).name)
    assert {"Q2_K", "Q4_K", "Q6_K"} <= kinds  # really a quantized, mixed-precision file
    assert info.config.hidden_size == 256 and info.unpadded["hidden_size"] == 64  # the padded model


def test_student_logits_equal_llama_cpp_on_the_same_weights(gateup_gguf, tmp_path):
    """The same dequantized weights in llama.cpp's F32 path: logits agree to float rounding.

    (llama.cpp's quantized CPU kernels also round the *activations* to 8 bits, Q8_K, before each
    dot product; an F32 rendering of the dequantized tensors removes exactly that and nothing else.)
    """
    from recover_lora.export.gguf_io import read_gguf, write_gguf

    rendered = write_gguf(read_gguf(gateup_gguf), tmp_path / "dequantized.f32.gguf")
    model, _ = build_student(gateup_gguf)
    tokens = sample_tokens(48)
    ours, theirs = student_logits(model, tokens), llama_cpp_logits_f32_cache(rendered, tokens)
    assert np.max(np.abs(ours - theirs)) <= 1e-4 * np.max(np.abs(theirs))


def test_student_logits_match_llama_cpp_on_the_quantized_file(gateup_gguf):
    """On the quantized GGUF itself llama.cpp differs only by its 8-bit activation rounding: a few
    percent of the logit scale, far below the quantization error the student carries vs the teacher."""
    model, _ = build_student(gateup_gguf)
    teacher, _ = build_teacher(STORIES_DIR)
    tokens = sample_tokens(48)
    llama = llama_cpp_logits_f32_cache(gateup_gguf, tokens)
    ours, full_precision = student_logits(model, tokens), student_logits(teacher, tokens)
    student_error = np.linalg.norm(ours - llama, axis=1) / np.linalg.norm(llama, axis=1)
    teacher_error = np.linalg.norm(full_precision - llama, axis=1) / np.linalg.norm(llama, axis=1)
    assert student_error.max() < 0.08
    assert student_error.mean() < 0.2 * teacher_error.mean()
    assert (ours.argmax(-1) == llama.argmax(-1)).mean() >= 0.9


def test_padded_student_and_unpadded_teacher_share_the_vocabulary(gateup_gguf):
    model, info = build_student(gateup_gguf)
    teacher, teacher_config = build_teacher(STORIES_DIR)
    check_teacher_matches(teacher_config, info)
    tokens = sample_tokens(16)
    assert student_logits(model, tokens).shape == student_logits(teacher, tokens).shape == (16, 512)


def test_low_bit_targets_are_the_q2_k_linears(gateup_gguf):
    info = read_student_info(gateup_gguf)
    names = target_tensor_names(info)
    assert names and all(info.tensor_types[n] == gguf.GGMLQuantizationType.Q2_K for n in names)
    assert {n.split(".")[2] for n in names} == {"ffn_gate", "ffn_up"}
    assert len(names) == 2 * info.config.num_layers
    assert target_module_names(info)[0] == "model.layers.0.mlp.gate_proj"


def test_all_targets_are_every_quantized_linear(gateup_gguf):
    info = read_student_info(gateup_gguf)
    assert len(target_tensor_names(info, "all")) == 7 * info.config.num_layers
    assert {n.split(".")[2] for n in target_tensor_names(info, "attn_q,ffn_down")} == {"attn_q", "ffn_down"}


def test_target_errors_are_actionable(gateup_gguf):
    info = read_student_info(gateup_gguf)
    with pytest.raises(RecoverLoraError, match="--targets"):
        target_tensor_names(info, "ffn_sideways")
    only_q4 = StudentInfo(
        gguf_path=info.gguf_path,
        config=info.config,
        gguf_arch=info.gguf_arch,
        tensor_types={n: gguf.GGMLQuantizationType.Q4_K for n in info.tensor_types},
    )
    with pytest.raises(RecoverLoraError, match="--targets all"):
        target_tensor_names(only_q4, "low-bit")
    # A gateup export with --low-bit-type IQ3_XXS (3.06 bits/weight): its gate/up are still the low-bit targets.
    iq3 = {n: gguf.GGMLQuantizationType.IQ3_XXS if ".ffn_gate." in n or ".ffn_up." in n else t for n, t in only_q4.tensor_types.items()}
    chosen = target_tensor_names(StudentInfo(info.gguf_path, info.config, info.gguf_arch, iq3), "low-bit")
    assert chosen and all(iq3[n] == gguf.GGMLQuantizationType.IQ3_XXS for n in chosen)
    assert len(chosen) == sum(t == gguf.GGMLQuantizationType.IQ3_XXS for t in iq3.values())


def test_a_teacher_of_another_model_is_refused(gateup_gguf, tiny_hf_model):
    info = read_student_info(gateup_gguf)
    other = build_teacher(tiny_hf_model("llama"))[1]  # same vocabulary, different width and depth
    with pytest.raises(RecoverLoraError, match="--teacher"):
        check_teacher_matches(other, info)
