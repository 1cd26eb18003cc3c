"""The fast GGUF header reader agrees with gguf-py's GGUFReader, and bad files are one-line errors."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from recover_lora.errors import RecoverLoraError
from recover_lora.export.gguf_header import read_gguf_header

from conftest import STORIES_DIR

T = gguf.GGMLQuantizationType


def assert_same_as_gguf_reader(path: Path) -> None:
    """Every field (key order, types, value) and every tensor (table entry and data) as GGUFReader has them."""
    reader = gguf.GGUFReader(path)
    header = read_gguf_header(path)
    assert list(header.fields) == list(reader.fields)
    for key, expected in reader.fields.items():
        got = header.get_field(key)
        assert got.types == expected.types, key
        assert got.contents() == expected.contents(), key
    assert header.get_field("no.such.key") is None
    assert len(header.tensors) == len(reader.tensors)
    for got, expected in zip(header.tensors, reader.tensors):
        assert got.name == expected.name
        assert got.tensor_type == expected.tensor_type, got.name
        assert got.shape.tolist() == expected.shape.tolist(), got.name
        assert (got.n_elements, got.n_bytes, got.data_offset) == (expected.n_elements, expected.n_bytes, expected.data_offset)
        assert got.data.dtype == expected.data.dtype and got.data.shape == expected.data.shape, got.name
        assert np.array_equal(got.data, expected.data), got.name


@pytest.fixture(scope="module")
def stories_files(tmp_path_factory) -> dict[str, Path]:
    """stories260K as written by the exporter: F32, and quantized by llama.cpp (Q4_K/Q6_K, padded)."""
    from recover_lora.export.gguf_io import write_gguf
    from recover_lora.export.quantize import export_model
    from recover_lora.export.sources import load_model

    folder = tmp_path_factory.mktemp("stories")
    return {
        "f32": write_gguf(load_model(STORIES_DIR), folder / "stories.f32.gguf"),
        "gateup": export_model(STORIES_DIR, folder / "stories.gateup.gguf", "gateup", threads=2).path,
    }


def every_value_type_gguf(path: Path, endianess=gguf.GGUFEndian.LITTLE) -> Path:
    """A GGUF with one key of every value type, empty arrays, and tensors of several ggml types."""
    writer = gguf.GGUFWriter(path, "llama", endianess=endianess)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ✓")
    writer.add_string("t.empty_str", "")
    writer.add_array("t.strings", ["a", "", "ü" * 300, "end"])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.25])
    writer.add_array("t.bools", [True, False])
    writer.add_array("t.empty", [])
    writer.add_uint32("general.alignment", 64)
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 4)).astype(np.float16))
    writer.add_tensor("i32", np.arange(7, dtype=np.int32))
    q8 = rng.standard_normal((4, 64)).astype(np.float32)
    writer.add_tensor("q8_0", gguf.quants.quantize(q8, T.Q8_0), raw_dtype=T.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("which", ["f32", "gateup"])
def test_agrees_with_gguf_reader_on_stories(stories_files, which):
    assert_same_as_gguf_reader(stories_files[which])


@pytest.mark.slow
def test_agrees_with_gguf_reader_on_the_default_model():
    from recover_lora.export.sources import default_model_path

    assert_same_as_gguf_reader(default_model_path())  # Q4_1, 49k-token BPE vocabulary with merges


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG], ids=["little", "big"])
def test_agrees_with_gguf_reader_on_every_value_type(tmp_path, endianess):
    path = every_value_type_gguf(tmp_path / "types.gguf", endianess)
    assert_same_as_gguf_reader(path)
    header = read_gguf_header(path)
    assert header.alignment == 64
    assert header.get_field("t.strings").contents() == ["a", "", "ü" * 300, "end"]
    assert header.get_field("t.strings").contents(2) == "ü" * 300
    assert header.get_field("t.u64").contents() == 2**63 + 5


def test_dequantized_memmap_data_equal_gguf_readers(stories_files):
    path = stories_files["gateup"]
    reader = gguf.GGUFReader(path)
    header = read_gguf_header(path)
    types = {t.tensor_type for t in header.tensors}
    assert {T.Q2_K, T.Q4_K, T.Q6_K} <= types  # really quantized data, not only F32
    for got, expected in zip(header.tensors, reader.tensors):
        assert isinstance(got.data.base, np.memmap) or isinstance(got.data, np.memmap)
        np.testing.assert_array_equal(
            gguf.quants.dequantize(got.data, got.tensor_type), gguf.quants.dequantize(expected.data, expected.tensor_type)
        )


def test_arrays_are_decoded_only_when_asked_for(stories_files):
    header = read_gguf_header(stories_files["f32"])
    tokens = header.get_field(gguf.Keys.Tokenizer.LIST)
    assert not tokens._decoded  # opening walked over the vocabulary without decoding it
    assert tokens.count == 512 and len(tokens.contents()) == 512
    header._decode = None  # decoded once, then cached
    assert tokens.contents()[:3] == ["<unk>", "<s>", "</s>"]


@pytest.mark.parametrize(
    "cut, message",
    [
        ("tensor-data", r"tensor '.+' needs bytes .* but the file ends at"),
        ("vocabulary", r"runs past the end of the file"),
        ("first-bytes", r"runs past the end of the file"),
    ],
)
def test_truncated_file_is_a_one_line_error(stories_files, tmp_path, cut, message):
    data = stories_files["f32"].read_bytes()
    header = read_gguf_header(stories_files["f32"])
    keep = {
        "tensor-data": header.tensors[-1].data_offset + 10,
        "vocabulary": header.get_field(gguf.Keys.Tokenizer.LIST).value_offset + 1000,
        "first-bytes": 10,
    }[cut]
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(data[:keep])
    with pytest.raises(RecoverLoraError, match=message) as info:
        read_gguf_header(truncated)
    assert "\n" not in str(info.value) and "not a readable GGUF file" in str(info.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"PK\x03\x04 a zip file", r"not a GGUF file \(starts with b'PK\\x03\\x04'"),
        (b"", r"not a GGUF file \(starts with b''"),
        (b"GGUF" + (99).to_bytes(4, "little") + bytes(16), "GGUF version 99 is not supported"),
        (b"GGUF" + (3).to_bytes(4, "little") + (1 << 40).to_bytes(8, "little") + bytes(8), "implausible counts"),
    ],
    ids=["zip", "empty", "version", "counts"],
)
def test_foreign_or_corrupt_file_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(RecoverLoraError, match=message) as info:
        read_gguf_header(path, "model")
    assert str(info.value).startswith(f"model file {path} ") and "\n" not in str(info.value)


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(RecoverLoraError, match="does not exist"):
        read_gguf_header(tmp_path / "nothing.gguf")


def test_tokenizer_and_config_read_from_the_header_equal_gguf_readers(stories_files):
    from recover_lora.export.gguf_io import config_from_gguf
    from recover_lora.export.tokenizer import TokenizerSpec

    path = stories_files["gateup"]
    header, reader = read_gguf_header(path), gguf.GGUFReader(path)
    assert TokenizerSpec.from_gguf(header) == TokenizerSpec.from_gguf(reader)
    assert config_from_gguf(header) == config_from_gguf(reader)
