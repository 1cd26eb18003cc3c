"""runtime/: loading GGUF + adapter safely, generation, chat, and tokens/s records (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from recover_lora.errors import RecoverLoraError

STORIES_DIR = Path(__file__).parent / "fixtures" / "stories260K"


@pytest.fixture(scope="module")
def stories_gguf(tmp_path_factory) -> Path:
    """stories260K (tiny real Llama: hidden 64, ffn 172, 5 layers) as an F32 GGUF, by the exporter."""
    from recover_lora.export.gguf_io import write_gguf
    from recover_lora.export.sources import load_model

    return write_gguf(load_model(STORIES_DIR), tmp_path_factory.mktemp("stories") / "stories.f32.gguf")


def write_lora_gguf(path: Path, arch: str, pairs: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float = 8.0) -> Path:
    """A llama.cpp LoRA GGUF; pairs: base tensor name -> (A (r, in), B (out, r)) in torch order."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for name, (a, b) in pairs.items():
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def lora_pairs(rank: int = 4, seed: int = 0, in_features: int = 64, out_features: int = 172) -> dict:
    rng = np.random.default_rng(seed)
    return {
        f"blk.{i}.ffn_up.weight": (rng.normal(0, 0.5, (rank, in_features)), rng.normal(0, 0.5, (out_features, rank)))
        for i in range(2)
    }


@pytest.fixture(scope="module")
def good_adapter(stories_gguf, tmp_path_factory) -> Path:
    return write_lora_gguf(tmp_path_factory.mktemp("adapter") / "adapter.gguf", "llama", lora_pairs())


def options(**kw):
    from recover_lora.runtime.llama import LlamaOptions

    return LlamaOptions(**({"n_ctx": 128, "threads": 1} | kw))


# --------------------------------------------------------------------------------------------
# Bad files: one-line errors before llama.cpp sees them


def test_truncated_gguf_is_refused(stories_gguf, tmp_path):
    from recover_lora.runtime.llama import load_llama

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(stories_gguf.read_bytes()[: stories_gguf.stat().st_size // 2])
    with pytest.raises(RecoverLoraError, match="damaged or truncated"):
        load_llama(cut, options=options())


@pytest.mark.parametrize(
    "content, message",
    [(b"GGUF" + bytes(range(200)), "damaged or truncated"), (b"PK\x03\x04 not a model", "not a GGUF file")],
)
def test_foreign_bytes_are_refused(tmp_path, content, message):
    from recover_lora.runtime.llama import load_llama

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(RecoverLoraError, match=message):
        load_llama(bad, options=options())


def test_missing_file_is_refused(tmp_path):
    from recover_lora.runtime.llama import load_llama

    with pytest.raises(RecoverLoraError, match="does not exist"):
        load_llama(tmp_path / "nothing.gguf", options=options())


def test_summary_counts_tensor_types(stories_gguf):
    from recover_lora.runtime.gguf_check import check_model_gguf

    summary = check_model_gguf(stories_gguf)
    assert summary.architecture == "llama"
    # 5 layers x 2 norms + output norm are F32 like the 5 x 7 linears and the embedding (F32 file).
    assert summary.count_by_type() == {"F32": 5 * 9 + 2}
    assert {t.name: t.shape for t in summary.tensors}["blk.0.ffn_up.weight"] == [172, 64]


@pytest.mark.parametrize(
    "arch, pairs, message",
    [
        ("qwen2", lora_pairs(), "architecture 'qwen2' does not match"),
        ("llama", lora_pairs(in_features=96), r"lora_a \(4, 96\)"),
        ("llama", lora_pairs(out_features=100), r"lora_b \(100, 4\)"),
        ("llama", {"blk.9.ffn_up.weight": lora_pairs()["blk.0.ffn_up.weight"]}, "does not have"),
    ],
    ids=["other-architecture", "wrong-input-width", "wrong-output-width", "unknown-tensor"],
)
def test_mismatched_adapter_is_refused(stories_gguf, tmp_path, arch, pairs, message):
    from recover_lora.runtime.llama import load_llama

    adapter = write_lora_gguf(tmp_path / "adapter.gguf", arch, pairs)
    with pytest.raises(RecoverLoraError, match=message):
        load_llama(stories_gguf, adapter, options())


def test_model_and_adapter_swapped_are_refused(stories_gguf, good_adapter):
    from recover_lora.runtime.llama import load_llama

    with pytest.raises(RecoverLoraError, match="is a LoRA adapter, not a model"):
        load_llama(good_adapter, options=options())
    with pytest.raises(RecoverLoraError, match="not 'adapter'"):
        load_llama(stories_gguf, stories_gguf, options())


def test_gpu_layers_refused_on_cpu_build(stories_gguf):
    import llama_cpp

    from recover_lora.runtime.llama import load_llama

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python has a GPU back end")
    with pytest.raises(RecoverLoraError, match="CPU only"):
        load_llama(stories_gguf, options=options(gpu_layers=4))


def _next_token_logits(loaded, tokens):
    loaded.llm.reset()
    loaded.llm.eval(tokens)
    return np.array(loaded.llm.scores[len(tokens) - 1])


def test_fitting_adapter_loads_and_changes_the_output(stories_gguf, good_adapter):
    from recover_lora.runtime.llama import load_llama

    tokens = [1, 403, 407, 261, 378, 432]
    base = load_llama(stories_gguf, options=options(logits_all=True))
    adapted = load_llama(stories_gguf, good_adapter, options(logits_all=True))
    silenced = load_llama(stories_gguf, good_adapter, options(logits_all=True, lora_scale=0.0))
    try:
        assert adapted.adapter.ranks == [4] and adapted.adapter.alpha == 8.0
        base_logits = _next_token_logits(base, tokens)
        assert np.abs(_next_token_logits(adapted, tokens) - base_logits).max() > 1e-2
        np.testing.assert_allclose(_next_token_logits(silenced, tokens), base_logits, atol=1e-5)
    finally:
        for m in (base, adapted, silenced):
            m.close()


# --------------------------------------------------------------------------------------------
# Generation and chat


def test_greedy_generation_is_deterministic(stories_gguf):
    from recover_lora.runtime.generate import stream_completion
    from recover_lora.runtime.llama import load_llama

    loaded = load_llama(stories_gguf, options=options())
    try:
        first = "".join(stream_completion(loaded.llm, "Once upon a time", max_tokens=12))
        second = "".join(stream_completion(loaded.llm, "Once upon a time", max_tokens=12))
        assert first == second and len(first.split()) >= 3
        with pytest.raises(RecoverLoraError, match="context holds"):
            list(stream_completion(loaded.llm, "word " * 300, max_tokens=4))
    finally:
        loaded.close()


def test_chat_streams_a_reply_per_line(stories_gguf):
    from recover_lora.runtime.generate import chat
    from recover_lora.runtime.llama import load_llama

    loaded = load_llama(stories_gguf, options=options(n_ctx=256))
    pieces: list[str] = []
    try:
        history = chat(loaded.llm, ["Hello there\n", "\n", "Tell me a story\n"], pieces.append, max_tokens=8, temperature=0.0)
    finally:
        loaded.close()
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert "".join(pieces).count("\n") == 2 and history[1]["content"] in "".join(pieces)


# --------------------------------------------------------------------------------------------
# Tokens/s records


@pytest.fixture(scope="module")
def bench_records(stories_gguf, good_adapter):
    from recover_lora.runtime.bench import BenchConfig, Variant, run_bench

    config = BenchConfig(depths=(0, 16), n_prompt=8, n_gen=4, repeats=2, threads=1, hash_files=True)
    return run_bench([Variant(stories_gguf), Variant(stories_gguf, good_adapter)], config)


def test_bench_records_follow_the_schema(bench_records, stories_gguf):
    from recover_lora.fileio import sha256_file
    from recover_lora.runtime.records import SCHEMA_VERSION, validate_record

    assert [(r["depth"], r["variant_index"]) for r in bench_records] == [(0, 0), (0, 1), (16, 0), (16, 1)]
    for record in bench_records:
        validate_record(record)
        assert record["schema_version"] == SCHEMA_VERSION and record["n_prompt"] == 8 and record["n_gen"] == 4
        assert len(record["tg_tokens_per_s"]["samples"]) == 2 and record["settings"]["threads"] == 1
        assert record["model"]["sha256"] == sha256_file(stories_gguf)
        assert record["model"]["tensor_types"] == {"F32": 47}
        assert record["device"]["backend"] and record["device"]["cpu_model"] is not None
    base, adapted = bench_records[0], bench_records[1]
    assert base["ratio_vs_baseline"] is None and base["adapter"] is None
    assert adapted["adapter"]["rank"] == 4 and adapted["variant"] == "stories.f32.gguf+adapter.gguf"
    ratios = adapted["ratio_vs_baseline"]["tg"]["samples"]
    expected = [a / b for a, b in zip(adapted["tg_tokens_per_s"]["samples"], base["tg_tokens_per_s"]["samples"])]
    assert ratios == pytest.approx(expected)
    assert len({r["run_id"] for r in bench_records}) == 1


def test_bench_records_append_and_read_back(bench_records, tmp_path):
    from recover_lora.runtime.bench import format_table
    from recover_lora.runtime.records import append_records, read_records

    path = tmp_path / "results" / "bench-test.jsonl"
    append_records(path, bench_records[:2])
    append_records(path, bench_records[2:])
    assert read_records(path) == json.loads(json.dumps(bench_records))
    assert "(baseline)" in format_table(bench_records)
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(RecoverLoraError, match=":5 is not JSON"):
        read_records(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(schema_version=99), "schema_version=99"),
        (lambda r: r.pop("depth"), "'depth'"),
        (lambda r: r["tg_tokens_per_s"].update(min=1e9), "inconsistent"),
        (lambda r: r["device"].pop("backend"), "no 'backend'"),
    ],
)
def test_broken_bench_record_is_rejected(bench_records, change, message):
    from recover_lora.runtime.records import validate_record

    record = json.loads(json.dumps(bench_records[0]))
    change(record)
    with pytest.raises(RecoverLoraError, match=message):
        validate_record(record)


def test_bench_config_checks_its_values():
    from recover_lora.runtime.bench import BenchConfig, Variant

    with pytest.raises(RecoverLoraError, match="--depth"):
        BenchConfig(depths=(0, -1))
    with pytest.raises(RecoverLoraError, match="--repeats"):
        BenchConfig(repeats=0)
    assert BenchConfig(depths=(0, 4096), n_prompt=128).n_ctx == 4352
    assert Variant.parse("a.gguf+b.gguf").lora == Path("b.gguf")
    with pytest.raises(RecoverLoraError, match="ends with"):
        Variant.parse("a.gguf+")


def test_cli_run_and_bench(stories_gguf, good_adapter, tmp_path):
    from typer.testing import CliRunner

    from recover_lora.cli import app
    from recover_lora.runtime.records import read_records

    runner = CliRunner()
    result = runner.invoke(app, ["run", str(stories_gguf), "-p", "Once upon a time", "-n", "8", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.split()) >= 2
    out = tmp_path / "bench.jsonl"
    args = ["bench", str(stories_gguf), "--lora", str(good_adapter), "-d", "0", "-r", "1", "--n-prompt", "4", "--n-gen", "2", "-t", "1", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [r["variant"] for r in read_records(out)] == ["stories.f32.gguf", "stories.f32.gguf+adapter.gguf"]
    result = runner.invoke(app, ["bench", "--compare", str(stories_gguf)])
    assert isinstance(result.exception, RecoverLoraError) and "two or more" in str(result.exception)


def test_bench_without_out_writes_to_the_results_folder_of_the_environment(stories_gguf, tmp_path, monkeypatch):
    """`bench` and `devices calibrate` share one results folder: $RECOVER_LORA_RESULTS, not a path under the working directory."""
    from typer.testing import CliRunner

    from recover_lora.cli import app
    from recover_lora.runtime.records import default_results_path, machine_identity, read_records, read_results, same_machine

    results = tmp_path / "results"
    monkeypatch.setenv("RECOVER_LORA_RESULTS", str(results))
    monkeypatch.chdir(tmp_path)  # the old default, devices/results, was relative to here
    args = ["bench", str(stories_gguf), "-d", "0", "-r", "1", "--n-prompt", "4", "--n-gen", "2", "-t", "1", "--no-hash"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert default_results_path().parent == results and not (tmp_path / "devices").exists()
    (record,) = read_records(default_results_path())
    assert record["device"]["backend"] == "CPU" and record["settings"]["gpu_layers"] == 0
    (decode,) = read_results(results)  # what `devices calibrate` reads
    assert decode.model_path == str(stories_gguf.resolve()) and decode.backend == "CPU"
    assert same_machine(decode.fingerprint, machine_identity())


def test_timer_rewinds_the_kv_cache(stories_gguf):
    from recover_lora.runtime.llama import load_llama
    from recover_lora.runtime.timer import LlamaTimer

    loaded = load_llama(stories_gguf, options=options())
    try:
        timer = LlamaTimer(loaded)
        assert timer.decode([timer.any_token] * 8) > 0 and timer.depth == 8
        timer.rewind(3)
        steps = timer.decode_steps([timer.any_token] * 2)
        assert len(steps) == 2 and all(s > 0 for s in steps) and timer.depth == 5
        with pytest.raises(ValueError, match="depth 6"):
            timer.rewind(6)
    finally:
        loaded.close()
