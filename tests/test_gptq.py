"""GPTQ codes for llama.cpp's Q2_K blocks (recovery/gptq.py): llama.cpp's codes as the oracle, exact bytes."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import STORIES_DIR, TINY_CONFIGS, llama_cpp_logits, make_tiny_hf_model, sample_tokens, torch_logits, torch_threads
from recover_lora.errors import RecoverLoraError
from recover_lora.export.gguf_header import read_gguf_header
from recover_lora.export.ggml_blocks import Q2KBlocks
from recover_lora.recovery.activations import counted_positions
from recover_lora.recovery.block_scales import read_q2k_tensor
from recover_lora.recovery.gptq import gptq_codes, input_grams, output_error, per_weight, refine_codes, with_gptq_codes
from recover_lora.recovery.imatrix import padded_teacher
from recover_lora.recovery.samples import load_samples
from recover_lora.recovery.student import build_student
from test_imatrix import synth_folder

Q2_K = gguf.GGMLQuantizationType.Q2_K
GATE, GATE_MODULE = "blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj"


@pytest.fixture(scope="module")
def base(stories_gateup) -> Path:
    return stories_gateup


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return synth_folder(tmp_path_factory.mktemp("gptq-synth") / "synth", n=24, seq_len=32)


@pytest.fixture(scope="module")
def teacher():
    model, config = padded_teacher(STORIES_DIR)
    return model, config


def tensors(path: Path) -> dict:
    return {t.name: t for t in read_gguf_header(path).tensors}


def test_identity_gram_gives_back_llama_cpps_codes(base, teacher):
    """Without activation information GPTQ is round-to-nearest with the block's scales: llama.cpp's own codes."""
    model, _ = teacher
    blocks, (rows, cols) = read_q2k_tensor(base, GATE)
    target = dict(model.named_modules())[GATE_MODULE].weight.detach().double()
    scale, minimum = blocks.sub_block_scales()
    codes = gptq_codes(target, per_weight(scale, rows, cols), per_weight(minimum, rows, cols), torch.eye(cols, dtype=torch.float64))
    differ = codes.numpy().reshape(blocks.codes.shape) != blocks.codes
    # llama.cpp rounds in float32 from the exporter's intermediate: only exact ties may round the other way.
    assert differ.sum() <= 2, f"{int(differ.sum())} of {differ.size} codes differ from llama.cpp's"


def test_gptq_codes_lower_the_output_error_of_llama_cpps_codes(base, synth, teacher):
    model, _ = teacher
    samples = load_samples(synth)
    gram = input_grams(model, [GATE_MODULE], samples.input_ids, counted_positions(samples.loss_mask))[GATE_MODULE]
    blocks, shape = read_q2k_tensor(base, GATE)
    target = dict(model.named_modules())[GATE_MODULE].weight.detach().double()
    new = with_gptq_codes(blocks, shape, target, gram)
    as_tensor = lambda b: torch.from_numpy(b.dequantize().astype(np.float64)).reshape(shape)
    before, after = output_error(target, as_tensor(blocks), gram), output_error(target, as_tensor(new), gram)
    assert after < 0.95 * before, (before, after)
    # Scales, mins, d and dmin are the base's: only codes moved.
    for name in ("scale_codes", "min_codes", "d", "dmin"):
        np.testing.assert_array_equal(getattr(new, name), getattr(blocks, name))
    assert new.codes.max() <= 3 and (new.codes != blocks.codes).any()


def check_only_code_bytes_changed_and_llama_cpp_runs_it(base: Path, result) -> None:
    """Same size, types and bytes but the Q2_K code bytes (some changed in every Q2_K tensor); llama.cpp's
    logits of the refined file = the torch student's (gguf-py's reading of the codes), and not the base's."""
    old, new = tensors(base), tensors(result.path)
    q2k = sorted(n for n, t in old.items() if gguf.GGMLQuantizationType(int(t.tensor_type)) == Q2_K)
    assert result.path.stat().st_size == base.stat().st_size and result.tensors == q2k and new.keys() == old.keys()
    assert 0 < result.codes_changed < 0.5 and result.error_ratio < 1.0, (result.codes_changed, result.error_ratio)
    for name, tensor in old.items():
        before, after = np.array(tensor.data).reshape(-1).view(np.uint8), np.array(new[name].data).reshape(-1).view(np.uint8)
        assert new[name].tensor_type == tensor.tensor_type and after.size == before.size, name
        if name not in q2k:
            np.testing.assert_array_equal(after, before, err_msg=name)
            continue
        blocks_before, blocks_after = before.reshape(-1, 84), after.reshape(-1, 84)
        np.testing.assert_array_equal(blocks_after[:, :16], blocks_before[:, :16], err_msg=name)  # scale and min codes
        np.testing.assert_array_equal(blocks_after[:, 80:], blocks_before[:, 80:], err_msg=name)  # d, dmin
        assert (blocks_after[:, 16:80] != blocks_before[:, 16:80]).any(), name
    ids = sample_tokens(32, seed=5)
    student, _ = build_student(result.path)
    ours = torch_logits(student, ids)
    theirs = llama_cpp_logits(result.path, ids, f32_kv_cache=True)
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 5e-2
    assert np.abs(theirs - llama_cpp_logits(base, ids, f32_kv_cache=True)).max() > 1e-3  # the codes changed the model


def test_refined_file_changes_only_q2k_code_bytes_and_runs_in_llama_cpp(base, synth, tmp_path):
    torch_threads()
    result = refine_codes(base, tmp_path / "refined.gguf", samples=synth, teacher=STORIES_DIR)
    check_only_code_bytes_changed_and_llama_cpp_runs_it(base, result)


def test_bad_inputs_are_one_line_errors_and_leave_nothing(base, synth, tmp_path, tiny_hf_model, monkeypatch):
    from recover_lora.export.quantize import export_model

    w4 = export_model(STORIES_DIR, tmp_path / "w4.gguf", "w4", threads=2).path
    with pytest.raises(RecoverLoraError, match="has no Q2_K tensors"):
        refine_codes(w4, tmp_path / "x.gguf", samples=synth, teacher=STORIES_DIR)
    other = tiny_hf_model("llama", intermediate=768)
    with pytest.raises(RecoverLoraError, match=r"blk\.0\.ffn_(gate|up)\.weight: the teacher's weight is"):
        refine_codes(base, tmp_path / "x.gguf", samples=synth, teacher=other)
    with pytest.raises(RecoverLoraError, match="must be > 0"):
        refine_codes(base, tmp_path / "x.gguf", samples=synth, teacher=STORIES_DIR, damp=0)
    (tmp_path / "taken.gguf").write_bytes(b"keep")
    with pytest.raises(RecoverLoraError, match="--force"):
        refine_codes(base, tmp_path / "taken.gguf", samples=synth, teacher=STORIES_DIR)
    assert (tmp_path / "taken.gguf").read_bytes() == b"keep"

    def refuse(*args, **kwargs):
        raise RecoverLoraError("llama.cpp refused")

    monkeypatch.setattr("recover_lora.export.llama_load.llama_cpp_load_check", refuse)
    with pytest.raises(RecoverLoraError, match="refused"):
        refine_codes(base, tmp_path / "y.gguf", samples=synth, teacher=STORIES_DIR)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["taken.gguf", "w4.gguf"]


# Tiny random models of every other architecture in TINY_CONFIGS, shaped like their real checkpoints where it
# matters here: widths that pad to K-quant blocks (qwen2's 7:1 heads and biases, phi3's fused gate|up, gemma3's
# 320 -> 512), GQA, a query width unlike the hidden width (qwen3). An arch not listed gets conftest's shape.
ARCH_SHAPES = {
    "mistral": dict(intermediate=448),  # Mistral-7B's 3.5 x hidden: 448 pads to 512
    "qwen2": dict(hidden=224, intermediate=320, num_attention_heads=14, num_key_value_heads=2, head_dim=16),
    "qwen3": dict(hidden=256, intermediate=384, num_attention_heads=4, num_key_value_heads=2, head_dim=128),
    "phi3": dict(hidden=192, intermediate=320, num_attention_heads=6, num_key_value_heads=2, head_dim=32),
    # Gemma-3-270M's heads (test_arch_gemma3.py's widths), 3 layers instead of 6: sliding, sliding, global.
    "gemma3": dict(hidden=320, intermediate=640, num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
}


@pytest.mark.parametrize("arch", [a for a in TINY_CONFIGS if a != "llama"])
def test_refined_codes_on_other_architectures_match_llama_cpp(arch, synth, tmp_path):
    import transformers

    from recover_lora.export.quantize import export_model

    torch_threads()
    # The folder is not named after the arch: the GGUF's general.name comes from it, and llama.cpp's vocabulary
    # loader looks up "<|endoftext|>" by text for a general.name containing "phi3", which stories260K's lacks.
    folder = make_tiny_hf_model(tmp_path / "model", arch, **ARCH_SHAPES.get(arch, {}))
    base = export_model(folder, tmp_path / f"{arch}.gateup.gguf", "gateup", threads=2).path
    result = refine_codes(base, tmp_path / f"{arch}.gptq.gguf", samples=synth, teacher=folder)
    low = ["ffn_up"] if arch == "phi3" else ["ffn_gate", "ffn_up"]  # phi3: gate|up fused in one ffn_up
    layers = len(result.tensors) // len(low)
    assert result.tensors == sorted(f"blk.{i}.{k}.weight" for i in range(layers) for k in low) and layers > 0
    check_only_code_bytes_changed_and_llama_cpp_runs_it(base, result)
    # Independent of gptq's own bookkeeping (names, fused rows, padding): on the calibration text the refined
    # file is closer to the teacher, as transformers builds it from its folder, than the base (measured 0.57-0.77;
    # 0.92 for phi3 with gate and up swapped in the target).
    samples = load_samples(synth)
    text, counted = samples.input_ids, counted_positions(samples.loss_mask)
    with torch.no_grad():
        reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(text).logits[counted]
        error = {p.name: float(((build_student(p)[0](text).logits[counted] - reference) ** 2).mean()) for p in (base, result.path)}
    assert error[result.path.name] < 0.9 * error[base.name], error
