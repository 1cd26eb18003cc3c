"""Q2_K blocks as arrays, trainable block scales (DWQ on llama.cpp's K-quants), and `merge` into one GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import STORIES_DIR, llama_cpp_logits, sample_tokens, torch_logits, torch_threads
from recover_lora.errors import RecoverLoraError
from recover_lora.export.gguf_header import read_gguf_header
from recover_lora.export.ggml_blocks import Q2KBlocks
from recover_lora.recovery.block_scales import BLOCK_SCALES_FILE, Q2KWeight, read_q2k_tensor, replace_with_block_scales
from recover_lora.recovery.distill import TrainConfig, train
from recover_lora.recovery.merge import merge_run
from recover_lora.recovery.student import build_student, build_teacher
from test_imatrix import synth_folder

Q2_K = gguf.GGMLQuantizationType.Q2_K
GATE = "blk.0.ffn_gate.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from recover_lora.export.quantize import export_model

    torch_threads()
    return export_model(STORIES_DIR, tmp_path_factory.mktemp("blocks") / "stories.gateup.gguf", "gateup", threads=2).path


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return synth_folder(tmp_path_factory.mktemp("blocks-synth") / "synth", n=8, seq_len=16)


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def raw_tensor(path: Path, name: str) -> np.ndarray:
    return np.array(next(t for t in read_gguf_header(path).tensors if t.name == name).data)


def test_blocks_dequantize_like_gguf_py_and_pack_back_to_the_same_bytes(base):
    for name in (GATE, "blk.1.ffn_up.weight"):
        raw = raw_tensor(base, name)
        blocks = Q2KBlocks.from_bytes(raw)
        expected = gguf.quants.dequantize(raw, Q2_K).reshape(-1)
        np.testing.assert_array_equal(blocks.dequantize(), expected)
        assert blocks.codes.max() <= 3 and blocks.scale_codes.max() <= 15
        np.testing.assert_array_equal(blocks.to_bytes().reshape(-1), raw.reshape(-1))


def test_changed_scales_change_only_scale_bytes_and_dequantize_as_ggml(base):
    raw = raw_tensor(base, GATE)
    blocks = Q2KBlocks.from_bytes(raw)
    rng = np.random.default_rng(0)
    blocks.scale_codes = rng.integers(0, 16, blocks.scale_codes.shape).astype(np.uint8)
    blocks.dmin = (blocks.dmin.astype(np.float32) * 1.5).astype(np.float16)
    packed = blocks.to_bytes()
    np.testing.assert_array_equal(packed[:, 16:80], raw.reshape(-1, 84)[:, 16:80])  # the 2-bit codes are untouched
    np.testing.assert_array_equal(gguf.quants.dequantize(packed, Q2_K).reshape(-1), blocks.dequantize())
    with pytest.raises(RecoverLoraError, match="must be 0..15"):
        Q2KBlocks(blocks.codes, blocks.scale_codes + 16, blocks.min_codes, blocks.d, blocks.dmin).to_bytes()


def test_trainable_weight_is_exactly_what_it_writes(base):
    blocks, shape = read_q2k_tensor(base, GATE)
    weight = Q2KWeight(blocks, shape)
    with torch.no_grad():
        np.testing.assert_array_equal(weight().numpy().reshape(-1), blocks.dequantize())  # step 0 = the file
        np.testing.assert_array_equal(weight.to_blocks().to_bytes(), blocks.to_bytes())
        weight.log_d.add_(0.013)
        weight.scale_codes.add_(torch.randn_like(weight.scale_codes) * 2)
        weight.min_codes.sub_(0.7)
    moved = weight.to_blocks()
    assert not np.array_equal(moved.to_bytes(), blocks.to_bytes())
    with torch.no_grad():
        np.testing.assert_array_equal(weight().numpy().reshape(-1), gguf.quants.dequantize(moved.to_bytes(), Q2_K).reshape(-1))
    # Gradients reach every trainable number through the rounding (straight-through).
    weight().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weight.parameters())


def test_swapping_in_block_scales_leaves_the_student_unchanged(base):
    torch_threads()
    student, info = build_student(base)
    ids = sample_tokens(24, seed=3)
    before = torch_logits(student, ids)
    replaced = replace_with_block_scales(student, info, [GATE, "blk.0.ffn_up.weight"])
    assert set(replaced) == {GATE, "blk.0.ffn_up.weight"}
    np.testing.assert_array_equal(torch_logits(student, ids), before)
    with pytest.raises(RecoverLoraError, match="needs Q2_K tensors; blk.0.attn_q.weight .* is Q4_K"):
        replace_with_block_scales(student, info, ["blk.0.attn_q.weight"])


def kl(teacher, student, ids: torch.Tensor) -> float:
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=ids).logits, -1)
        pred = torch.log_softmax(student(input_ids=ids).logits, -1)
    return float((target.exp() * (target - pred)).sum(-1).mean())


@pytest.fixture(scope="module")
def trained_blocks(base, synth, tmp_path_factory) -> Path:
    """Block scales only (no LoRA), a few steps with a large rate so that they surely move."""
    out = tmp_path_factory.mktemp("blocks-run") / "run"
    train(TrainConfig(base=base, output=out, samples=synth, teacher=str(STORIES_DIR), targets="none", block_scales=True,
                      block_scales_lr=2e-2, batch_size=4, max_steps=6, checkpoint_every=3, progress=False))
    return out


def test_block_scale_training_writes_q2k_bytes_that_lower_the_kl(base, trained_blocks, tmp_path):
    torch_threads()
    assert not (trained_blocks / "adapter.gguf").exists()
    summary = json.loads((trained_blocks / "summary.json").read_text())
    assert summary["adapter_gguf"] is None and GATE in summary["block_scale_tensors"]
    merged = merge_run(base, trained_blocks, tmp_path / "recovered.gguf")
    assert sorted(merged.block_scale_tensors) == sorted(summary["block_scale_tensors"]) and not merged.lora_tensors
    # Exactly the base's types and bytes per tensor; only the scale bytes of the trained tensors differ.
    base_tensors = {t.name: t for t in read_gguf_header(base).tensors}
    for tensor in read_gguf_header(merged.path).tensors:
        original = base_tensors[tensor.name]
        assert (tensor.tensor_type, tensor.n_bytes) == (original.tensor_type, original.n_bytes)
        if tensor.name not in merged.block_scale_tensors:
            np.testing.assert_array_equal(np.asarray(tensor.data), np.asarray(original.data))
        else:
            new, old = np.asarray(tensor.data).reshape(-1, 84), np.asarray(original.data).reshape(-1, 84)
            np.testing.assert_array_equal(new[:, 16:80], old[:, 16:80])
    assert merged.file_bytes == base.stat().st_size
    # The student of the merged file starts where training ended: closer to the teacher than the base.
    teacher, _ = build_teacher(STORIES_DIR)
    ids = torch.tensor([sample_tokens(32, seed=50 + i) for i in range(4)])
    assert kl(teacher, build_student(merged.path)[0], ids) < kl(teacher, build_student(base)[0], ids)


def test_merged_gguf_in_llama_cpp_equals_the_trained_torch_student(base, trained_blocks, tmp_path):
    """llama.cpp on the merged file vs torch with the run's trained blocks swapped into the base student."""
    from safetensors.numpy import load_file

    from recover_lora.export.gguf_io import read_gguf, write_gguf

    torch_threads()
    merged = merge_run(base, trained_blocks, tmp_path / "recovered.gguf").path
    student, info = build_student(base)
    trained = load_file(str(trained_blocks / BLOCK_SCALES_FILE))
    replaced = replace_with_block_scales(student, info, sorted(trained))
    with torch.no_grad():
        for name, q2k in replaced.items():  # load the trained values the way the run ended
            blocks = Q2KBlocks.from_bytes(trained[name])
            q2k.log_d.copy_(torch.log(torch.from_numpy(blocks.d.astype(np.float32)) / q2k.d0).nan_to_num(0.0))
            q2k.log_dmin.copy_(torch.log(torch.from_numpy(blocks.dmin.astype(np.float32)) / q2k.dmin0).nan_to_num(0.0))
            q2k.scale_codes.copy_(torch.from_numpy(blocks.scale_codes.astype(np.float32)))
            q2k.min_codes.copy_(torch.from_numpy(blocks.min_codes.astype(np.float32)))
            np.testing.assert_array_equal(q2k.to_blocks().to_bytes(), trained[name])
    # llama.cpp multiplies Q2_K weights with Q8_K-rounded activations; its F32 rendering of the merged
    # file (dequantized by llama.cpp's reader, gguf-py) is what must equal torch's weights exactly.
    rendered = write_gguf(read_gguf(merged), tmp_path / "recovered.f32.gguf")
    ids = sample_tokens(40, seed=11)
    ours = torch_logits(student, ids)
    assert max_rel(ours, llama_cpp_logits(rendered, ids, f32_kv_cache=True)) < 1e-4
    assert max_rel(ours, llama_cpp_logits(merged, ids, f32_kv_cache=True)) < 5e-2  # the Q2_K file itself runs too


def fake_adapter(base: Path, folder: Path, targets: list[str], scale: float) -> Path:
    """A peft folder with large random LoRA weights on these modules (so that the merge is visible)."""
    from recover_lora.recovery.distill import wrap_with_lora

    student, _ = build_student(base)
    model = wrap_with_lora(student, TrainConfig(base=base, output="unused", samples="unused", rank=4), targets)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)
    model.save_pretrained(folder / "adapter")
    return folder


def test_lora_merge_requantizes_the_4bit_linears_and_keeps_every_other_byte(base, tmp_path):
    from recover_lora.export.gguf_io import read_gguf, write_gguf
    from recover_lora.export.pad import pad_model
    from recover_lora.export.sources import load_model

    torch_threads()
    run = fake_adapter(base, tmp_path / "run", ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"], 0.3)
    merged = merge_run(base, run, tmp_path / "merged.gguf", teacher=STORIES_DIR)
    assert merged.lora_tensors == ["blk.0.attn_q.weight", "blk.1.ffn_down.weight"]
    base_tensors = {t.name: t for t in read_gguf_header(base).tensors}
    for tensor in read_gguf_header(merged.path).tensors:
        assert tensor.tensor_type == base_tensors[tensor.name].tensor_type
        if tensor.name not in merged.lora_tensors:
            np.testing.assert_array_equal(np.asarray(tensor.data), np.asarray(base_tensors[tensor.name].data))
    # The merged tensor is the 4-bit rounding of teacher + (alpha / r) B A, not of the teacher.
    from recover_lora.recovery.merge import lora_deltas

    delta = lora_deltas(run / "adapter", base)["model.layers.1.mlp.down_proj.weight"]
    teacher = pad_model(load_model(STORIES_DIR)).tensors["model.layers.1.mlp.down_proj.weight"]
    written = read_gguf(merged.path).tensors["model.layers.1.mlp.down_proj.weight"]
    assert np.linalg.norm(written - (teacher + delta)) < 0.3 * np.linalg.norm(delta)
    # And llama.cpp runs it like the torch student of the same file.
    ids = sample_tokens(40, seed=5)
    student, _ = build_student(merged.path)
    rendered = write_gguf(read_gguf(merged.path), tmp_path / "merged.f32.gguf")
    assert max_rel(torch_logits(student, ids), llama_cpp_logits(rendered, ids, f32_kv_cache=True)) < 1e-4


def test_merge_refuses_another_base_and_leaves_nothing_when_killed(base, trained_blocks, tmp_path, monkeypatch, tiny_hf_model):
    from recover_lora.export.quantize import export_model

    torch_threads()
    w4 = export_model(STORIES_DIR, tmp_path / "w4.gguf", "w4", threads=2).path
    with pytest.raises(RecoverLoraError, match="not a Q2_K tensor of w4.gguf"):
        merge_run(w4, trained_blocks, tmp_path / "out.gguf")
    run = fake_adapter(base, tmp_path / "run", ["model.layers.0.mlp.down_proj"], 0.1)
    other = export_model(tiny_hf_model("llama", hidden=512), tmp_path / "other.gguf", "gateup", threads=2).path
    with pytest.raises(RecoverLoraError, match="another"):
        merge_run(other, run, tmp_path / "out.gguf", teacher=STORIES_DIR)
    with pytest.raises(RecoverLoraError, match="neither an adapter/ nor"):
        merge_run(base, tmp_path, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()

    import recover_lora.export.llama_load as llama_load

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llama_load, "llama_cpp_load_check", killed)
    with pytest.raises(KeyboardInterrupt):
        merge_run(base, run, tmp_path / "killed.gguf", teacher=STORIES_DIR)
    assert not (tmp_path / "killed.gguf").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_pareto_dominance():
    from recover_lora.pareto import dominated_by

    axes = {"bytes": "min", "kl": "min", "tok_s": "max"}
    rows = {
        "w4": {"bytes": 112, "kl": 0.01, "tok_s": 99},
        "gateup": {"bytes": 96, "kl": 0.41, "tok_s": 105},
        "gateup+adapter": {"bytes": 98, "kl": 0.28, "tok_s": 90},
        "recovered": {"bytes": 96, "kl": 0.25, "tok_s": 105},
        "teacher": {"bytes": 500, "kl": 0.0, "tok_s": None},
    }
    result = dominated_by(rows, axes)
    assert result["gateup"] == ["recovered"] and result["gateup+adapter"] == ["recovered"]
    assert result["w4"] == [] and result["recovered"] == [] and result["teacher"] == []
    assert dominated_by({"a": {"kl": 1.0}, "b": {"kl": 1.0}}, {"kl": "min"}) == {"a": [], "b": []}  # ties dominate nothing
    with pytest.raises(RecoverLoraError, match="must be 'min' or 'max'"):
        dominated_by(rows, {"kl": "lower"})


def test_block_scale_run_resumes_bit_identically_after_a_kill(base, synth, tmp_path):
    from recover_lora.recovery.distill import TrainHooks

    settings = dict(base=base, samples=synth, teacher=str(STORIES_DIR), targets="ffn_down", block_scales=True,
                    block_scales_lr=1e-2, rank=4, batch_size=4, max_steps=4, checkpoint_every=2, progress=False)
    train(TrainConfig(output=tmp_path / "straight", **settings))

    def killed_after_step_2(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(output=tmp_path / "resumed", **settings), TrainHooks(after_step=killed_after_step_2))
    train(TrainConfig(output=tmp_path / "resumed", resume=True, **settings))
    from safetensors.numpy import load_file

    for name in (BLOCK_SCALES_FILE, "adapter/adapter_model.safetensors"):  # tensors (the header's key order is not fixed)
        straight, resumed = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))
        assert sorted(straight) == sorted(resumed) and all(np.array_equal(straight[k], resumed[k]) for k in straight), name


def test_cli_trains_block_scales_and_merges_them(base, synth, tmp_path, capsys):
    from test_distill import cli

    args = ["train", "--base", str(base), "--samples", str(synth), "--teacher", str(STORIES_DIR), "--out", str(tmp_path / "run"),
            "--max-steps", "2", "--batch-size", "4", "--no-progress"]
    assert cli(args + ["--targets", "none", "--block-scales"]) == 0
    assert "block scales:" in capsys.readouterr().out
    merge = ["merge", str(tmp_path / "run"), "--base", str(base), "-o", str(tmp_path / "one.gguf")]
    assert cli(merge) == 0
    assert "0 tensors re-quantized with the LoRA merged in, 10 with trained Q2_K block scales" in capsys.readouterr().out
    assert cli(merge) == 2 and "pass --force" in capsys.readouterr().err  # an existing output is never overwritten silently
    assert cli(args + ["--targets", "none", "--no-block-scales", "--force"]) == 2
    assert "--targets none trains nothing" in capsys.readouterr().err
    assert cli(args + ["--targets", "ffn_gate", "--block-scales", "--force"]) == 2
    assert "--block-scales already trains" in capsys.readouterr().err


def test_high_bit_targets_are_the_quantized_linears_that_are_not_low_bit(base, tmp_path):
    from recover_lora.recovery.student import read_student_info, target_tensor_names

    info = read_student_info(base)
    high, low = target_tensor_names(info, "high-bit"), target_tensor_names(info, "low-bit")
    assert high and low and not set(high) & set(low)
    assert sorted(high + low) == sorted(target_tensor_names(info, "all"))
    assert {n.split(".")[2] for n in high} == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_down"}
