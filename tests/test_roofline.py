"""Roofline math on hand-computed tiny configs, the `roofline` CLI and the reproduction table."""

from __future__ import annotations

import json
import re

import pytest
from gguf import GGMLQuantizationType as T

from recover_lora.cli import main
from recover_lora.devices.profiles import DeviceProfile, get_profile
from recover_lora.devices.reproduce import PAPER_RATIO_RANGE, reproduction_markdown, reproduction_rows
from recover_lora.devices.roofline import AdapterSpec, decode_times, estimate, roofline_table, token_cost
from recover_lora.devices.shapes import ModelShape, padded_shape, tensors_for_policy
from recover_lora.errors import RecoverLoraError
from recover_lora.export.model import ModelConfig
from recover_lora.export.policy import Policy

# Block sizes written out from ggml-common.h, independently of gguf.GGML_QUANT_SIZES:
# every K-quant block holds 256 weights.
Q2_K_BLOCK_BYTES, Q4_K_BLOCK_BYTES, Q6_K_BLOCK_BYTES = 84, 144, 210


def tiny_config(**changes) -> ModelConfig:
    base = dict(
        model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0, context_length=256, tie_word_embeddings=False,
    )
    base.update(changes)
    return ModelConfig(**base)


def tiny_shape(**changes) -> ModelShape:
    return ModelShape(name="tiny", config=tiny_config(**changes), source="test")


def run_cli(args: list[str]) -> int:
    """The exit code of `recover-lora ARGS` (typer exits 0 on success, main() 2 on RecoverLoraError)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


@pytest.fixture(autouse=True)
def isolated_results(tmp_path, monkeypatch):
    monkeypatch.setenv("RECOVER_LORA_RESULTS", str(tmp_path / "results"))


def test_decode_bytes_match_hand_count_exactly():
    # Per layer (hidden 256, 4 heads x 64, 2 KV heads, intermediate 512), in 256-weight blocks:
    # q 256x256 -> 256 blocks, k and v 128x256 -> 128 each, o 256 blocks; gate, up, down 512 each.
    attention_blocks, gate_up_blocks, down_blocks = 256 + 128 + 128 + 256, 512 + 512, 512
    norms = 2 * 256 * 4  # attn_norm + ffn_norm, F32
    embedding_row = 1 * Q6_K_BLOCK_BYTES  # one 256-wide row of token_embd is read per token
    output = 512 * Q6_K_BLOCK_BYTES  # 512 x 256
    output_norm = 256 * 4
    w4_layer = (attention_blocks + gate_up_blocks + down_blocks) * Q4_K_BLOCK_BYTES + norms
    gateup_layer = (attention_blocks + down_blocks) * Q4_K_BLOCK_BYTES + gate_up_blocks * Q2_K_BLOCK_BYTES + norms
    kv_per_token = 2 * 2 * 2 * 64 * 2  # layers x (K, V) x kv heads x head_dim x F16 bytes

    shape = tiny_shape()
    for policy, layer in (("w4", w4_layer), ("gateup", gateup_layer)):
        for ctx in (0, 7, 1000):
            cost = token_cost(shape, policy, ctx)
            assert cost.weights.bytes == embedding_row + output + output_norm + 2 * layer
            assert cost.attention.bytes == kv_per_token * ctx


def test_flops_and_adapter_bytes_match_formula():
    shape = tiny_shape()
    layer_params = 256 * 256 * 2 + 128 * 256 * 2 + 512 * 256 * 3
    cost = token_cost(shape, "w4", 100)
    assert cost.weights.flops == 2 * (2 * layer_params + 512 * 256)  # + output, not the embedding lookup
    assert cost.attention.flops == 4 * 4 * 64 * 100 * 2  # 4 x heads x head_dim x ctx x layers
    adapter = AdapterSpec(rank=8, modules=("ffn_gate", "ffn_up"), ggml_type=T.F16)
    with_adapter = token_cost(shape, "w4", 100, adapter=adapter)
    adapter_elements = 2 * 2 * 8 * (256 + 512)  # layers x (gate, up) x r x (in + out)
    assert with_adapter.weights.bytes - cost.weights.bytes == adapter_elements * 2
    assert with_adapter.weights.flops - cost.weights.flops == 2 * adapter_elements


def test_tied_embeddings_read_the_whole_matrix_once():
    tied = token_cost(tiny_shape(tie_word_embeddings=True), "w4", 0)
    untied = token_cost(tiny_shape(), "w4", 0)
    # Untied: one embedding row + the output matrix; tied: the matrix serves both.
    assert untied.weights.bytes - tied.weights.bytes == Q6_K_BLOCK_BYTES


def test_gateup_ratio_above_one_and_shrinking_with_context():
    profile = get_profile("m2")
    shape = tiny_shape(num_layers=8)
    rows = roofline_table(shape, profile, ["w4", "gateup"], [0, 256, 4096, 65536])
    ratios = [r.ratio_to_w4 for r in rows if r.policy == "gateup"]
    assert all(r.ratio_to_w4 == 1.0 for r in rows if r.policy == "w4")
    assert all(r > 1 for r in ratios)
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > ratios[-1]
    decode = [r.decode_tokens_per_s for r in rows if r.policy == "w4"]
    assert decode == sorted(decode, reverse=True)


def test_time_is_max_of_memory_and_compute_per_group():
    shape = tiny_shape()
    cost = token_cost(shape, "w4", 1000)
    slow_compute = DeviceProfile(
        key="x", name="x", device_class="host", backend="cpu", peak_compute_TFLOP_per_s=1e-6,
        peak_bandwidth_GB_per_s=1000.0, sources={"peak_compute": "test", "peak_bandwidth": "test"},
    )
    row = estimate(cost, slow_compute)
    assert row.decode_bound == "weights:compute, attention:compute"
    assert row.decode_tokens_per_s == pytest.approx(1e6 / cost.flops)
    assert row.prefill_tokens_per_s == pytest.approx(1e6 / cost.flops)


def test_padded_shape_follows_the_exporter():
    # SmolLM2-135M-like widths: hidden 576, 9/3 heads of 64, intermediate 1536.
    shape = tiny_shape(hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64)
    padded = padded_shape(shape, Policy.named("w4")).config
    assert (padded.hidden_size, padded.intermediate_size, padded.num_heads, padded.num_kv_heads) == (768, 1536, 12, 3)
    names = {t.name: t for t in tensors_for_policy(shape, "gateup")}
    assert names["blk.0.attn_output.weight"].shape == (768, 768)
    assert names["blk.0.ffn_gate.weight"].ggml_type == T.Q2_K
    # Padding adds query heads inside the KV groups: the 3 KV heads, and so the KV cache, stay as they are.
    assert token_cost(shape, "w4", 10).attention.bytes == 2 * 2 * 3 * 64 * 2 * 10
    with pytest.raises(RecoverLoraError, match="cannot pad"):
        tensors_for_policy(ModelShape("q", tiny_config(model_type="qwen3", hidden_size=576, num_heads=9, num_kv_heads=3, rms_norm_eps=1e-4), "t"), "w4")


def test_roofline_cli_prints_table_and_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    assert run_cli(["roofline", "--model", "qwen3-4b", "--device", "m2", "--ctx", "0,4096", "--json", str(out_json), "--plot", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "decode tok/s" in text and "x w4" in text
    assert text.count("gateup") == 2 and text.count("w4 ") >= 2
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["ctx"], r["policy"]) for r in rows] == [(0, "w4"), (0, "gateup"), (4096, "w4"), (4096, "gateup")]
    assert rows[1]["ratio_to_w4"] > 1.15
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "toaster"], "unknown device 'toaster'"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--policy", "w4,w3"], "unknown policy 'w3'"),
        (["--ctx", "0,abc"], "--ctx '0,abc' must be"),
        (["--ctx", "-5"], "--ctx '-5' must be"),
        (["--policy", "file"], "policy 'file' needs a .gguf"),
        (["--kv-type", "Q9_K"], "unknown ggml type 'Q9_K'"),
        (["--adapter-rank", "8", "--adapter-modules", "gate,mlp"], "adapter modules"),
    ],
)
def test_roofline_cli_bad_input_is_one_line_error(args, message, capsys):
    assert run_cli(["roofline", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_reproduction_table_covers_models_devices_contexts(tmp_path, capsys):
    rows = reproduction_rows(("qwen3-4b", "llama-3.1-8b"), ("m2", "raspberry-pi-5"), (0, 4096))
    assert len(rows) == 8 and all(r.ratio > 1 for r in rows)
    text = reproduction_markdown(rows)
    assert f"+{(PAPER_RATIO_RANGE[0] - 1) * 100:.1f} %" in text and "| qwen3-4b | raspberry-pi-5 |" in text
    out = tmp_path / "repro.md"
    assert run_cli(["roofline", "--reproduce", "--model", "qwen3-4b", "--device", "m2", "--ctx", "0", "--out", str(out)]) == 0
    assert "| qwen3-4b | m2 |" in out.read_text()
    assert "GateUp vs W4" in capsys.readouterr().out


def test_quantized_rate_applies_to_weights_and_float_rate_to_attention():
    cost = token_cost(tiny_shape(), "w4", 1000)
    profile = DeviceProfile(
        key="x", name="x", device_class="host", backend="cpu", peak_compute_TFLOP_per_s=1000.0, quantized_compute_TFLOP_per_s=1e-6,
        peak_bandwidth_GB_per_s=1.0, sources={"peak_compute": "t", "quantized_compute": "t", "peak_bandwidth": "t"},
    )
    row = estimate(cost, profile)
    assert row.decode_bound == "weights:compute, attention:memory"
    assert 1 / row.decode_tokens_per_s == pytest.approx(cost.weights.flops / 1e6 + cost.attention.bytes / 1e9)


def test_roofline_cli_notes_padding_and_reads_hf_folders(stories_dir, capsys):
    assert run_cli(["roofline", "--model", str(stories_dir), "--device", "m2", "--ctx", "0", "--policy", "gateup"]) == 0
    assert "padded for K-quants: hidden 256, intermediate 256, 32/4 heads" in capsys.readouterr().out
    assert run_cli(["roofline", "--model", "llama-3.1-8b", "--device", "m2", "--ctx", "0"]) == 0
    assert "padded" not in capsys.readouterr().out


def rated_profile(rates: dict, bandwidth_GB_per_s: float = 10.0) -> DeviceProfile:
    """A hand-made profile with per-type matrix-vector rates (weights/s) and slow FLOP rates."""
    return DeviceProfile(
        key="x", name="x", device_class="host", backend="cpu", peak_compute_TFLOP_per_s=1e-3, effective_bandwidth_GB_per_s=bandwidth_GB_per_s,
        matvec_weights_per_s=rates, sources={"peak_compute": "t", "effective_bandwidth": "t", "matvec": "t"},
    )


def test_weight_parts_split_the_weights_group_by_type():
    cost = token_cost(tiny_shape(), "gateup", 0)
    parts = {p.ggml_type: p for p in cost.weight_parts}
    assert set(parts) == {T.Q6_K, T.Q4_K, T.Q2_K, T.F32}
    # 2 layers of gate + up (512 x 256 each, 512 blocks each) at Q2_K; q, k, v, o, down at Q4_K.
    assert parts[T.Q2_K].bytes == 2 * 1024 * Q2_K_BLOCK_BYTES and parts[T.Q2_K].matvec_weights == 2 * 2 * 512 * 256
    assert parts[T.Q4_K].bytes == 2 * (768 + 512) * Q4_K_BLOCK_BYTES
    assert parts[T.Q6_K].matvec_weights == 512 * 256  # the output matrix; the embedding row is a lookup
    assert parts[T.F32].matvec_weights == 0
    assert sum(p.bytes for p in cost.weight_parts) == cost.weights.bytes
    assert sum(p.flops for p in cost.weight_parts) == cost.weights.flops


def test_compute_bound_q2k_gives_no_gateup_gain():
    # Q2_K and Q4_K weights cost the same time each (llama.cpp's unpacking, not DRAM, is the limit):
    # GateUp has the same matmul weights as W4, so it is not faster, although it reads fewer bytes.
    rates = {"Q4_K": 1e9, "Q2_K": 1e9, "Q6_K": 1e9}
    w4, gateup = (estimate(token_cost(tiny_shape(), p, 0), rated_profile(rates, 1000.0)) for p in ("w4", "gateup"))
    assert gateup.weight_bytes_per_token < w4.weight_bytes_per_token
    assert gateup.decode_tokens_per_s == pytest.approx(w4.decode_tokens_per_s)
    assert gateup.decode_bound == "weights Q2_K:compute, weights Q4_K:compute, weights Q6_K:compute, weights F32:memory, attention:memory"


def test_memory_bound_parts_give_the_byte_ratio():
    rates = {T.Q4_K: 1e18, T.Q2_K: 1e18, T.Q6_K: 1e18}
    profile = rated_profile(rates)
    w4, gateup = (token_cost(tiny_shape(), p, 0) for p in ("w4", "gateup"))
    w4_row, gateup_row = estimate(w4, profile), estimate(gateup, profile)
    assert gateup_row.decode_tokens_per_s / w4_row.decode_tokens_per_s == pytest.approx(w4.bytes / gateup.bytes)
    assert "compute" not in gateup_row.decode_bound


def test_profile_without_rates_for_the_models_types_keeps_the_one_group_model():
    cost = token_cost(tiny_shape(), "gateup", 1000)
    for profile in (get_profile("m2"), get_profile("raspberry-pi-5"), rated_profile({"Q8_0": 1e9})):
        row = estimate(cost, profile)
        bandwidth = profile.bandwidth_bytes_per_s
        weights_s = max(cost.weights.bytes / bandwidth, cost.weights.flops / profile.quantized_compute_flop_per_s)
        attention_s = max(cost.attention.bytes / bandwidth, cost.attention.flops / profile.compute_flop_per_s)
        assert row.decode_tokens_per_s == 1.0 / (weights_s + attention_s)  # exactly the old rule
        assert row.decode_bound.startswith("weights:") and row.decode_bound.count(",") == 1


def test_unrated_parts_stay_one_group_on_the_flop_rule():
    # Only Q2_K has a rate: Q4_K, Q6_K and F32 together are checked against FLOPs / quantized compute.
    cost = token_cost(tiny_shape(), "gateup", 0)
    profile = rated_profile({T.Q2_K: 2e9}, bandwidth_GB_per_s=1e6)
    row = estimate(cost, profile)
    q2k = next(p for p in cost.weight_parts if p.ggml_type == T.Q2_K)
    rest_flops = cost.weights.flops - q2k.flops
    assert 1 / row.decode_tokens_per_s == pytest.approx(q2k.matvec_weights / 2e9 + rest_flops / 1e9)
    assert row.decode_bound == "weights Q2_K:compute, weights F32+Q4_K+Q6_K:compute, attention:memory"


@pytest.mark.parametrize(
    "rates, message",
    [({"Q9_K": 1e9}, "unknown ggml type 'Q9_K'"), ({"Q4_K": 0.0}, "Q4_K]=0.0 must be a positive"), ({"Q2_K": -1}, "must be a positive")],
)
def test_bad_matvec_rates_are_one_line_errors(rates, message):
    with pytest.raises(RecoverLoraError, match=re.escape(message)) as info:
        rated_profile(rates)
    assert "\n" not in str(info.value)


def test_rated_part_near_its_memory_time_is_labelled_memory_but_timed_by_its_rate():
    # A rate measured while streaming from DRAM at full bandwidth only reproduces the memory time
    # (give or take a few per cent): the time uses it, the label does not call the part compute-bound.
    cost = token_cost(tiny_shape(), "w4", 0)
    q4k = next(p for p in cost.weight_parts if p.ggml_type == T.Q4_K)
    memory_s = q4k.bytes / 10e9
    for slower, label in ((1.05, "memory"), (1.5, "compute")):
        row = estimate(cost, rated_profile({T.Q4_K: q4k.matvec_weights / (slower * memory_s)}))
        assert row.decode_bound.startswith(f"weights Q4_K:{label}, ")
        rest_bytes = cost.weights.bytes - q4k.bytes
        assert 1 / row.decode_tokens_per_s == pytest.approx(slower * memory_s + max(rest_bytes / 10e9, (cost.weights.flops - q4k.flops) / 1e9))


def attention_profile(attention_TFLOP_per_s: float | None, bandwidth_GB_per_s: float = 10.0) -> DeviceProfile:
    """A hand-made profile with a fast float peak and, if given, a measured attention rate."""
    sources = {"peak_compute": "t", "effective_bandwidth": "t"} | ({"attention_compute": "t"} if attention_TFLOP_per_s else {})
    return DeviceProfile(
        key="x", name="x", device_class="host", backend="cpu", peak_compute_TFLOP_per_s=1000.0, effective_bandwidth_GB_per_s=bandwidth_GB_per_s,
        attention_compute_TFLOP_per_s=attention_TFLOP_per_s, sources=sources,
    )


def test_measured_attention_rate_times_the_attention_group():
    cost = token_cost(tiny_shape(), "w4", 4096)
    slow, fast = attention_profile(1e-6), attention_profile(1e3)
    weights_s = cost.weights.bytes / 10e9
    row = estimate(cost, slow)
    assert row.decode_bound == "weights:memory, attention:compute"
    assert 1 / row.decode_tokens_per_s == pytest.approx(weights_s + cost.attention.flops / 1e6)  # 4 x 4 heads x 64 x 4096 x 2 layers
    assert cost.attention.flops == 4 * 4 * 64 * 4096 * 2
    # A rate faster than the KV bytes' memory time leaves the memory time: max(bytes / bandwidth, FLOPs / rate).
    row = estimate(cost, fast)
    assert row.decode_bound == "weights:memory, attention:memory"
    assert 1 / row.decode_tokens_per_s == pytest.approx(weights_s + cost.attention.bytes / 10e9)
    # Prefill stays on the float peak: the rate describes single-token decode only.
    assert estimate(cost, slow).prefill_tokens_per_s == estimate(cost, attention_profile(None)).prefill_tokens_per_s


def test_profile_without_attention_rate_keeps_the_float_peak_rule():
    cost = token_cost(tiny_shape(), "gateup", 1000)
    for profile in (get_profile("m2"), attention_profile(None, 1e-3)):
        attention = next(t for t in decode_times(cost, profile) if t.name == "attention")
        assert attention.compute_s == cost.attention.flops / profile.compute_flop_per_s  # exactly the old rule
        assert profile.attention_flop_per_s == profile.compute_flop_per_s and profile.attention_text() == ""
    assert attention_profile(0.025).attention_text() == "; attention 25.0 GFLOP/s"


@pytest.mark.parametrize("value", [0.0, -1.0, "fast", True])
def test_bad_attention_rates_are_one_line_errors(value):
    with pytest.raises(RecoverLoraError, match=re.escape(f"attention_compute_TFLOP_per_s={value!r} must be a positive number")) as info:
        attention_profile(value)
    assert "\n" not in str(info.value)
    with pytest.raises(RecoverLoraError, match="no attention_compute_source"):
        DeviceProfile(
            key="x", name="x", device_class="host", backend="cpu", peak_compute_TFLOP_per_s=1.0, effective_bandwidth_GB_per_s=1.0,
            attention_compute_TFLOP_per_s=0.02, sources={"peak_compute": "t", "effective_bandwidth": "t"},
        )
