"""Bundled shapes, device profiles, GGUF shape reading, probe and calibration (no timing asserts)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from recover_lora.cli import main
from recover_lora.devices.calibrate import calibrate
from recover_lora.devices.probe import parallel_sum, stream_bandwidth, with_attention_rate, with_matvec_rates
from recover_lora.devices.profiles import (
    CURATED_PROFILES,
    UNIT_SUFFIXES,
    DeviceProfile,
    get_profile,
    load_profiles,
    profile_toml,
    tomllib,
)
from recover_lora.devices.roofline import estimate, token_cost
from recover_lora.devices.shapes import FILE_POLICY, SHAPES_DIR, bundled_shape_names, identify_policy, load_model_shape
from recover_lora.errors import RecoverLoraError
from recover_lora.export.policy import Policy
from recover_lora.runtime.records import backend_ran, machine_identity, parse_record, same_machine

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 256, 512, 4, 2, 64, 64
TINY_TENSORS = {  # one llama block, untied output; numpy (out, in) shapes
    "token_embd.weight": (VOCAB, HIDDEN),
    "output_norm.weight": (HIDDEN,),
    "output.weight": (VOCAB, HIDDEN),
    "blk.0.attn_norm.weight": (HIDDEN,),
    "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
    "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
    "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
    "blk.0.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
    "blk.0.ffn_norm.weight": (HIDDEN,),
    "blk.0.ffn_gate.weight": (FFN, HIDDEN),
    "blk.0.ffn_up.weight": (FFN, HIDDEN),
    "blk.0.ffn_down.weight": (HIDDEN, FFN),
}


# A tiny llama whose attention is wide enough (4 query heads of 128, 2 KV heads) for its time to
# stand out of a decode step's noise at a 1024-token cache.
ATTENTION_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 512, "intermediate_size": 512,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}


def write_tiny_gguf(path: Path, policy: str | None) -> Path:
    """A 1-block llama GGUF whose tensors carry `policy`'s types (zero bytes; Q8_0 if None)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_context_length(128)
    writer.add_vocab_size(VOCAB)
    for name, shape in TINY_TENSORS.items():
        if len(shape) == 1:
            writer.add_tensor(name, np.ones(shape, dtype=np.float32))
            continue
        ggml_type = Policy.named(policy).type_for(name) if policy else T.Q8_0
        block, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
        raw = np.zeros((shape[0], shape[1] // block * block_bytes), dtype=np.uint8)  # only sizes matter here
        writer.add_tensor(name, raw, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(autouse=True)
def results(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "results"
    monkeypatch.setenv("RECOVER_LORA_RESULTS", str(folder))
    return folder


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


@pytest.mark.parametrize("name", bundled_shape_names())
def test_bundled_shapes_load_with_citation(name):
    raw = json.loads((SHAPES_DIR / f"{name}.json").read_text())
    assert raw["_source"].startswith("https://huggingface.co/") and raw["_source"].endswith("config.json")
    shape = load_model_shape(name)
    assert shape.source == raw["_source"] and shape.config.num_layers == raw["num_hidden_layers"]
    assert not shape.is_gguf


def test_bundled_families_span_4b_to_20b():
    params = {n: load_model_shape(n).config.num_linear_parameters() / 1e9 for n in bundled_shape_names()}
    assert set(params) >= {"qwen3-4b", "llama-3.1-8b", "qwen3-14b", "mistral-small-22b"}
    assert 3.5 < params["qwen3-4b"] < 4.5 and 7.5 < params["llama-3.1-8b"] < 8.5
    assert 14 < params["qwen3-14b"] < 15.5 and 20 < params["mistral-small-22b"] < 23


def test_curated_profiles_have_units_and_sources():
    with open(CURATED_PROFILES, "rb") as f:
        tables = tomllib.load(f)
    required = {f"m{g}{v}" for g in "1234" for v in ("", "-pro", "-max")}
    required |= {"snapdragon-8-gen-3", "raspberry-pi-5", "jetson-orin-nano", "jetson-orin-nano-super"}
    assert required <= set(tables)
    for key, table in tables.items():
        numbers = {k: v for k, v in table.items() if isinstance(v, (int, float))}
        assert numbers, key
        for number_key in numbers:
            suffix = next(s for s in UNIT_SUFFIXES if number_key.endswith(s))  # unit in the name
            assert table[number_key[: -len(suffix)] + "_source"].strip(), f"{key}.{number_key}"
    profiles = load_profiles()
    assert set(tables) <= set(profiles)
    assert get_profile("M2").bandwidth_bytes_per_s == 100e9
    assert get_profile("raspberry-pi-5").bandwidth_kind == "effective"


def test_profile_without_source_or_unit_is_rejected():
    table = {"name": "x", "device_class": "phone", "backend": "CPU", "peak_compute_TFLOP_per_s": 1.0, "peak_compute_source": "s"}
    with pytest.raises(RecoverLoraError, match="peak_bandwidth_GB_per_s or effective"):
        DeviceProfile.from_table("x", table)
    with pytest.raises(RecoverLoraError, match="no peak_bandwidth_source"):
        DeviceProfile.from_table("x", {**table, "peak_bandwidth_GB_per_s": 50.0})
    with pytest.raises(RecoverLoraError, match="unit suffix"):
        DeviceProfile.from_table("x", {**table, "peak_bandwidth_GB_per_s": 50.0, "peak_bandwidth_source": "s", "bandwidth": 3})


def test_probe_profile_round_trips_through_toml(results):
    profile = DeviceProfile(
        key="host", name='this "machine"', device_class="host", backend="CPU (2 threads)", peak_compute_TFLOP_per_s=0.05,
        effective_bandwidth_GB_per_s=12.5, extra={"stream_copy_bandwidth_GB_per_s": 14.0},
        matvec_weights_per_s={"Q4_K": 5.07e10, T.Q2_K: 2.9e10},
        sources={"peak_compute": "measured", "effective_bandwidth": "measured", "stream_copy_bandwidth": "measured", "matvec": "probe"},
        fingerprint=machine_identity(), date="2026-11-23",
    )
    assert profile.matvec_weights_per_s == {T.Q4_K: 5.07e10, T.Q2_K: 2.9e10}  # names become ggml types
    results.mkdir()
    text = profile_toml(profile)
    assert "matvec_weights_per_s = {Q4_K = 50700000000.0, Q2_K = 29000000000.0}" in text
    (results / "host.toml").write_text(text)
    loaded = get_profile("host")
    assert loaded.numbers() == profile.numbers() and loaded.fingerprint == profile.fingerprint and loaded.name == profile.name
    assert loaded.matvec_weights_per_s == profile.matvec_weights_per_s and loaded.sources["matvec"] == "probe"


def test_attention_rate_round_trips_through_toml(results, capsys):
    profile = DeviceProfile(
        key="host", name="me", device_class="host", backend="CPU (2 threads)", peak_compute_TFLOP_per_s=0.05,
        effective_bandwidth_GB_per_s=12.5, attention_compute_TFLOP_per_s=0.02491,
        sources={"peak_compute": "measured", "effective_bandwidth": "measured", "attention_compute": "attention probe"},
    )
    results.mkdir()
    text = profile_toml(profile)
    assert 'attention_compute_TFLOP_per_s = 0.02491\nattention_compute_source = "attention probe"' in text
    (results / "host.toml").write_text(text)
    loaded = get_profile("host")
    assert loaded.attention_compute_TFLOP_per_s == 0.02491 and loaded.sources["attention_compute"] == "attention probe"
    assert loaded.numbers() == profile.numbers() and loaded.extra == {}
    assert run_cli(["devices", "show", "host"]) == 0
    assert "attention_compute_TFLOP_per_s = 0.02491\n      source: attention probe" in capsys.readouterr().out


# The smallest valid host profile table; tests append the line under test.
MINIMAL_HOST_PROFILE = (
    '[host]\nname = "h"\ndevice_class = "host"\nbackend = "CPU"\npeak_compute_TFLOP_per_s = 0.1\npeak_compute_source = "s"\n'
    'effective_bandwidth_GB_per_s = 10.0\neffective_bandwidth_source = "s"\n'
)


@pytest.mark.parametrize(
    "line, message",
    [
        ("attention_compute_TFLOP_per_s = 0.0", "attention_compute_TFLOP_per_s=0.0 must be a positive number"),
        ("attention_compute_TFLOP_per_s = -0.02", "attention_compute_TFLOP_per_s=-0.02 must be a positive number"),
        ('attention_compute_TFLOP_per_s = "fast"', "attention_compute_TFLOP_per_s='fast' must be a positive number"),
        ("attention_compute_TFLOP_per_s = 0.02", "attention_compute_TFLOP_per_s has no attention_compute_source"),
    ],
)
def test_bad_attention_rate_in_a_profile_file_is_a_one_line_error(results, line, message):
    results.mkdir()
    (results / "host.toml").write_text(
        f"{MINIMAL_HOST_PROFILE}{line}\n"
    )
    with pytest.raises(RecoverLoraError, match=re.escape(message)) as info:
        load_profiles()
    assert "\n" not in str(info.value) and "host.toml" in str(info.value)


@pytest.mark.parametrize(
    "rates, message",
    [
        ("matvec_weights_per_s = {Q9_K = 1e9}", "unknown ggml type 'Q9_K'"),
        ("matvec_weights_per_s = {Q4_K = 0.0}", "matvec_weights_per_s[Q4_K]=0.0 must be a positive number"),
        ('matvec_weights_per_s = {Q4_K = "fast"}', "must be a positive number"),
        ("matvec_weights_per_s = 3e10", "must be a table of ggml type"),
    ],
)
def test_bad_matvec_rates_in_a_profile_file_are_one_line_errors(results, rates, message):
    results.mkdir()
    (results / "host.toml").write_text(
        f'{MINIMAL_HOST_PROFILE}matvec_source = "s"\n{rates}\n'
    )
    with pytest.raises(RecoverLoraError, match=re.escape(message)) as info:
        load_profiles()
    assert "\n" not in str(info.value) and "host.toml" in str(info.value)
    table = {"name": "h", "device_class": "host", "backend": "CPU", "peak_compute_TFLOP_per_s": 0.1, "peak_compute_source": "s",
             "peak_bandwidth_GB_per_s": 1.0, "peak_bandwidth_source": "s", "matvec_weights_per_s": {"Q4_K": 1e9}}
    with pytest.raises(RecoverLoraError, match="no matvec_source"):
        DeviceProfile.from_table("h", table)


def test_gguf_shape_reads_types_without_data(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", None)
    shape = load_model_shape(path)
    config = shape.config
    assert (config.num_layers, config.hidden_size, config.intermediate_size, config.num_kv_heads, config.head_dim) == (1, 256, 512, 2, 64)
    assert not config.tie_word_embeddings
    reader = gguf.GGUFReader(path)
    assert {t.name: t.ggml_type for t in shape.file_tensors} == {t.name: T(int(t.tensor_type)) for t in reader.tensors}
    # "file" policy bytes: every tensor as stored, but one row of the token embedding.
    n_bytes = {t.name: int(t.n_bytes) for t in reader.tensors}
    expected = sum(n_bytes.values()) - n_bytes["token_embd.weight"] + n_bytes["token_embd.weight"] // VOCAB
    assert token_cost(shape, FILE_POLICY, 0).weights.bytes == expected
    assert identify_policy(shape) is None
    assert identify_policy(load_model_shape(write_tiny_gguf(tmp_path / "g.gguf", "gateup"))) == "gateup"
    # A named policy on a GGUF is what the exporter would write from it.
    assert token_cost(shape, "w4", 0).weights.bytes == token_cost(load_model_shape(write_tiny_gguf(tmp_path / "w.gguf", "w4")), FILE_POLICY, 0).weights.bytes


def test_bad_model_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    (tmp_path / "cfg.json").write_text(json.dumps({"model_type": "llama"}))
    for model, message in ((tmp_path / "junk.gguf", "neither a GGUF"), (tmp_path / "cfg.json", "lacks"), (tmp_path, "no config.json")):
        with pytest.raises(RecoverLoraError, match=message):
            load_model_shape(model)


def test_stream_bandwidth_and_fingerprint_run():
    result = stream_bandwidth(array_mib=8, threads=1, repeats=1)
    assert result.read_GB_per_s > 0 and result.copy_GB_per_s > 0 and result.triad_GB_per_s > 0
    fp = machine_identity()
    assert fp["cpu_cores_logical"] >= 1 and fp["cpu_model"] and fp["ram_bytes"] > 0


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_read_kernel_sums_every_element_once(threads):
    x = np.arange(1001, dtype=np.float64)
    total, seconds = parallel_sum(x, threads)
    assert total == 1000 * 1001 / 2 and seconds > 0


def test_matvec_probe_measures_every_requested_type(stories_dir):
    """llama.cpp's matrix-vector rate per type, on stories260K's shape (padded to K-quant widths), 1 layer."""
    from recover_lora.devices.matvec import matvec_rates

    results = matvec_rates((T.Q4_K, T.Q2_K, T.Q6_K, T.Q8_0), shape=str(stories_dir), layers=1, threads=2, seconds=0.05)
    assert [r.ggml_type for r in results] == [T.Q4_K, T.Q2_K, T.Q6_K, T.Q8_0]
    # hidden 64 -> 256, intermediate 172 -> 256, 8/4 heads of 8 -> 32/4: q, k, v, o, gate, up, down + tied output (512 x 256)
    assert {r.matvec_weights for r in results} == {256 * 256 + 2 * 32 * 256 + 256 * 256 + 3 * 256 * 256 + 512 * 256}
    assert all(r.weights_per_s > 0 and r.tokens >= 8 for r in results)
    assert results[1].bytes_per_token < results[0].bytes_per_token < results[2].bytes_per_token < results[3].bytes_per_token
    # Into a profile (rates with their source), and from there into the roofline's per-type rule.
    base = DeviceProfile(
        key="host", name="me", device_class="host", backend="CPU", peak_compute_TFLOP_per_s=0.1, effective_bandwidth_GB_per_s=10.0,
        sources={"peak_compute": "test", "effective_bandwidth": "test"},
    )
    profile = with_matvec_rates(base, results, str(stories_dir), 1, threads=2)
    assert list(profile.matvec_weights_per_s) == [T.Q4_K, T.Q2_K, T.Q6_K, T.Q8_0] and "llama.cpp" in profile.sources["matvec"]
    assert DeviceProfile.from_table("host", tomllib.loads(profile_toml(profile))["host"]).matvec_weights_per_s == profile.matvec_weights_per_s
    assert "weights Q2_K:" in estimate(token_cost(load_model_shape("qwen3-4b"), "gateup", 0), profile).decode_bound


def test_probe_cli_with_llama_cpp_writes_matvec_and_attention_rates(tmp_path, results, stories_dir, capsys):
    from recover_lora.export.quantize import export_model

    gguf_path = export_model(stories_dir, tmp_path / "stories.w4.gguf", "w4", threads=1).path
    config = tmp_path / "config.json"
    config.write_text(json.dumps(ATTENTION_CONFIG))
    args = ["devices", "probe", "--gguf", str(gguf_path), "--stream-mib", "8", "--threads", "1", "--matvec-shape", str(config)]
    shapes = ["--matvec-layers", "1", "--matvec-types", "q2_k,Q4_K", "--attention-layers", "1", "--attention-depth", "1024"]
    assert run_cli([*args, *shapes]) == 0
    out = capsys.readouterr().out
    assert re.search(r"llama.cpp matvec Q2_K .* G weights/s", out) and "STREAM read" in out
    assert re.search(r"llama.cpp attention .* GFLOP/s at depth 1024 \(.* from depth 512\)", out)
    profile = get_profile("host")
    assert list(profile.matvec_weights_per_s) == [T.Q2_K, T.Q4_K]
    assert profile.attention_compute_TFLOP_per_s > 0 and "depth 1024" in profile.sources["attention_compute"]
    assert run_cli(["devices", "show", "host"]) == 0
    assert "attention_compute_TFLOP_per_s = " in capsys.readouterr().out
    assert run_cli(["roofline", "--device", "host", "--ctx", "0"]) == 0
    assert re.search(r"; attention \d+\.\d GFLOP/s", capsys.readouterr().out)


def test_matvec_probe_bad_input_is_one_line_error(capsys):
    from recover_lora.devices.matvec import matvec_rates

    assert run_cli(["devices", "probe", "--matvec-types", "Q4_K,Q9_K"]) == 2
    err = capsys.readouterr().err
    assert "unknown ggml type 'Q9_K'" in err and err.count("\n") == 1
    with pytest.raises(RecoverLoraError, match="neither a bundled shape"):
        matvec_rates(shape="no-such-shape")
    with pytest.raises(RecoverLoraError, match="--matvec-layers 0 must be >= 1"):
        matvec_rates(layers=0)


def test_attention_probe_on_a_tiny_shape_gives_a_positive_rate(tmp_path):
    from recover_lora.devices.attention import attention_rate

    config = tmp_path / "config.json"
    config.write_text(json.dumps(ATTENTION_CONFIG))
    result = attention_rate(str(config), layers=1, depth=1024, threads=1, seconds=0.2)
    assert result.depths == (0, 512, 1024) and result.tokens >= 8
    # The roofline's counts for 1 layer: 4 FLOPs x 4 query heads x 128 per cached token; K and V of 2 KV heads x 128 in F16.
    assert result.attention_flops == (0, 4 * 4 * 128 * 512, 4 * 4 * 128 * 1024)
    assert result.kv_bytes == (0, 2 * 2 * 128 * 2 * 512, 2 * 2 * 128 * 2 * 1024)
    assert 0 < result.flop_per_s < float("inf")
    base = DeviceProfile(
        key="host", name="me", device_class="host", backend="CPU", peak_compute_TFLOP_per_s=0.1, effective_bandwidth_GB_per_s=10.0,
        sources={"peak_compute": "test", "effective_bandwidth": "test"},
    )
    profile = with_attention_rate(base, result, "tiny", 1, threads=1)
    assert profile.attention_compute_TFLOP_per_s == pytest.approx(result.flop_per_s / 1e12, rel=1e-3)
    assert "llama.cpp" in profile.sources["attention_compute"]
    loaded = DeviceProfile.from_table("host", tomllib.loads(profile_toml(profile))["host"])
    assert loaded.attention_compute_TFLOP_per_s == profile.attention_compute_TFLOP_per_s
    assert loaded.sources["attention_compute"] == profile.sources["attention_compute"]


def test_attention_probe_bad_input_is_one_line_error(capsys):
    from recover_lora.devices.attention import attention_rate

    for option, value, message in (("--attention-depth", "1000", "--attention-depth 1000 must be a positive multiple of 512"), ("--attention-layers", "0", "--attention-layers 0 must be >= 1")):
        assert run_cli(["devices", "probe", "--no-matvec", option, value]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    with pytest.raises(RecoverLoraError, match="neither a bundled shape"):
        attention_rate(shape="no-such-shape")


def test_probe_cli_writes_host_profile_the_roofline_uses(results, capsys):
    assert run_cli(["devices", "probe", "--no-decode", "--stream-mib", "8", "--threads", "1"]) == 0
    written = results / "host.toml"
    assert written.is_file()
    assert run_cli(["devices", "probe", "--no-decode", "--stream-mib", "8"]) == 2  # refuses to overwrite
    assert "--force" in capsys.readouterr().err
    assert run_cli(["devices", "list"]) == 0
    assert re.search(r"^host\s+host\s", capsys.readouterr().out, re.M)
    assert run_cli(["roofline", "--device", "host", "--ctx", "0"]) == 0
    assert "effective bandwidth" in capsys.readouterr().out
    assert run_cli(["devices", "show", "host"]) == 0
    assert "source: measured" in capsys.readouterr().out


def test_unknown_host_tells_to_probe(capsys):
    assert run_cli(["devices", "show", "host"]) == 2
    assert "devices probe" in capsys.readouterr().err


def bench_record(model: Path, tg: float, device: dict, depth: int = 0, variant: str = "", ratio: float | None = None) -> dict:
    """The fields of a `recover-lora bench` schema-v1 record that calibration reads."""
    return {
        "schema_version": 1, "kind": "bench", "run_id": "r1", "device": device, "load_average": [1.5, 1.0, 1.0],
        "variant": variant or model.name, "variant_index": 0 if ratio is None else 1, "baseline_variant": "w4.gguf",
        "model": {"path": str(model), "name": model.name}, "adapter": None, "settings": {"threads": 2}, "depth": depth,
        "pp_tokens_per_s": {"median": 50.0}, "tg_tokens_per_s": {"median": tg, "min": tg, "max": tg, "samples": [tg]},
        "ratio_vs_baseline": None if ratio is None else {"tg": {"median": ratio}},
    }


def test_parse_record_reads_schema_v1_and_ignores_others():
    record = parse_record(bench_record(Path("/x/a.gguf"), 12.5, {"cpu_model": "c"}, depth=512, ratio=1.2))
    assert (record.model_path, record.depth, record.decode_tokens_per_s, record.decode_ratio_vs_baseline) == ("/x/a.gguf", 512, 12.5, 1.2)
    assert (record.threads, record.load_1min, record.fingerprint) == (2, 1.5, {"cpu_model": "c"})
    assert parse_record({"kind": "export", "model": {"path": "a"}}) is None


def test_calibrate_compares_records_with_roofline(tmp_path, results, capsys):
    w4 = write_tiny_gguf(tmp_path / "w4.gguf", "w4")
    gateup = write_tiny_gguf(tmp_path / "gateup.gguf", "gateup")
    me = machine_identity()
    profile = DeviceProfile(
        key="host", name="me", device_class="host", backend="CPU", peak_compute_TFLOP_per_s=0.1, effective_bandwidth_GB_per_s=10.0,
        sources={"peak_compute": "test", "effective_bandwidth": "test"}, fingerprint=me,
    )
    results.mkdir()
    records = [
        bench_record(w4, 1000.0, me),
        bench_record(gateup, 1100.0, me, ratio=1.08),  # interleaved per-repeat ratio wins over 1100/1000
        bench_record(w4, 5.0, {**me, "cpu_model": "other"}),
        {"kind": "other"},
    ]
    (results / "bench-x.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    report = calibrate(results, profile)
    assert [(r.policy, r.measured_tokens_per_s) for r in report.rows] == [("w4", 1000.0), ("gateup", 1100.0)]
    bytes_w4 = token_cost(load_model_shape(w4), FILE_POLICY, 0).bytes
    assert report.rows[0].predicted_tokens_per_s == pytest.approx(10e9 / bytes_w4)
    assert report.rows[0].fraction_of_bandwidth == pytest.approx(1000.0 * bytes_w4 / 10e9)
    assert len(report.skipped) == 1 and "other" in report.skipped[0]
    (ratio,) = report.ratios
    assert (ratio.measured, ratio.method) == (1.08, "interleaved") and ratio.predicted > 1
    (results / "host.toml").write_text(profile_toml(profile))
    assert run_cli(["devices", "calibrate"]) == 0
    out = capsys.readouterr().out
    assert "GateUp/W4" in out and "measured 1.080 (interleaved)" in out
    assert len(calibrate(results, profile, same_machine_only=False).rows) == 3


GiB = 1 << 30


@pytest.mark.parametrize(
    "profile_side, record_side, same",
    [
        (dict(cpu_model="AMD EPYC", cpu_cores_logical=2, ram_bytes=8 * GiB), dict(cpu_model="AMD EPYC", cpu_cores_logical=2, ram_bytes=8 * GiB), True),
        (dict(cpu_model="AMD EPYC", cpu_cores_logical=2, ram_bytes=8 * GiB), dict(cpu_model="Apple M2", cpu_cores_logical=2, ram_bytes=8 * GiB), False),
        # CPU model unreadable on both sides (None in records; left out of a probe's TOML): cores and RAM decide.
        (dict(cpu_cores_logical=2, ram_bytes=8 * GiB), dict(cpu_model=None, cpu_cores_logical=2, ram_bytes=8 * GiB), True),
        (dict(cpu_cores_logical=2, ram_bytes=8 * GiB), dict(cpu_model=None, cpu_cores_logical=4, ram_bytes=8 * GiB), False),
        # Profiles probed before the identity had None wrote "unknown" and 0.
        (dict(cpu_model="unknown", cpu_cores_logical=2, ram_bytes=0), dict(cpu_model=None, cpu_cores_logical=2, ram_bytes=None), True),
        # Nothing known on both sides: nothing says it is the same machine.
        (dict(cpu_model="unknown", ram_bytes=0), dict(cpu_model=None, cpu_cores_logical=2, ram_bytes=None), False),
    ],
)
def test_same_machine_compares_the_fields_both_sides_know(profile_side, record_side, same):
    assert same_machine(profile_side, record_side) is same
    assert same_machine(record_side, profile_side) is same


def test_calibrate_matches_records_whose_cpu_model_is_unknown(tmp_path, results):
    w4 = write_tiny_gguf(tmp_path / "w4.gguf", "w4")
    unknown_cpu = {"cpu_model": None, "cpu_cores_logical": 2, "ram_bytes": 8 * GiB, "platform": "Linux", "machine": "aarch64"}
    profile = DeviceProfile(
        key="host", name="me", device_class="host", backend="CPU (2 threads)", peak_compute_TFLOP_per_s=0.1,
        effective_bandwidth_GB_per_s=10.0, sources={"peak_compute": "test", "effective_bandwidth": "test"}, fingerprint=unknown_cpu,
    )
    results.mkdir()
    (results / "host.toml").write_text(profile_toml(profile))
    profile = get_profile("host")  # as calibrate sees it: read back from TOML, which cannot hold the unknown CPU model
    assert "cpu_model" not in profile.fingerprint
    records = [bench_record(w4, 1000.0, unknown_cpu), bench_record(w4, 900.0, {**unknown_cpu, "cpu_cores_logical": 8})]
    (results / "bench-x.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    report = calibrate(results, profile)
    assert [r.measured_tokens_per_s for r in report.rows] == [1000.0]
    assert len(report.skipped) == 1 and "another machine" in report.skipped[0]


def test_backend_is_what_ran_and_calibrate_keeps_gpu_runs_from_cpu_profiles(tmp_path, results):
    cuda_build = "CUDA : ARCHS = 890 | CPU : AVX2 = 1 |"
    assert backend_ran(0, cuda_build) == "CPU"  # a GPU build running every layer on the CPU
    assert backend_ran(-1, cuda_build) == "CUDA" and backend_ran(12, cuda_build) == "CUDA"
    assert backend_ran(-1, "Metal : EMBED_LIBRARY = 1") == "Metal"
    w4 = write_tiny_gguf(tmp_path / "w4.gguf", "w4")
    me = machine_identity()
    cpu_run = bench_record(w4, 1000.0, {**me, "backend": "CPU"})
    gpu_run = bench_record(w4, 9000.0, {**me, "backend": "CUDA"})
    gpu_run["settings"]["gpu_layers"] = -1
    # Records from before `backend` meant what ran: the build's back end, though gpu_layers was 0.
    old_cpu_run = bench_record(w4, 1100.0, {**me, "backend": "CUDA"})
    assert [parse_record(r).backend for r in (cpu_run, gpu_run, old_cpu_run)] == ["CPU", "CUDA", "CPU"]
    results.mkdir()
    (results / "bench-x.jsonl").write_text("\n".join(json.dumps(r) for r in (cpu_run, gpu_run, old_cpu_run)) + "\n")
    sources = {"peak_compute": "test", "effective_bandwidth": "test"}
    cpu_profile = DeviceProfile(
        key="host", name="me", device_class="host", backend="CPU (2 threads)", peak_compute_TFLOP_per_s=0.1,
        effective_bandwidth_GB_per_s=10.0, sources=sources, fingerprint=me,
    )
    report = calibrate(results, cpu_profile)
    assert [r.measured_tokens_per_s for r in report.rows] == [1000.0, 1100.0]
    assert len(report.skipped) == 1 and "ran on CUDA (gpu_layers -1)" in report.skipped[0]
    gpu_profile = DeviceProfile(
        key="gpu", name="a GPU", device_class="desktop", backend="CUDA GPU", peak_compute_TFLOP_per_s=10.0,
        peak_bandwidth_GB_per_s=500.0, sources={"peak_compute": "test", "peak_bandwidth": "test"},
    )
    assert [r.measured_tokens_per_s for r in calibrate(results, gpu_profile).rows] == [9000.0]


def test_calibrate_without_records_is_an_error(results, capsys):
    results.mkdir()
    assert run_cli(["devices", "calibrate", "--device", "m2"]) == 2
    assert "recover-lora bench" in capsys.readouterr().err


def test_predicted_tensor_table_equals_exported_file(tmp_path, stories_dir):
    """Oracle: the roofline's tensors under a policy are exactly what the exporter writes (names,
    padded shapes, ggml types), here on stories260K (hidden 64: padded to 256 by the exporter)."""
    from recover_lora.devices.shapes import tensors_for_policy
    from recover_lora.export.quantize import export_model

    out = export_model(stories_dir, tmp_path / "stories.gateup.gguf", "gateup", threads=1).path
    exported = load_model_shape(out)
    predicted = tensors_for_policy(load_model_shape(stories_dir), "gateup")
    assert {(t.name, t.shape, t.ggml_type) for t in predicted} == {(t.name, t.shape, t.ggml_type) for t in exported.file_tensors}
    assert identify_policy(exported) == "gateup"
    assert token_cost(load_model_shape(stories_dir), "gateup", 64).bytes == token_cost(exported, FILE_POLICY, 64).bytes


@pytest.mark.slow
def test_llama_cpp_probe_on_default_model():
    from recover_lora.devices.probe import llama_cpp_decode
    from recover_lora.export.sources import default_model_path

    path = default_model_path()
    result = llama_cpp_decode(path, threads=1, prompt_tokens=8, decode_tokens=4)
    assert result.decode_tokens_per_s > 0 and result.prompt_tokens_per_s > 0
    assert result.bytes_per_token == token_cost(load_model_shape(path), FILE_POLICY, 8 + 1 + 2).bytes
    assert "CPU" in result.system_info
