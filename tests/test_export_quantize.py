"""The exporter: per-tensor types from llama.cpp's quantizer, verified; bad input is refused cleanly."""

import json
import shutil

import gguf
import pytest

from recover_lora.cli import main
from recover_lora.errors import RecoverLoraError
from recover_lora.export.gguf_info import summarize_gguf
from recover_lora.export.policy import Policy, TensorTypeRule
from recover_lora.export.quantize import export_model
from recover_lora.export.sources import load_model


def _types(path):
    return {t.name: t.ggml_type for t in summarize_gguf(path).tensors}


def test_gateup_export_pads_and_has_the_asked_types(stories_dir, tmp_path):
    result = export_model(stories_dir, tmp_path / "gateup.gguf", "gateup")
    assert result.padded
    types = _types(result.path)
    for name, ggml_type in types.items():
        if ".ffn_gate." in name or ".ffn_up." in name:
            assert ggml_type == "Q2_K", name
        elif name.startswith("blk.") and name.endswith(".weight") and "norm" not in name:
            assert ggml_type == "Q4_K", name
        elif name == "token_embd.weight":
            assert ggml_type == "Q6_K"
        else:
            assert ggml_type == "F32", name
    summary = summarize_gguf(result.path)
    assert summary.unpadded["hidden_size"] == 64
    linears = [t for t in summary.tensors if t.name.startswith("blk.") and t.ggml_type != "F32"]
    assert 2.6 < 8 * sum(t.n_bytes for t in linears) / sum(t.n_elements for t in linears) < 4.5  # per stored weight
    assert summary.linear_bits_per_weight > 16  # per weight of the model: 64 -> 256 wide rows store four times as many
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_llama_cpp_log_stays_out_of_the_terminal(stories_dir, tmp_path, capfd):
    export_model(stories_dir, tmp_path / "w4.gguf", "w4")
    assert "converting to" not in capfd.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w4.gguf"]  # no log left after a success


def test_quantizer_failure_keeps_its_log_and_says_where(tmp_path):
    from recover_lora.export.quantize import llama_cpp_quantize

    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    log = tmp_path / "out.gguf.quantize.log"
    with pytest.raises(RecoverLoraError, match="llama.cpp failed to quantize .*its log is .*out.gguf.quantize.log"):
        llama_cpp_quantize(tmp_path / "broken.gguf", tmp_path / "out.gguf", {}, log_path=log)
    assert log.stat().st_size > 0


def test_user_rule_on_top_of_policy(tiny_hf_model, tmp_path):
    rule = TensorTypeRule.parse(r"blk\.0\.ffn_down\.weight=Q8_0")
    result = export_model(tiny_hf_model("qwen2"), tmp_path / "q.gguf", Policy.named("w4", rules=[rule]))
    assert not result.padded  # hidden 256: no padding needed
    types = _types(result.path)
    assert types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.1.ffn_down.weight"] == "Q4_K"
    assert types["blk.0.attn_q.bias"] == "F32"


def test_pad_none_refuses_instead_of_falling_back(stories_dir, tmp_path):
    with pytest.raises(RecoverLoraError, match="fall back.*--pad auto"):
        export_model(stories_dir, tmp_path / "x.gguf", "gateup", pad="none")
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_source_is_requantized(stories_dir, tmp_path):
    first = export_model(stories_dir, tmp_path / "w4.gguf", "w4")
    second = export_model(first.path, tmp_path / "gateup-from-gguf.gguf", "gateup")
    assert _types(second.path)["blk.0.ffn_up.weight"] == "Q2_K"
    assert load_model(second.path).config.hidden_size == 256


def _run_cli(args, capsys):
    capsys.readouterr()  # drop what the test's own set-up printed
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err.strip()


def _truncate(path, keep_bytes):
    data = path.read_bytes()[:keep_bytes]
    path.write_bytes(data)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("truncated-safetensors", "not a readable safetensors"),
        ("truncated-gguf", "not a readable GGUF"),
        ("unknown-type", "unknown ggml type"),
        ("regex-matches-nothing", "matches no tensor"),
        ("existing-output", "already exists"),
        ("unknown-policy", "unknown policy"),
    ],
)
def test_bad_input_is_one_line_error_and_leaves_nothing(stories_dir, tmp_path, capsys, case, message):
    source = tmp_path / "model"
    shutil.copytree(stories_dir, source)
    out = tmp_path / "out.gguf"
    args = ["export", str(source), "-o", str(out)]
    if case == "missing":
        args[1] = str(tmp_path / "nope")
    elif case == "truncated-safetensors":
        _truncate(source / "model.safetensors", 5000)
    elif case == "truncated-gguf":
        export_model(source, tmp_path / "whole.gguf", "w4")
        _truncate(tmp_path / "whole.gguf", 20000)
        args[1] = str(tmp_path / "whole.gguf")
    elif case == "unknown-type":
        args += ["--tensor-type", r"blk\.0\.ffn_up\.weight=Q3_XL"]
    elif case == "regex-matches-nothing":
        args += ["--tensor-type", r"blk\.42\.ffn_up\.weight=Q8_0"]
    elif case == "existing-output":
        out.write_bytes(b"keep me")
    elif case == "unknown-policy":
        args += ["--policy", "w3"]
    code, err = _run_cli(args, capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and "\n" not in err
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers
    if case == "existing-output":
        assert out.read_bytes() == b"keep me"
    else:
        assert not out.exists()


def test_inspect_command_json(stories_dir, tmp_path, capsys):
    export_model(stories_dir, tmp_path / "w4.gguf", "w4")
    main_args = ["inspect", str(tmp_path / "w4.gguf"), "--json", str(tmp_path / "w4.json")]
    try:
        main(main_args)
    except SystemExit as e:
        assert e.code in (0, None)
    printed = capsys.readouterr().out
    assert "Q4_K" in printed and "bits/weight" in printed
    data = json.loads((tmp_path / "w4.json").read_text())
    assert data["count_by_type"]["Q4_K"] == 5 * 7
    assert data["architecture"] == "llama"
    assert len(data["tensors"]) == len(gguf.GGUFReader(tmp_path / "w4.gguf").tensors)


def test_random_weights_of_a_config_shape(tmp_path):
    from recover_lora.runtime.llama import LlamaOptions, load_llama

    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 600, "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 512, "tie_word_embeddings": True,
    }
    (tmp_path / "shape.json").write_text(json.dumps(config))
    result = export_model(tmp_path / "shape.json", tmp_path / "random.gguf", "gateup", random_weights=True)
    summary = summarize_gguf(result.path)
    assert summary.count_by_type() == {"Q2_K": 4, "Q4_K": 10, "Q6_K": 1, "F32": 9}
    assert [t.shape for t in summary.tensors if t.name == "blk.0.ffn_up.weight"] == [[512, 256]]
    llm = load_llama(result.path, options=LlamaOptions(n_ctx=64, threads=2)).llm
    # bos + one byte token per byte of "speed▁test" (SentencePiece writes the space as U+2581, 3 bytes)
    assert len(llm.tokenize(b"speed test")) == 1 + len("speed\u2581test".encode())
    llm.eval(llm.tokenize(b"speed test"))
    llm.close()
