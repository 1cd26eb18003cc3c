"""AutoRound's GGUF baseline (export/autoround.py): made from the teacher, loaded and decoded by llama.cpp."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from conftest import llama_cpp_logits, sample_tokens, torch_logits, torch_threads
from recover_lora.errors import RecoverLoraError
from recover_lora.export.autoround import AutoRoundBaseline, autoround_gguf, model_architecture, teacher_hf_folder, unsupported_reason

K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


def calibration(vocab: int, n: int = 4, seq: int = 32) -> torch.Tensor:
    return torch.tensor([sample_tokens(seq, vocab, seed=i) for i in range(n)])


def test_baseline_names_parse_and_refuse_unknown_schemes():
    assert AutoRoundBaseline.parse("q3_k_m@0") == AutoRoundBaseline("gguf:q3_k_m", 0)
    assert AutoRoundBaseline.parse("gguf:Q4_K_M").iters == 200  # AutoRound's own default
    assert AutoRoundBaseline("gguf:q2_k_s", 50).label == "AutoRound q2_k_s iters 50"
    with pytest.raises(RecoverLoraError, match="unknown AutoRound GGUF scheme 'gguf:iq4_xs'; use one of: gguf:q4_0"):
        AutoRoundBaseline.parse("iq4_xs@0")
    with pytest.raises(RecoverLoraError, match="whole number"):
        AutoRoundBaseline.parse("q3_k_m@many")
    with pytest.raises(RecoverLoraError, match="must be >= 0"):
        AutoRoundBaseline("gguf:q3_k_m", -1)


def test_teacher_folder_of_a_gguf_holds_the_teacher(tmp_path, stories_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recover_lora.export.gguf_io import write_gguf
    from recover_lora.export.sources import load_model
    from recover_lora.export.torch_model import to_hf_model

    torch_threads()
    source = tmp_path / "stories.f32.gguf"
    write_gguf(load_model(stories_dir), source, dtype="f32")
    assert teacher_hf_folder(stories_dir, tmp_path / "unused") == stories_dir  # an HF folder is used as it is
    folder = teacher_hf_folder(source, tmp_path / "teacher")
    tokens = sample_tokens(24)
    expected = torch_logits(to_hf_model(load_model(source)), tokens)
    np.testing.assert_array_equal(torch_logits(AutoModelForCausalLM.from_pretrained(folder), tokens), expected)
    text = "Once upon a time, a little girl found a red ball."
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == AutoTokenizer.from_pretrained(stories_dir)(text)["input_ids"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_autoround_file_has_its_scheme_and_decodes_in_llama_cpp(tmp_path, stories_dir, tiny_hf_model, arch):
    # stories260K (widths 64 / 172: no K-quant fits, AutoRound falls back per tensor) and a qwen2 of K-quant
    # widths with q/k/v biases, as Qwen2.5 checkpoints are shaped.
    source = stories_dir if arch == "llama" else tiny_hf_model("qwen2", num_hidden_layers=2)
    out = tmp_path / "autoround.gguf"
    reason = unsupported_reason(model_architecture(source))
    if reason is not None:  # AutoRound 0.16.1's converter with PyPI's gguf 0.19.0: refused in seconds, nothing written
        assert arch != "llama", reason
        with pytest.raises(RecoverLoraError, match="GGUF converter cannot write Qwen2ForCausalLM"):
            autoround_gguf(source, out, AutoRoundBaseline.parse("q4_k_m@0"), calibration(512))
        assert list(tmp_path.iterdir()) == [source] if source.parent == tmp_path else not list(tmp_path.iterdir())
        return
    result = autoround_gguf(source, out, AutoRoundBaseline.parse("q4_k_m@0"), calibration(512))
    reader = gguf.GGUFReader(out)
    assert reader.fields[gguf.Keys.General.FILE_TYPE].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    linears = {t.name: t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    assert result.types == {t.name: t.tensor_type.name for t in reader.tensors}
    if arch == "llama":
        assert not K_TYPES & set(linears.values()), linears
    else:
        assert K_TYPES & set(linears.values()), linears
    assert not list(tmp_path.glob("*.autoround.log")) and not list(tmp_path.glob(".recover-lora-*"))
    tokens = sample_tokens(16)
    logits = llama_cpp_logits(out, tokens)
    assert np.isfinite(logits).all()
    from transformers import AutoModelForCausalLM

    torch_threads()
    teacher = torch_logits(AutoModelForCausalLM.from_pretrained(source), tokens)
    assert np.corrcoef(logits.ravel(), teacher.ravel())[0, 1] > 0.9  # a 4-bit copy of the teacher, not noise


def test_autoround_refuses_bad_calibration_and_keeps_existing_output(tmp_path, stories_dir):
    out = tmp_path / "autoround.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(RecoverLoraError, match="already exists; pass --force"):
        autoround_gguf(stories_dir, out, AutoRoundBaseline.parse("q4_0@0"), calibration(512))
    with pytest.raises(RecoverLoraError, match=r"calibration windows \[n, seq_len\]"):
        autoround_gguf(stories_dir, out, AutoRoundBaseline.parse("q4_0@0"), torch.zeros(0, 8, dtype=torch.long), force=True)
    assert out.read_bytes() == b"keep"
