"""Phi-3 / Phi-4-mini (`phi3`): fused qkv and gate_up, partial rotary, LongRoPE, padding, export, student, adapter.

Two tiny random models whose widths need padding (hidden 192 = 6 query heads x 32 over 2 KV heads ->
256 = 8 heads, 2 x 4; intermediate 320 -> 512): "mini" like Phi-3-mini (untied, full rotary, a sliding
window llama.cpp ignores) and "mini4" like Phi-4-mini (tied, partial rotary 0.75, LongRoPE whose long
factors the 48-token test sequences use: original context 32).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import functools
import gguf
import numpy as np
import pytest

from conftest import llama_cpp_logits, make_tiny_hf_model, sample_tokens, torch_logits, torch_threads
from recover_lora.export.archs import for_gguf_arch, for_model_type
from recover_lora.export.archs.phi3 import ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT, longrope_attention_factor
from recover_lora.export.gguf_io import read_gguf, write_gguf
from recover_lora.export.model import hf_name
from recover_lora.export.pad import pad_model, pad_tensor, padded_config
from recover_lora.export.sources import load_model
from recover_lora.export.torch_model import to_hf_model

T = gguf.GGMLQuantizationType
TOKENS = sample_tokens(48)
SHAPE = dict(hidden=192, intermediate=320, num_attention_heads=6, num_key_value_heads=2, head_dim=32)
LONG_FACTORS = [1.0 + 0.5 * i for i in range(12)]  # 12 = rotary dims (0.75 x 32) / 2
SHORT_FACTORS = [1.0 + 0.05 * i for i in range(12)]
MODELS = {
    "mini": dict(SHAPE, sliding_window=2047),
    "mini4": dict(
        SHAPE, tie_word_embeddings=True, max_position_embeddings=256, original_max_position_embeddings=32,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                             long_factor=LONG_FACTORS, short_factor=SHORT_FACTORS),
    ),
}


def max_rel(candidate: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(candidate - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("phi3")
    return {kind: make_tiny_hf_model(root / kind, "phi3", seed=i, **kwargs) for i, (kind, kwargs) in enumerate(MODELS.items())}


@pytest.fixture(scope="module")
def exports(folders, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Each model exported by the project's exporter under w4 and gateup (padded, loaded in llama.cpp)."""
    from recover_lora.export.quantize import export_model

    root = tmp_path_factory.mktemp("phi3-exports")
    return {
        (kind, policy): export_model(folder, root / f"{kind}.{policy}.gguf", policy, threads=2).path
        for kind, folder in folders.items()
        for policy in ("w4", "gateup")
    }


# ------------------------------------------------------------------------------------ registry, shapes


def load_model_shape_config(name: str):
    from recover_lora.devices.shapes import load_model_shape

    return load_model_shape(name).config


def test_registry_and_llama_cpp_names():
    arch = for_model_type("phi3")
    assert for_gguf_arch("phi3") is arch and arch.hf_class == "Phi3ForCausalLM"
    config = load_model_shape_config("phi-4-mini")
    shapes = arch.gguf_tensor_shapes(config)
    # Fused q|k|v rows and gate|up rows, as llama.cpp's phi3 loader creates them; no separate q/k/v/gate.
    assert shapes["blk.0.attn_qkv.weight"] == (3072 + 2 * 8 * 128, 3072)
    assert shapes["blk.0.ffn_up.weight"] == (2 * 8192, 3072)
    assert shapes["blk.31.attn_output.weight"] == (3072, 3072)
    assert shapes[ROPE_FACTORS_LONG] == shapes[ROPE_FACTORS_SHORT] == (48,)  # 96 rotary dims / 2
    assert not any(".attn_q." in n or ".ffn_gate." in n for n in shapes)
    assert "output.weight" not in shapes  # tied
    assert arch.rope_dimension_count(config) == 96
    assert padded_config(config) == config  # 3072 = 24 x 128 and 8192 need no padding


def test_padding_layout_and_fused_segments(folders):
    weights = load_model(folders["mini"])
    old, new = weights.config, padded_config(weights.config)
    # llama.cpp's phi3 loader needs query heads x head_dim = n_embd: 256 = 8 heads of 32, 4 per KV head.
    assert (new.hidden_size, new.intermediate_size, new.num_heads, new.num_kv_heads, new.head_dim) == (256, 512, 8, 2, 32)
    qkv = np.arange(np.prod(old.arch.hf_tensor_shapes(old)["model.layers.0.self_attn.qkv_proj.weight"]), dtype=np.float32)
    qkv = qkv.reshape(320, 192) + 1
    padded = pad_tensor("model.layers.0.self_attn.qkv_proj.weight", qkv, old, new)
    assert padded.shape == (256 + 2 * 64, 256)
    hd = 32
    # Query head i of KV group g sits at g * 4 + i; k and v follow the padded q segment, each in place.
    for head in range(6):
        group, index = divmod(head, 3)
        new_head = group * 4 + index
        assert np.array_equal(padded[new_head * hd:(new_head + 1) * hd, :192], qkv[head * hd:(head + 1) * hd])
    assert not padded[3 * hd:4 * hd].any() and not padded[7 * hd:8 * hd].any()  # the zero query heads
    assert np.array_equal(padded[256:320, :192], qkv[192:256]) and np.array_equal(padded[320:384, :192], qkv[256:320])
    assert not padded[:, 192:].any()
    gate_up = np.arange(640 * 192, dtype=np.float32).reshape(640, 192) + 1
    padded = pad_tensor("model.layers.0.mlp.gate_up_proj.weight", gate_up, old, new)
    assert padded.shape == (1024, 256)
    assert np.array_equal(padded[:320, :192], gate_up[:320]) and np.array_equal(padded[512:832, :192], gate_up[320:])
    assert not padded[320:512].any() and not padded[832:].any()


# ------------------------------------------------------------------------------------ F32 conversion


@pytest.mark.parametrize("kind", list(MODELS))
def test_llama_cpp_logits_match_torch_padded_and_not(folders, tmp_path, kind):
    weights = load_model(folders[kind])
    reference = torch_logits(to_hf_model(weights), TOKENS)
    # llama.cpp keeps the KV cache in F16: ~1e-4 of the logit scale (measured 1.8e-4 / 2.8e-4).
    unpadded = llama_cpp_logits(write_gguf(weights, tmp_path / "model.gguf"), TOKENS)
    assert max_rel(unpadded, reference) < 1e-3
    assert (unpadded.argmax(-1) == reference.argmax(-1)).mean() >= 0.95
    padded = pad_model(weights)
    assert padded.config.hidden_size == 256
    assert max_rel(torch_logits(to_hf_model(padded), TOKENS), reference) < 1e-5  # exact up to float rounding
    padded_llama = llama_cpp_logits(write_gguf(padded, tmp_path / "padded.gguf"), TOKENS)
    assert max_rel(padded_llama, reference) < 1e-3
    assert max_rel(padded_llama, unpadded) < 1e-4


def test_longrope_and_partial_rotary_reach_llama_cpp(folders, tmp_path):
    """Negative controls: without the long factors, the attention factor or the partial rotary width the
    torch logits move far more than llama.cpp's distance to them, so llama.cpp really uses all three."""
    weights = load_model(folders["mini4"])
    config = weights.config
    assert config.rope_type == "longrope" and config.arch_params == {"partial_rotary_factor": 0.75, "original_max_position_embeddings": 32}
    reference = torch_logits(to_hf_model(weights), TOKENS)
    llama = llama_cpp_logits(write_gguf(weights, tmp_path / "mini4.gguf"), TOKENS)
    error = max_rel(llama, reference)
    scaling = config.rope_scaling
    variants = {
        "short factors only": replace(config, rope_scaling={**scaling, "long_factor": scaling["short_factor"]}),
        "no attention factor": replace(config, rope_scaling={**scaling, "attention_factor": 1.0}),
        "full rotary": replace(config, arch_params={**config.arch_params, "partial_rotary_factor": 1.0},
                               rope_scaling=None),
    }
    for what, variant in variants.items():
        moved = max_rel(torch_logits(to_hf_model(weights.replace(config=variant)), TOKENS), reference)
        assert moved > 20 * error, what


def test_gguf_keys_and_round_trip(folders, tmp_path):
    weights = load_model(folders["mini4"])
    path = write_gguf(weights, tmp_path / "mini4.gguf")
    reader = gguf.GGUFReader(path)

    def key(template):
        field = reader.get_field(template.format(arch="phi3"))
        return None if field is None else field.contents()

    assert key(gguf.Keys.Rope.DIMENSION_COUNT) == 24
    assert key(gguf.Keys.Rope.SCALING_ORIG_CTX_LEN) == 32
    assert key(gguf.Keys.Rope.SCALING_ATTN_FACTOR) == pytest.approx(np.sqrt(1 + np.log(256 / 32) / np.log(32)), rel=1e-6)
    assert key(gguf.Keys.Attention.SLIDING_WINDOW) is None  # llama.cpp's phi3 graph attends fully
    back = read_gguf(path)
    assert back.config.arch_params == weights.config.arch_params
    assert back.config.rope_scaling["long_factor"] == pytest.approx(LONG_FACTORS)
    assert back.config.rope_scaling["short_factor"] == pytest.approx(SHORT_FACTORS)
    assert back.config.rope_scaling["attention_factor"] == pytest.approx(longrope_attention_factor(weights.config), rel=1e-6)
    assert set(back.tensors) == set(weights.tensors)  # rope factors are rebuilt from the config, not weights
    for name in back.tensors:
        assert np.array_equal(back.tensors[name], weights.tensors[name]), name
    assert max_rel(torch_logits(to_hf_model(back), TOKENS), torch_logits(to_hf_model(weights), TOKENS)) < 1e-6
    sliding = load_model(folders["mini"])  # sliding_window 2047 in its config.json: accepted, attended fully
    assert to_hf_model(sliding).config.sliding_window is None


# ------------------------------------------------------------------------------------ quantized exports


@pytest.mark.parametrize("kind", list(MODELS))
def test_exports_have_the_policy_types(exports, kind):
    for policy in ("w4", "gateup"):
        reader = gguf.GGUFReader(exports[kind, policy])
        types = {t.name: T(int(t.tensor_type)) for t in reader.tensors}
        linears = {n: t for n, t in types.items() if n.startswith("blk.") and len(n.split(".")) == 4 and n.endswith(".weight")
                   and t != T.F32}
        kinds = {n.split(".")[2] for n in linears}
        assert kinds == {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}
        for name, ggml_type in linears.items():
            low = policy == "gateup" and ".ffn_up." in name  # the fused gate|up tensor is the GateUp one
            assert ggml_type == (T.Q2_K if low else T.Q4_K), name
        assert types["token_embd.weight"] == T.Q6_K
        assert ("output.weight" in types) == (kind == "mini")
        assert (ROPE_FACTORS_LONG in types) == (kind == "mini4")
        shape = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight").shape.tolist()
        assert shape == [256, 1024]  # ggml order {n_embd, 2 n_ff}, padded


@pytest.mark.parametrize("kind", list(MODELS))
def test_student_is_the_dequantized_gguf_and_matches_llama_cpp(exports, folders, tmp_path, kind):
    from recover_lora.recovery.student import build_student, build_teacher

    path = exports[kind, "gateup"]
    student, info = build_student(path)
    state = {k: v.numpy() for k, v in student.state_dict().items()}
    for tensor in gguf.GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        expected = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        if tensor.name in (ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT):  # in the config, not the state
            key = "long_factor" if tensor.name == ROPE_FACTORS_LONG else "short_factor"
            assert np.array_equal(np.asarray(info.config.rope_scaling[key], dtype=np.float32), expected)
            continue
        assert np.array_equal(state[hf_name(tensor.name, info.config)], expected), tensor.name
    ours = torch_logits(student, TOKENS)
    # The same dequantized weights in llama.cpp's F32 path (F32 KV cache): float rounding only.
    rendered = write_gguf(read_gguf(path), tmp_path / "dequantized.f32.gguf")
    assert max_rel(llama_logits(rendered, TOKENS), ours) < 1e-4
    # The quantized file itself: llama.cpp also rounds activations to 8 bits (as in test_student.py).
    on_quantized = llama_logits(path, TOKENS)
    teacher, _ = build_teacher(folders[kind])
    full_precision = torch_logits(teacher, TOKENS)
    student_error = np.linalg.norm(ours - on_quantized, axis=1) / np.linalg.norm(on_quantized, axis=1)
    teacher_error = np.linalg.norm(full_precision - on_quantized, axis=1) / np.linalg.norm(on_quantized, axis=1)
    assert student_error.max() < 0.08
    assert student_error.mean() < 0.2 * teacher_error.mean()


llama_logits = functools.partial(llama_cpp_logits, f32_kv_cache=True)  # (path, tokens, lora=None)


def test_low_bit_targets_are_the_fused_ffn_up(exports):
    from recover_lora.errors import RecoverLoraError
    from recover_lora.recovery.student import read_student_info, target_module_names, target_tensor_names

    info = read_student_info(exports["mini", "gateup"])
    assert target_tensor_names(info) == ["blk.0.ffn_up.weight", "blk.1.ffn_up.weight"]
    assert target_module_names(info) == ["model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.gate_up_proj"]
    assert {n.split(".")[2] for n in target_tensor_names(info, "all")} == {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}
    with pytest.raises(RecoverLoraError, match="ffn_gate.*its linears are: attn_output, attn_qkv, ffn_down, ffn_up"):
        target_tensor_names(info, "ffn_gate")


@pytest.mark.parametrize("kind", list(MODELS))
def test_adapter_on_fused_tensors_in_llama_cpp_equals_torch(exports, tmp_path, kind):
    torch = torch_threads()
    from peft import LoraConfig, get_peft_model

    from recover_lora.recovery.adapter_gguf import check_adapter_against_base, write_adapter_gguf
    from recover_lora.recovery.student import build_student, target_module_names

    base = exports[kind, "gateup"]
    student, info = build_student(base)
    torch.manual_seed(0)
    model = get_peft_model(student, LoraConfig(r=4, lora_alpha=8.0, target_modules=target_module_names(info, "attn_qkv,ffn_up")))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(tmp_path / "peft")
    summary = write_adapter_gguf(tmp_path / "peft", base, tmp_path / "adapter.gguf", dtype="f32")
    assert summary.base_tensors == [f"blk.{i}.{k}.weight" for i in range(2) for k in ("attn_qkv", "ffn_up")]
    reader = gguf.GGUFReader(summary.path)
    shapes = {t.name: t.shape.tolist() for t in reader.tensors}
    assert shapes["blk.0.attn_qkv.weight.lora_b"] == [4, 384] and shapes["blk.0.ffn_up.weight.lora_b"] == [4, 1024]
    assert shapes["blk.0.ffn_up.weight.lora_a"] == [256, 4]
    assert check_adapter_against_base(summary.path, base).ranks == [4]
    with torch.no_grad():
        with_lora = model(torch.tensor([TOKENS])).logits[0].float().numpy()
        with model.disable_adapter():
            without = model(torch.tensor([TOKENS])).logits[0].float().numpy()
    assert max_rel(with_lora, without) > 0.1  # the adapter really changes the output
    rendered = write_gguf(read_gguf(base), tmp_path / "base.f32.gguf")
    assert max_rel(llama_logits(rendered, TOKENS, summary.path), with_lora) < 1e-4


# ------------------------------------------------------------------------------------ roofline


def test_roofline_counts_the_fused_tensors():
    from recover_lora.devices.roofline import AdapterSpec, token_cost
    from recover_lora.devices.shapes import load_model_shape, tensors_for_policy

    shape = load_model_shape("phi-4-mini")
    gateup = {t.name: t for t in tensors_for_policy(shape, "gateup")}
    assert gateup["blk.0.ffn_up.weight"].ggml_type == T.Q2_K and gateup["blk.0.ffn_up.weight"].shape == (16384, 3072)
    assert gateup["blk.0.attn_qkv.weight"].ggml_type == T.Q4_K
    adapter = AdapterSpec(rank=16)  # default modules ffn_gate, ffn_up: Phi-3's fused ffn_up only
    assert adapter.matrix_elements(tuple(gateup.values())) == 32 * 16 * (3072 + 16384)
    w4, low = token_cost(shape, "w4", 0), token_cost(shape, "gateup", 0)
    # Only gate|up change type: 32 layers x 2 x 8192 x 3072 weights from 4.5 to 2.625 bits.
    assert w4.weights.bytes - low.weights.bytes == pytest.approx(32 * 2 * 8192 * 3072 * (4.5 - 2.625) / 8)
    phi3 = load_model_shape("phi-3-mini")
    assert phi3.config.head_dim == 96 and not phi3.config.tie_word_embeddings
