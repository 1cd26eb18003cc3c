"""LoRA adapter GGUF: llama.cpp applies it exactly as the torch student + peft LoRA, and bad ones are refused."""

from __future__ import annotations

from pathlib import Path

import functools
import gguf
import numpy as np
import pytest

from conftest import STORIES_DIR, llama_cpp_logits, sample_tokens, torch_threads
from recover_lora.errors import RecoverLoraError
from recover_lora.recovery.adapter_gguf import check_adapter_against_base, gguf_alpha, write_adapter_gguf
from recover_lora.recovery.student import build_student, build_teacher, target_module_names



@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """The gateup export of stories260K (padded), and an F32 rendering of its dequantized weights.

    The F32 rendering has the same tensor names and shapes; llama.cpp computes it without the
    8-bit activation rounding of its quantized kernels, so adapter maths can be compared tightly.
    """
    from recover_lora.export.gguf_io import read_gguf, write_gguf
    from recover_lora.export.quantize import export_model

    folder = tmp_path_factory.mktemp("adapter")
    quantized = folder / "stories.gateup.gguf"
    export_model(STORIES_DIR, quantized, "gateup", threads=2)
    rendered = write_gguf(read_gguf(quantized), folder / "stories.dequantized.f32.gguf")
    return {"quantized": quantized, "f32": rendered}


def random_lora(base: Path, targets: str, out_dir: Path, rank: int = 4, seed: int = 0):
    """peft LoRA on the student with random non-zero B (as after training); returns (peft model, dir)."""
    torch = torch_threads()
    from peft import LoraConfig, get_peft_model

    student, info = build_student(base)
    torch.manual_seed(seed)
    model = get_peft_model(student, LoraConfig(r=rank, lora_alpha=2.0 * rank, target_modules=target_module_names(info, targets)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(out_dir)
    return model, out_dir


def torch_logits(model, tokens, adapter: bool = True) -> np.ndarray:
    torch = torch_threads()
    import contextlib

    with torch.no_grad(), (contextlib.nullcontext() if adapter else model.disable_adapter()):
        return model(torch.tensor([tokens])).logits[0].float().numpy()


llama_logits = functools.partial(llama_cpp_logits, f32_kv_cache=True)  # (base, tokens, lora)


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("targets", ["low-bit", "all"])
def test_llama_cpp_applies_the_adapter_like_torch(bases, tmp_path, targets):
    model, folder = random_lora(bases["quantized"], targets, tmp_path / "peft")
    adapter = tmp_path / "adapter.gguf"
    summary = write_adapter_gguf(folder, bases["quantized"], adapter, dtype="f32")
    kinds = {name.split(".")[2] for name in summary.base_tensors}
    assert kinds == ({"ffn_gate", "ffn_up"} if targets == "low-bit" else {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"})
    tokens = sample_tokens(40)
    with_lora, without = torch_logits(model, tokens), torch_logits(model, tokens, adapter=False)
    assert max_rel(with_lora, without) > 0.1  # the adapter really changes the output
    # Exact maths on the same weights (F32 rendering of the base): float rounding only.
    assert max_rel(with_lora, llama_logits(bases["f32"], tokens, adapter)) < 1e-4
    # The deployed quantized base: within llama.cpp's 8-bit activation rounding, far from the no-adapter logits.
    on_quantized = llama_logits(bases["quantized"], tokens, adapter)
    assert max_rel(with_lora, on_quantized) < 0.1
    assert max_rel(with_lora, on_quantized) < 0.2 * max_rel(without, on_quantized)


def test_q_k_rows_need_llama_cpp_rotary_permutation(bases, tmp_path, monkeypatch):
    """Negative control: skipping the q/k row permutation of lora_b gives visibly wrong logits."""
    model, folder = random_lora(bases["quantized"], "attn_q,attn_k", tmp_path / "peft")
    from recover_lora.export.archs.llama import Llama

    monkeypatch.setattr(Llama, "lora_delta_to_gguf", classmethod(lambda cls, module, lora_b, config: lora_b))
    adapter = write_adapter_gguf(folder, bases["quantized"], tmp_path / "unpermuted.gguf", dtype="f32").path
    tokens = sample_tokens(40)
    assert max_rel(torch_logits(model, tokens), llama_logits(bases["f32"], tokens, adapter)) > 1e-2


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_compact_adapter_types_stay_close(bases, tmp_path, dtype):
    """F16/Q8_0 round the adapter (and llama.cpp then rounds activations to the same type): the
    error stays a small fraction of what the adapter changes."""
    model, folder = random_lora(bases["quantized"], "low-bit", tmp_path / "peft", rank=32)
    summary = write_adapter_gguf(folder, bases["quantized"], tmp_path / f"adapter.{dtype}.gguf", dtype=dtype)
    assert set(summary.tensor_types.values()) == {"F16" if dtype == "f16" else "Q8_0"}
    tokens = sample_tokens(40)
    with_lora, without = torch_logits(model, tokens), torch_logits(model, tokens, adapter=False)
    error = np.max(np.abs(with_lora - llama_logits(bases["f32"], tokens, summary.path)))
    effect = np.max(np.abs(with_lora - without))
    assert error < (0.01 if dtype == "f16" else 0.05) * effect


def test_q8_0_keeps_f16_where_rows_are_not_whole_blocks(bases, tmp_path):
    _, folder = random_lora(bases["quantized"], "low-bit", tmp_path / "peft", rank=4)
    summary = write_adapter_gguf(folder, bases["quantized"], tmp_path / "adapter.gguf", dtype="q8_0")
    assert summary.tensor_types["blk.0.ffn_gate.weight.lora_a"] == "Q8_0"  # rows of 256
    assert summary.tensor_types["blk.0.ffn_gate.weight.lora_b"] == "F16"  # rows of r = 4


def test_adapter_metadata(bases, tmp_path):
    _, folder = random_lora(bases["quantized"], "low-bit", tmp_path / "peft", rank=4)
    path = write_adapter_gguf(folder, bases["quantized"], tmp_path / "adapter.gguf").path
    reader = gguf.GGUFReader(path)
    assert reader.get_field(gguf.Keys.General.TYPE).contents() == "adapter"
    assert reader.get_field(gguf.Keys.Adapter.TYPE).contents() == "lora"
    assert reader.get_field(gguf.Keys.General.ARCHITECTURE).contents() == "llama"
    alpha = reader.get_field(gguf.Keys.Adapter.LORA_ALPHA)
    assert alpha.types == [gguf.GGUFValueType.FLOAT32] and alpha.contents() == pytest.approx(8.0)
    a = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight.lora_a")
    b = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight.lora_b")
    # ggml order (ne[0] first): lora_a (in, r), lora_b (r, out), as llama-adapter.cpp checks.
    assert a.shape.tolist() == [256, 4] and b.shape.tolist() == [4, 256]
    summary = check_adapter_against_base(path, bases["quantized"])
    assert summary.ranks == [4] and len(summary.base_tensors) == 10


def test_rslora_alpha_keeps_peft_scaling():
    assert gguf_alpha({"lora_alpha": 8, "r": 4}) == 8.0
    assert gguf_alpha({"lora_alpha": 8, "r": 4, "use_rslora": True}) / 4 == pytest.approx(8 / 4**0.5)


def test_adapter_of_the_unpadded_model_is_refused(bases, tmp_path):
    """llama-cpp-python 0.3.36 does not refuse such a file: llama.cpp logs "incorrect shape", returns
    an adapter anyway and the process segfaults at the first eval. So the check must come first."""
    torch_threads()
    from peft import LoraConfig, get_peft_model

    teacher, _ = build_teacher(STORIES_DIR)  # hidden 64: the model before padding
    model = get_peft_model(teacher, LoraConfig(r=4, target_modules=["model.layers.0.mlp.gate_proj"]))
    model.save_pretrained(tmp_path / "unpadded")
    with pytest.raises(RecoverLoraError, match=r"blk\.0\.ffn_gate\.weight.*unpadded"):
        write_adapter_gguf(tmp_path / "unpadded", bases["quantized"], tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    bad = hand_adapter(tmp_path / "bad.gguf", "llama", {"blk.0.ffn_gate.weight": (np.zeros((4, 64)), np.zeros((172, 4)))})
    with pytest.raises(RecoverLoraError, match=r"blk\.0\.ffn_gate\.weight.*\(4, 64\)"):
        check_adapter_against_base(bad, bases["quantized"])


def hand_adapter(path: Path, arch: str, pairs: dict, general_type: str = "adapter", extra: dict | None = None) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(general_type)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    for name, (a, b) in pairs.items():
        if a is not None:
            writer.add_tensor(f"{name}.lora_a", np.asarray(a, dtype=np.float32))
        if b is not None:
            writer.add_tensor(f"{name}.lora_b", np.asarray(b, dtype=np.float32))
    for name, array in (extra or {}).items():
        writer.add_tensor(name, np.asarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GOOD = (np.zeros((4, 256)), np.zeros((256, 4)))


@pytest.mark.parametrize(
    "arch,pairs,general_type,extra,message",
    [
        ("qwen2", {"blk.0.ffn_gate.weight": GOOD}, "adapter", None, "architecture 'qwen2'"),
        ("llama", {"blk.0.ffn_gate.weight": GOOD}, "model", None, "general.type='model'"),
        ("llama", {"blk.0.ffn_gate.weight": (GOOD[0], None)}, "adapter", None, "lacks its lora_b"),
        ("llama", {"blk.9.ffn_gate.weight": GOOD}, "adapter", None, "blk.9.ffn_gate.weight"),
        ("llama", {"blk.0.ffn_gate.weight": (np.zeros((4, 256)), np.zeros((256, 8)))}, "adapter", None, "lora_b"),
        ("llama", {"blk.0.ffn_gate.weight": GOOD}, "adapter", {"blk.0.ffn_gate.weight.lora_c": np.zeros(4)}, "lora_c"),
        ("llama", {}, "adapter", None, "no LoRA tensor pairs"),
    ],
)
def test_mismatched_adapters_are_refused_naming_the_tensor(bases, tmp_path, arch, pairs, general_type, extra, message):
    path = hand_adapter(tmp_path / "adapter.gguf", arch, pairs, general_type, extra)
    with pytest.raises(RecoverLoraError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_adapter_against_base(path, bases["quantized"])


def test_a_well_formed_hand_adapter_passes(bases, tmp_path):
    path = hand_adapter(tmp_path / "adapter.gguf", "llama", {"blk.0.ffn_gate.weight": GOOD, "blk.1.attn_q.weight": GOOD})
    assert check_adapter_against_base(path, bases["quantized"]).base_tensors == ["blk.0.ffn_gate.weight", "blk.1.attn_q.weight"]


def test_export_refuses_bad_dtype_and_existing_output(bases, tmp_path):
    _, folder = random_lora(bases["quantized"], "low-bit", tmp_path / "peft")
    with pytest.raises(RecoverLoraError, match="f16, f32, q8_0"):
        write_adapter_gguf(folder, bases["quantized"], tmp_path / "a.gguf", dtype="q4_k")
    write_adapter_gguf(folder, bases["quantized"], tmp_path / "a.gguf")
    with pytest.raises(RecoverLoraError, match="--force"):
        write_adapter_gguf(folder, bases["quantized"], tmp_path / "a.gguf")
    with pytest.raises(RecoverLoraError, match="adapter_config.json"):
        write_adapter_gguf(tmp_path / "nothing-here", bases["quantized"], tmp_path / "b.gguf")
