"""Importance matrices: llama.cpp's GGUF format, computed by the padded teacher, used by llama.cpp's quantizer."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import STORIES_DIR, llama_cpp_logits, sample_tokens, torch_threads
from recover_lora.errors import RecoverLoraError
from recover_lora.export import quantize
from recover_lora.export.imatrix_file import (
    COUNTS_SUFFIX,
    SUMS_SUFFIX,
    TYPES_NEEDING_IMATRIX,
    ImportanceMatrix,
    quantizer_weights,
    read_imatrix,
    write_imatrix,
)
from recover_lora.export.policy import Policy, TensorTypeRule, is_block_linear
from recover_lora.recovery.samples import FORMAT_VERSION, write_manifest, write_token_file

T = gguf.GGMLQuantizationType
# llama.cpp's sources as unpacked from the llama-cpp-python sdist this project builds (0.3.36).
LLAMA_CPP_SOURCES = Path(os.environ.get("LLAMA_CPP_SOURCES", "/work/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp"))
N_SAMPLES, SEQ_LEN = 6, 16


def synth_folder(folder: Path, n: int = N_SAMPLES, seq_len: int = SEQ_LEN, seed: int = 0) -> Path:
    """A set in `recover-lora synth`'s format: random tokens, every other row ending early."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (n, seq_len), generator=generator)
    ids[:, 0] = 1
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[::2, 9:] = False  # an EOS at position 9: positions after the last target are padding
    folder.mkdir(parents=True, exist_ok=True)
    write_token_file(folder / "samples.safetensors", ids, mask)
    write_manifest(folder, {"format_version": FORMAT_VERSION, "counts": {"n_samples": n, "seq_len": seq_len},
                            "tokenizer": {"vocab_size": 512}})
    return folder


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> dict[str, Path]:
    """stories260K's padded gateup export, a synthetic set and the importance matrix computed on it."""
    from recover_lora.export.quantize import export_model
    from recover_lora.recovery.imatrix import compute_imatrix

    torch_threads()
    folder = tmp_path_factory.mktemp("imatrix")
    synth = synth_folder(folder / "synth")
    gateup = export_model(STORIES_DIR, folder / "stories.gateup.gguf", "gateup", threads=2).path
    matrix = folder / "stories.imatrix.gguf"
    compute_imatrix(STORIES_DIR, matrix, samples=synth, batch_size=4)
    return {"synth": synth, "gateup": gateup, "imatrix": matrix, "folder": folder}


def small_matrix() -> ImportanceMatrix:
    rng = np.random.default_rng(0)
    return ImportanceMatrix(
        {"blk.1.ffn_up.weight": rng.random(256, dtype=np.float32), "blk.0.attn_q.weight": rng.random(512, dtype=np.float32)},
        {"blk.1.ffn_up.weight": 100, "blk.0.attn_q.weight": 100},
        datasets=["runs/synth"], chunk_count=4, chunk_size=25,
    )


def test_round_trip_in_llama_imatrix_layout(tmp_path):
    matrix = small_matrix()
    path = write_imatrix(matrix, tmp_path / "m.gguf")
    back = read_imatrix(path)
    assert back.sums.keys() == matrix.sums.keys() and back.counts == matrix.counts
    for name in matrix.sums:
        np.testing.assert_array_equal(back.sums[name], matrix.sums[name])
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["runs/synth"], 4, 25)
    # The raw file, as imatrix.cpp's save_imatrix lays it out.
    reader = gguf.GGUFReader(path)
    keys = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(keys) == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert keys["general.type"].contents() == "imatrix"
    assert keys["imatrix.datasets"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
    assert keys["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert [t.name for t in reader.tensors] == [
        "blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts", "blk.1.ffn_up.weight.in_sum2", "blk.1.ffn_up.weight.counts"
    ]
    assert all(t.tensor_type == T.F32 for t in reader.tensors)
    assert [t.shape.tolist() for t in reader.tensors] == [[512], [1], [256], [1]]  # ggml_n_dims drops the n_mat = 1 axis


@pytest.mark.skipif(not LLAMA_CPP_SOURCES.is_dir(), reason=f"llama.cpp sources not at {LLAMA_CPP_SOURCES} (set LLAMA_CPP_SOURCES)")
def test_names_and_keys_are_llama_cpp_s():
    """llama.cpp's imatrix reader is C++ in `common` (not in libllama), so check our names against its sources."""
    loader = (LLAMA_CPP_SOURCES / "common/imatrix-loader.h").read_text()
    keys = dict(re.findall(r'LLM_KV_IMATRIX_(\w+)\s*=\s*"([^"]+)"', loader))
    assert keys == {"DATASETS": gguf.Keys.IMatrix.DATASETS, "CHUNK_COUNT": gguf.Keys.IMatrix.CHUNK_COUNT,
                    "CHUNK_SIZE": gguf.Keys.IMatrix.CHUNK_SIZE}
    writer = (LLAMA_CPP_SOURCES / "tools/imatrix/imatrix.cpp").read_text()
    assert f'"%s{SUMS_SUFFIX}"' in writer and f'"%s{COUNTS_SUFFIX}"' in writer
    assert 'gguf_set_val_str(ctx_gguf, "general.type", "imatrix")' in writer
    reader = (LLAMA_CPP_SOURCES / "common/imatrix-loader.cpp").read_text()
    assert f'in_sum2_suffix{{ "{SUMS_SUFFIX}" }}' in reader and f'counts_suffix{{ "{COUNTS_SUFFIX}" }}' in reader
    quant = (LLAMA_CPP_SOURCES / "src/llama-quant.cpp").read_text()
    body = quant[quant.index("static bool tensor_requires_imatrix"):]
    body = body[: body.index("return true;")]
    assert {T[name] for name in re.findall(r"case GGML_TYPE_(\w+):", body)} == TYPES_NEEDING_IMATRIX


def test_matrix_equals_a_hand_computation_on_a_tiny_batch():
    """Our statistics of the padded teacher vs squares summed by hand from the unpadded teacher's inputs."""
    torch = torch_threads()
    from recover_lora.recovery.activations import collect_activation_stats, counted_positions
    from recover_lora.recovery.imatrix import padded_teacher
    from recover_lora.recovery.student import build_teacher

    ids = torch.tensor([sample_tokens(12, seed=1), sample_tokens(12, seed=2)])
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[1, 8:] = False  # row 1 ends after position 7: 12 + 8 positions count
    counted = counted_positions(loss_mask)
    assert counted.sum() == 20 and counted[1, :8].all() and not counted[1, 8:].any()

    teacher, _ = build_teacher(STORIES_DIR)
    captured = {}

    def capture(name):
        def hook(module, args):
            captured[name] = args[0].double().clone()

        return hook

    hooks = [m.register_forward_pre_hook(capture(name))
             for name, m in teacher.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")]
    with torch.no_grad():
        teacher(input_ids=ids)
    for hook in hooks:
        hook.remove()
    hand = {name: (x[counted] ** 2).sum(dim=0).numpy() for name, x in captured.items()}
    # Layer 0's q input from scratch: RMSNorm of the embeddings.
    layer = teacher.model.layers[0].input_layernorm
    embedded = teacher.model.embed_tokens(ids).double()
    normed = embedded * torch.rsqrt(embedded.pow(2).mean(-1, keepdim=True) + layer.variance_epsilon) * layer.weight.double()
    np.testing.assert_allclose(hand["model.layers.0.self_attn.q_proj"], (normed[counted] ** 2).sum(0).numpy(), rtol=1e-5)

    padded, config = padded_teacher(STORIES_DIR)
    stats = collect_activation_stats(padded, [(ids, counted)])
    assert set(stats) == set(hand) and len(stats) == 7 * 5
    for name, s in stats.items():
        assert s.count == 20
        assert s.sum_sq.shape == (padded.get_submodule(name).in_features,)
        if name.endswith("o_proj"):
            # Added zero query heads attend to real values (their o_proj columns are zero weights): every
            # real column is among the padded ones, wherever the head layout puts it.
            assert np.isclose(hand[name][:, None], s.sum_sq[None, :], rtol=1e-4).any(axis=1).all(), name
            continue
        zero = s.sum_sq == 0  # padded hidden / intermediate columns see exactly zero activation ...
        assert zero.sum() == s.sum_sq.size - hand[name].size, name
        # ... and the real ones see what the unpadded teacher sees (padding may place them anywhere).
        np.testing.assert_allclose(np.sort(s.sum_sq[~zero]), np.sort(hand[name]), rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(stats["model.layers.0.mlp.gate_proj"].sum_sq[:64], hand["model.layers.0.mlp.gate_proj"], rtol=1e-4)


def test_gram_matrices_equal_a_hand_computation_and_are_held_once_per_input():
    """XᵀX over two batches = the inputs' products summed by hand; gate and up (and q, k) read one tensor: one array."""
    torch = torch_threads()
    from recover_lora.recovery.activations import collect_activation_stats
    from recover_lora.recovery.student import build_teacher

    teacher, _ = build_teacher(STORIES_DIR)
    batches = [(torch.tensor([sample_tokens(10, seed=s)]), torch.ones(1, 10, dtype=torch.bool)) for s in (3, 4)]
    batches[1][1][0, 6:] = False
    names = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj",
             "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    captured: dict[str, list] = {n: [] for n in names}
    hooks = [teacher.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: captured[n].append(a[0].double().clone()))
             for n in names]
    with torch.no_grad():
        for ids, _ in batches:
            teacher(input_ids=ids)
    for hook in hooks:
        hook.remove()
    # gate is asked for its statistics but not its XᵀX: up owns the array it would share.
    stats = collect_activation_stats(teacher, batches, modules=names, covariance=names[1:])
    for name in names[1:]:
        rows = torch.cat([x[c] for x, (_, c) in zip(captured[name], batches)])
        np.testing.assert_allclose(stats[name].xtx, (rows.T @ rows).numpy(), rtol=1e-6, atol=1e-9, err_msg=name)
        assert stats[name].count == 16
    assert stats[names[0]].xtx is None
    assert stats[names[3]].xtx is stats[names[4]].xtx  # q and k: one array
    assert stats[names[1]].xtx is not stats[names[2]].xtx  # other layer, other input
    both = collect_activation_stats(teacher, batches, modules=names[:2], covariance=names[:2])
    assert both[names[0]].xtx is both[names[1]].xtx
    np.testing.assert_allclose(both[names[1]].xtx, stats[names[1]].xtx, rtol=1e-12)
    empty = collect_activation_stats(teacher, [(batches[0][0], torch.zeros(1, 10, dtype=torch.bool))], modules=names[:2], covariance=names[:2])
    assert not empty[names[0]].xtx.any() and empty[names[0]].count == 0


def test_computed_matrix_names_and_widths_are_the_exported_files(stories):
    matrix = read_imatrix(stories["imatrix"])
    reader = gguf.GGUFReader(stories["gateup"])
    linears = {t.name: int(t.shape[0]) for t in reader.tensors if is_block_linear(t.name)}
    assert matrix.widths() == linears  # ggml ne[0] is the input width, padding included
    counted = 3 * SEQ_LEN + 3 * 9  # three full rows, three ending after position 8
    assert set(matrix.counts.values()) == {counted}
    assert matrix.datasets == [str(stories["synth"])] and (matrix.chunk_count, matrix.chunk_size) == (N_SAMPLES, SEQ_LEN)


def test_zero_columns_get_a_tiny_positive_weight():
    matrix = ImportanceMatrix({"a": np.array([4.0, 0.0, 2.0], np.float32), "b": np.zeros(3, np.float32)}, {"a": 2, "b": 5})
    weights = quantizer_weights(matrix, ["a", "b"])
    assert weights["a"][0] == 2.0 and weights["a"][2] == 1.0 and 0 < weights["a"][1] < 1e-5
    np.testing.assert_array_equal(weights["b"], np.ones(3))  # no activation at all: the plain squared error


def fail_if_called(*args, **kwargs):
    raise AssertionError("llama.cpp's quantizer must not be called")


@pytest.mark.parametrize("policy", [Policy.named("gateup", low_bit_type=T.IQ2_XS),
                                    Policy.named("w4", rules=[TensorTypeRule(r"blk\.0\.attn_q\.weight", T.IQ2_XXS)])])
def test_iq2_without_a_matrix_is_refused_before_llama_cpp(tmp_path, monkeypatch, policy):
    monkeypatch.setattr(quantize, "llama_cpp_quantize", fail_if_called)
    with pytest.raises(RecoverLoraError, match=r"blk\.0\.(ffn_gate|attn_q)\.weight is asked for IQ2_X+S.*importance matrix.*--imatrix") as e:
        quantize.export_model(STORIES_DIR, tmp_path / "x.gguf", policy)
    assert "\n" not in str(e.value) and not (tmp_path / "x.gguf").exists()


def test_cli_refuses_iq2_xs_without_a_matrix_in_one_line(tmp_path, monkeypatch, capsys):
    from recover_lora.cli import main

    monkeypatch.setattr(quantize, "llama_cpp_quantize", fail_if_called)
    with pytest.raises(SystemExit) as e:
        main(["export", str(STORIES_DIR), "-o", str(tmp_path / "x.gguf"), "--low-bit-type", "IQ2_XS"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: blk.0.ffn_gate.weight is asked for IQ2_XS") and err.count("\n") == 1


def test_iq2_xs_with_a_matrix_exports_and_runs_in_llama_cpp(stories, tmp_path):
    """IQ2_XS gate/up with our matrix: llama.cpp writes the file and computes what the torch student computes."""
    torch_threads()
    from recover_lora.recovery.student import build_student

    out = tmp_path / "stories.iq2_xs.gguf"
    result = quantize.export_model(STORIES_DIR, out, Policy.named("gateup", low_bit_type=T.IQ2_XS), imatrix=stories["imatrix"])
    assert {t for n, t in result.types.items() if ".ffn_gate." in n or ".ffn_up." in n} == {"IQ2_XS"}
    tokens = sample_tokens(32)
    from_llama = llama_cpp_logits(out, tokens)
    student, _ = build_student(out)  # gguf-py dequantizes IQ2_XS
    with torch.no_grad():
        from_torch = student(torch.tensor([tokens])).logits[0].numpy()
    assert np.isfinite(from_llama).all()
    assert np.max(np.abs(from_llama - from_torch)) < 0.1 * np.max(np.abs(from_torch))


def bad_matrices(good: ImportanceMatrix) -> list[tuple[ImportanceMatrix, str]]:
    missing = ImportanceMatrix({n: v for n, v in good.sums.items() if n != "blk.1.ffn_up.weight"},
                               {n: c for n, c in good.counts.items() if n != "blk.1.ffn_up.weight"})
    wider = ImportanceMatrix({**good.sums, "blk.0.ffn_down.weight": np.ones(300, np.float32)}, dict(good.counts))
    extra = ImportanceMatrix({**good.sums, "blk.9.ffn_gate.weight": np.ones(256, np.float32)},
                             {**good.counts, "blk.9.ffn_gate.weight": 1})
    return [(missing, r"no entry for blk\.1\.ffn_up\.weight"), (wider, r"blk\.0\.ffn_down\.weight 300 columns.*has 256"),
            (extra, r"blk\.9\.ffn_gate\.weight, which this model does not have")]


def test_a_matrix_of_another_model_names_the_first_mismatching_tensor(stories, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "llama_cpp_quantize", fail_if_called)
    good = read_imatrix(stories["imatrix"])
    cases = bad_matrices(good)
    # (A matrix of the model's own widths, 64/172, is not another model's: a padded export pads it, test_type_search.py.)
    for matrix, message in cases:
        with pytest.raises(RecoverLoraError, match=message) as e:
            quantize.export_model(STORIES_DIR, tmp_path / "x.gguf", "gateup", imatrix=matrix)
        assert "\n" not in str(e.value) and not (tmp_path / "x.gguf").exists()


def test_truncated_foreign_and_missing_files_are_one_line_errors(stories, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "llama_cpp_quantize", fail_if_called)
    data = stories["imatrix"].read_bytes()
    truncated, garbage = tmp_path / "truncated.gguf", tmp_path / "garbage.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(b"not a gguf at all" * 10)
    cases = [(truncated, "not a readable GGUF importance matrix"), (garbage, "not a readable GGUF importance matrix"),
             (stories["gateup"], "holds no importance-matrix entries"),
             (tmp_path / "nothing.gguf", "does not exist")]
    for path, message in cases:
        with pytest.raises(RecoverLoraError, match=message) as e:
            read_imatrix(path)
        assert "\n" not in str(e.value)
        with pytest.raises(RecoverLoraError, match=message):
            quantize.export_model(STORIES_DIR, tmp_path / "x.gguf", "gateup", imatrix=path)
        assert not (tmp_path / "x.gguf").exists()


def test_imatrix_cli_and_nothing_half_written(stories, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from recover_lora.cli import app

    runner = CliRunner()
    out = tmp_path / "m.gguf"
    args = ["imatrix", str(STORIES_DIR), "-o", str(out), "--samples", str(stories["synth"]), "--max-samples", "2", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "35 tensors" in result.stdout and read_imatrix(out).chunk_count == 2
    result = runner.invoke(app, args)
    assert isinstance(result.exception, RecoverLoraError) and "--force" in str(result.exception)

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError):
        write_imatrix(small_matrix(), tmp_path / "other.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_iq_types_are_bytes_like_any_other_in_roofline_and_matvec_probe(tmp_path):
    """The roofline counts IQ blocks from gguf-py; the matvec probe's random-weight export of an IQ2 type
    (which llama.cpp refuses without a matrix) gets uniform weights."""
    import json

    from recover_lora.devices.matvec import parse_matvec_types
    from recover_lora.devices.roofline import tensor_bytes

    assert tensor_bytes(1024, T.IQ2_XS) == 4 * gguf.GGML_QUANT_SIZES[T.IQ2_XS][1] == 296
    assert parse_matvec_types("IQ2_XS,iq3_xxs") == (T.IQ2_XS, T.IQ3_XXS)
    config = json.loads((STORIES_DIR / "config.json").read_text()) | {"hidden_size": 256, "intermediate_size": 256,
                                                                       "head_dim": 32, "num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    policy = Policy.named("w4", rules=[TensorTypeRule(".*", T.IQ2_XS)])  # as devices/matvec.py asks for each type
    result = quantize.export_model(tmp_path / "config.json", tmp_path / "probe.gguf", policy, threads=2, random_weights=True)
    assert set(result.types[n] for n in result.types if is_block_linear(n)) == {"IQ2_XS"}
    assert np.isfinite(llama_cpp_logits(tmp_path / "probe.gguf", [1, 5, 9, 20])).all()


@pytest.mark.slow
def test_default_model_q2_k_with_the_matrix_has_lower_activation_weighted_error(tmp_path):
    """Real gate/up tensors of the default model (layers 0 and 15), quantized to Q2_K by llama.cpp without and
    with our matrix: Σ imatrix · (W − Q(W))², read back from llama.cpp's files, must drop."""
    torch = torch_threads()
    from recover_lora.export.gguf_io import write_gguf
    from recover_lora.export.model import LazyTensors
    from recover_lora.recovery.activations import collect_activation_stats
    from recover_lora.recovery.imatrix import importance_matrix, padded_teacher

    teacher, config = padded_teacher(None)
    layers = (0, 15)
    modules = [f"model.layers.{i}.mlp.{kind}_proj" for i in layers for kind in ("gate", "up")]
    ids = torch.randint(100, 20000, (4, 64), generator=torch.Generator().manual_seed(0))
    stats = collect_activation_stats(teacher, [(ids, torch.ones_like(ids, dtype=torch.bool))], modules=modules)
    del teacher

    # A two-layer model made of those layers (renamed 0 and 1), written in F16 for llama.cpp.
    from recover_lora.export.sources import load_model
    from recover_lora.export.pad import pad_model

    padded = pad_model(load_model())
    rename = {f"model.layers.{i}.": f"model.layers.{j}." for j, i in enumerate(layers)}
    loaders = {}
    for name in padded.tensors:
        prefix = next((p for p in rename if name.startswith(p)), None)
        if name.startswith("model.layers.") and prefix is None:
            continue
        new = name.replace(prefix, rename[prefix]) if prefix else name
        loaders[new] = lambda name=name: padded.tensors[name]
    small = padded.replace(config=dataclasses.replace(padded.config, num_layers=2), tensors=LazyTensors(loaders))
    source = write_gguf(small, tmp_path / "two-layers.f16.gguf", dtype="f16")
    small_stats = {m.replace(p, rename[p]): stats[m] for m in modules for p in rename if m.startswith(p)}
    matrix = importance_matrix(small_stats, small.config, ["random tokens"], 4, 64)

    reader = gguf.GGUFReader(source)
    gate_up = sorted(matrix.sums)
    assert gate_up == ["blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.1.ffn_gate.weight", "blk.1.ffn_up.weight"]
    types = {t.name: (T.Q2_K if t.name in gate_up else T.F16) for t in reader.tensors if len(t.shape) == 2}
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "imatrix.gguf"
    quantize.llama_cpp_quantize(source, plain, types, threads=2)
    quantize.llama_cpp_quantize(source, weighted, types, threads=2, imatrix=quantizer_weights(matrix, gate_up))

    def weighted_errors(path: Path) -> dict[str, float]:
        tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
        errors = {}
        for name in gate_up:
            t = tensors[name]
            assert t.tensor_type == T.Q2_K
            quantized = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            hf = next(m for m in small_stats if name.startswith(f"blk.{m.split('.')[2]}.") and ("gate" in m) == ("gate" in name))
            original = np.asarray(small.tensors[f"{hf}.weight"], dtype=np.float64)
            errors[name] = float(((original - quantized) ** 2 * small_stats[hf].mean_sq()).sum())
        return errors

    without, with_matrix = weighted_errors(plain), weighted_errors(weighted)
    print({n: round(with_matrix[n] / without[n], 3) for n in gate_up})
    assert all(with_matrix[n] < without[n] for n in gate_up)
    assert sum(with_matrix.values()) < 0.9 * sum(without.values())
