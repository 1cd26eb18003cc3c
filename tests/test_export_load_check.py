"""No file leaves `export` that llama.cpp cannot load; `check-adapter` loads base + adapter for real."""

from __future__ import annotations

import re
import struct
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from recover_lora.cli import main
from recover_lora.errors import RecoverLoraError
from recover_lora.export.gguf_header import read_gguf_header
from recover_lora.export.llama_load import llama_cpp_load_check, refusal_reason

from conftest import STORIES_DIR

# What llama.cpp says when a tensor does not have the shape its loader expects (src/llama-model-loader.cpp).
WRONG_SHAPE = r"check_tensor_dims: tensor 'blk\.0\.ffn_gate\.weight' has wrong shape; expected"


def set_uint32(path: Path, key: str, value: int) -> None:
    """Overwrite a uint32 metadata value in place (the file's layout does not change)."""
    field = read_gguf_header(path).get_field(key)
    assert field.types == [gguf.GGUFValueType.UINT32], key
    with open(path, "r+b") as f:
        f.seek(field.value_offset)
        f.write(struct.pack("<I", value))


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


@pytest.fixture
def private_tempdir(tmp_path, monkeypatch) -> Path:
    """tempfile's folder for this test only, to see that llama.cpp's load log is removed."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture(scope="module")
def stories_gateup(tmp_path_factory) -> Path:
    from recover_lora.export.quantize import export_model

    return export_model(STORIES_DIR, tmp_path_factory.mktemp("good") / "stories.gateup.gguf", "gateup", threads=2).path


@pytest.fixture(scope="module")
def unloadable_base(stories_gateup, tmp_path_factory) -> Path:
    """The good export with a feed-forward length its tensors do not have: llama.cpp refuses it at load."""
    path = tmp_path_factory.mktemp("bad") / "unloadable.gguf"
    path.write_bytes(stories_gateup.read_bytes())
    set_uint32(path, "llama.feed_forward_length", 100)
    return path


def test_refusal_reason_picks_llama_cpps_own_line():
    log = (
        "llama_model_loader: - type q4_K:   20 tensors\n"
        "llama_model_load: error loading model: check_tensor_dims: tensor 'blk.0.attn_q.weight' has wrong shape; "
        "expected  1024,  1024, got  1024,  1792,     1,     1\n"
        "llama_model_load_from_file_impl: failed to load model\n"
    )
    assert refusal_reason(log) == (
        "check_tensor_dims: tensor 'blk.0.attn_q.weight' has wrong shape; expected  1024,  1024, got  1024,  1792,     1,     1"
    )
    adapter_log = "llama_adapter_lora_init_impl: x\nllama_adapter_lora_init: failed to apply lora adapter: bad alpha\n"
    assert refusal_reason(adapter_log) == "bad alpha"
    assert refusal_reason("something failed here\nanother error\n") == "something failed here"
    assert refusal_reason("all fine\n") is None


def test_a_good_export_loads_and_the_log_is_removed(stories_gateup, private_tempdir):
    llama_cpp_load_check(stories_gateup)
    assert list(private_tempdir.iterdir()) == []


def test_an_unloadable_file_is_refused_with_llama_cpps_reason(unloadable_base, private_tempdir):
    with pytest.raises(RecoverLoraError, match=WRONG_SHAPE) as info:
        llama_cpp_load_check(unloadable_base, name="out.gguf")
    assert str(info.value).startswith("llama.cpp cannot load out.gguf: ") and "\n" not in str(info.value)
    assert list(private_tempdir.iterdir()) == []


def test_export_refuses_what_llama_cpp_cannot_load_and_leaves_nothing(tmp_path, capsys, monkeypatch, private_tempdir):
    """The quantizer's output is broken after the type check would pass: export must fail and keep nothing."""
    from recover_lora.export import quantize

    real_quantize = quantize.llama_cpp_quantize

    def quantize_then_break(src, dst, types, *args, **kwargs):
        real_quantize(src, dst, types, *args, **kwargs)
        set_uint32(Path(dst), "llama.feed_forward_length", 100)

    monkeypatch.setattr(quantize, "llama_cpp_quantize", quantize_then_break)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "stories.gguf"
    code, _, err = run_cli(["export", str(STORIES_DIR), "-o", str(out), "--policy", "w4", "--threads", "2"], capsys)
    assert code == 2
    assert err.startswith(f"error: llama.cpp cannot load {out}: ") and "\n" not in err
    assert re.search(WRONG_SHAPE, err)
    assert list(out_dir.iterdir()) == []  # no output, no temporary file, no work folder, no log
    assert list(private_tempdir.iterdir()) == []


def lora_adapter(path: Path, base: Path, extra_strings: dict[str, str] | None = None) -> Path:
    """A llama.cpp LoRA GGUF for blk.0.ffn_up of `base` (shapes read from the base), rank 4."""
    ffn_up = next(t for t in read_gguf_header(base).tensors if t.name == "blk.0.ffn_up.weight")
    in_features, out_features = (int(d) for d in ffn_up.shape.tolist())  # ggml order: ne[0] is the input width
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 8.0)
    for key, value in (extra_strings or {}).items():
        writer.add_string(key, value)
    writer.add_tensor("blk.0.ffn_up.weight.lora_a", rng.normal(0, 0.1, (4, in_features)).astype(np.float32))
    writer.add_tensor("blk.0.ffn_up.weight.lora_b", rng.normal(0, 0.1, (out_features, 4)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_check_adapter_loads_base_and_adapter_in_llama_cpp(stories_gateup, unloadable_base, tmp_path, capsys, private_tempdir):
    good = lora_adapter(tmp_path / "good.gguf", stories_gateup)
    code, out, err = run_cli(["check-adapter", str(good), "--base", str(stories_gateup)], capsys)
    assert (code, err) == (0, "") and out.startswith("ok: good.gguf fits")

    # Our shape checks pass (the tensors are the same), but llama.cpp refuses the base itself.
    code, _, err = run_cli(["check-adapter", str(good), "--base", str(unloadable_base)], capsys)
    assert code == 2 and err.startswith(f"error: llama.cpp cannot load {unloadable_base}: ") and "\n" not in err
    assert re.search(WRONG_SHAPE, err)

    # An adapter our checks accept but llama.cpp refuses (aLoRA invocation tokens must be a uint32 array).
    odd = lora_adapter(tmp_path / "odd.gguf", stories_gateup, {"adapter.alora.invocation_tokens": "not an array"})
    code, _, err = run_cli(["check-adapter", str(odd), "--base", str(stories_gateup)], capsys)
    assert code == 2 and err.startswith(f"error: llama.cpp refuses adapter {odd} on {stories_gateup}: ")
    assert "invalid gguf type for adapter.alora.invocation_tokens" in err and "\n" not in err
    assert list(private_tempdir.iterdir()) == []
