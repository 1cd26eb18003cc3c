"""Block-wise reconstruction (recovery/reconstruct.py, quantized_weight.py): exact bytes, llama.cpp's logits, lower block errors.

Every ggml block type is exported by llama.cpp at the model's own widths and reconstructed: stories260K
(widths 64 and 172: the 32-weight types fit every linear but ffn_down, whose 172 inputs fit no block and
stay F16) and a tiny random Llama / Qwen2 of hidden 256 for the K-quants. The oracles are gguf-py's
dequantize (what was trained is what is written), llama.cpp's logits of the written file, and the block
errors recomputed here from the written file with plain forward hooks, independently of the module's caches.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import STORIES_DIR, llama_cpp_logits, make_tiny_hf_model, sample_tokens, torch_logits, torch_threads
from recover_lora.errors import RecoverLoraError
from recover_lora.export.ggml_blocks import BLOCK_TYPES, from_bytes
from recover_lora.export.ggml_quantize import quantize_rows
from recover_lora.export.gguf_header import read_gguf_header
from recover_lora.export.imatrix_file import TYPES_NEEDING_IMATRIX
from recover_lora.export.model import hf_name
from recover_lora.export.policy import Policy, TensorTypeRule
from recover_lora.recovery import reconstruct as reconstruct_module
from recover_lora.recovery.activations import counted_positions
from recover_lora.recovery.commands import keep_types_setting
from recover_lora.recovery.quantized_weight import QuantizedWeight, signed_step
from recover_lora.recovery.reconstruct import ReconstructSettings, reconstruct
from recover_lora.recovery.samples import load_samples
from recover_lora.recovery.student import build_student, build_teacher
from test_imatrix import synth_folder
from test_type_search import HELDOUT_TEXT

T = gguf.GGMLQuantizationType
BLOCK32 = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL]
K_QUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS]  # IQ4_XS: 256-weight super-blocks too (IQ3_S below)
ITERS = 24  # few steps at the default step size (1 / DEFAULT_ITERS): every block improves on tiny models
SETTINGS = ReconstructSettings(iters=ITERS, lr=1 / reconstruct_module.DEFAULT_ITERS, batch_size=4, keep_types=())  # every type
# (model, type): stories260K for the 32-weight types, the tiny Llama for the K-quants and the IQ3_S / IQ3_XXS grids, one Qwen2
# (biases, GQA).
CASES = [("stories", t) for t in BLOCK32] + [("llama", t) for t in K_QUANTS + [T.IQ3_S, T.IQ3_XXS]] + [("qwen2", T.Q4_K)]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return synth_folder(tmp_path_factory.mktemp("reconstruct-synth") / "synth", n=16, seq_len=32)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("reconstruct-models")
    return {"stories": STORIES_DIR, "llama": make_tiny_hf_model(folder / "llama", "llama"),
            "qwen2": make_tiny_hf_model(folder / "qwen2", "qwen2", seed=1),
            "gemma3": make_tiny_hf_model(folder / "gemma3", "gemma3", seed=2)}


def export_unpadded(source: Path, ggml_type, out: Path, head_rule: TensorTypeRule | None = None,
                    extra_rules: list[TensorTypeRule] | None = None) -> Path:
    """Every block linear at `ggml_type` (but where `extra_rules` say otherwise), the model's own widths; stories' ffn_down
    (172 inputs) stays F16."""
    from recover_lora.export.quantize import export_model

    rules = [TensorTypeRule(r"blk\.\d+\.ffn_down\.weight", T.F16)] if source == STORIES_DIR else []
    rules += [head_rule] if head_rule else []
    rules += extra_rules or []
    rules += [TensorTypeRule(r"blk\..*\.weight", ggml_type), TensorTypeRule(r"token_embd\.weight", T.Q8_0)]
    matrix = None
    if ggml_type in TYPES_NEEDING_IMATRIX:  # llama.cpp quantizes IQ3_XXS only with an importance matrix, as a user would
        from recover_lora.recovery.imatrix import compute_imatrix

        matrix = compute_imatrix(source, out.with_suffix(".imatrix.gguf"), text=HELDOUT_TEXT, seq_len=64, max_tokens=1024, pad="none")
    return export_model(source, out, Policy.named("w4", rules=rules), pad="none", threads=2, imatrix=matrix).path


def tensors(path: Path) -> dict:
    return {t.name: t for t in read_gguf_header(path).tensors}


def raw_bytes(tensor) -> np.ndarray:
    return np.asarray(tensor.data).reshape(-1).view(np.uint8)


def layer_errors(base: Path, new: Path, teacher_source: Path, synth: Path) -> tuple[list[float], list[float]]:
    """Per block, MSE over the counted positions to the teacher's block applied to the new file's input to that block
    (the default --target local), recomputed from the files: (the new file's block, the base's block on those same inputs)."""
    samples = load_samples(synth)
    ids, counted = samples.input_ids, counted_positions(samples.loss_mask)
    keep = counted.any(dim=1)
    ids, counted = ids[keep], counted[keep]
    teacher, new_student, base_student = build_teacher(teacher_source)[0], build_student(new)[0], build_student(base)[0]
    seen = {"in": [], "kwargs": [], "out": []}

    def record(module, args, kwargs, out):
        seen["in"].append(args[0])
        seen["kwargs"].append(kwargs)
        seen["out"].append(out[0] if isinstance(out, tuple) else out)

    hooks = [layer.register_forward_hook(record, with_kwargs=True) for layer in new_student.model.layers]
    with torch.no_grad():
        new_student(ids, use_cache=False)
    for hook in hooks:
        hook.remove()

    mse = lambda a, b: float(((a - b)[counted] ** 2).mean())
    first = lambda out: out[0] if isinstance(out, tuple) else out
    after, before = [], []
    with torch.no_grad():
        for teacher_layer, base_layer, x, kwargs, out in zip(teacher.model.layers, base_student.model.layers, seen["in"],
                                                              seen["kwargs"], seen["out"]):
            target = first(teacher_layer(x, **kwargs))
            after.append(mse(out, target))
            before.append(mse(first(base_layer(x, **kwargs)), target))
    return after, before


@pytest.mark.parametrize("ggml_type", list(BLOCK_TYPES), ids=lambda t: t.name)
def test_trained_weight_is_exactly_what_its_bytes_dequantize_to(ggml_type):
    """Start: the GGUF's own weights. After signed steps: forward() == gguf.quants.dequantize(to_bytes()), bit for bit."""
    torch_threads()
    rng = np.random.default_rng(int(ggml_type))
    rows = rng.standard_normal((6, 512)).astype(np.float32)
    rows[1, :256] = 0.0  # a zero super-block: d = 0, step 0 everywhere
    rows[2] *= np.repeat(rng.uniform(0.01, 3, 16), 32)
    raw = quantize_rows(rows, ggml_type, threads=1)
    weight = QuantizedWeight(from_bytes(raw, ggml_type), torch.from_numpy(rows))
    assert torch.equal(weight(), torch.from_numpy(gguf.quants.dequantize(raw, ggml_type).reshape(rows.shape)))
    inputs = torch.from_numpy(rng.standard_normal((32, 512)).astype(np.float32))
    for step in range(6):
        ((inputs @ (torch.from_numpy(rows) - weight()).T) ** 2).mean().backward()
        signed_step(weight.parameters(), 0.1)
        weight.clamp_()
    written = weight.to_blocks().to_bytes().reshape(raw.shape)
    trained = weight().detach()
    assert torch.equal(trained, torch.from_numpy(gguf.quants.dequantize(written, ggml_type).reshape(rows.shape)))
    assert not np.array_equal(written, raw)  # it learned something


@pytest.mark.parametrize("model,ggml_type", CASES, ids=[f"{m}-{t.name}" for m, t in CASES])
def test_reconstructed_gguf_is_exact_runs_in_llama_cpp_and_lowers_every_block_error(model, ggml_type, models, synth, tmp_path):
    torch_threads()
    source = models[model]
    base = export_unpadded(source, ggml_type, tmp_path / "base.gguf")
    # The blocks alone: a tied head's new rows would change every block's input after its error was recorded (the head's
    # stage has its own test below).
    result = reconstruct(base, tmp_path / "rec.gguf", teacher=source, samples=synth, settings=dataclasses.replace(SETTINGS, head=False))

    # Same tensors, types, byte counts and header; only the block linears of the block type changed.
    old, new = tensors(base), tensors(result.path)
    assert result.path.stat().st_size == base.stat().st_size and new.keys() == old.keys()
    header = min(int(t.data_offset) for t in old.values())
    assert result.path.read_bytes()[:header] == base.read_bytes()[:header]
    linears = sorted(n for n, t in old.items() if int(t.tensor_type) == int(ggml_type) and n.startswith("blk."))
    assert result.rewritten and set(result.rewritten) <= set(linears)  # a block no better than llama.cpp's is reverted
    for name, tensor in old.items():
        assert new[name].tensor_type == tensor.tensor_type
        same = np.array_equal(raw_bytes(new[name]), raw_bytes(tensor))
        assert same == (name not in result.rewritten), name
    if model == "stories":
        assert result.untouched == {f"blk.{i}.ffn_down.weight": "F16" for i in range(5)}

    # The torch student of the written file is its gguf-py dequantization, and llama.cpp computes the same model.
    student, info = build_student(result.path)
    for name in linears:
        hf = hf_name(name, info.config)
        expected = gguf.quants.dequantize(new[name].data, new[name].tensor_type).reshape(info.tensor_shapes[name])
        expected = info.config.arch.from_gguf(hf, expected, info.config)
        assert np.array_equal(student.get_parameter(hf).detach().numpy(), expected), name
    ids = sample_tokens(32, seed=5)
    ours, theirs = torch_logits(student, ids), llama_cpp_logits(result.path, ids, f32_kv_cache=True)
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 5e-2

    # Every block at least as close to the teacher as llama.cpp's rounding on the same inputs, most closer;
    # the report's numbers are those recomputed from the files.
    after, before = layer_errors(base, result.path, source, synth)
    records = result.blocks
    assert [r.block for r in records] == list(range(len(after)))
    np.testing.assert_allclose([r.error_after for r in records], after, rtol=1e-4)
    np.testing.assert_allclose([r.error_before for r in records], before, rtol=1e-4)
    assert all(a <= b for a, b in zip(after, before))
    assert sum(a < b for a, b in zip(after, before)) > len(after) / 2, (before, after)
    report = json.loads(result.report_path.read_text())
    assert report["tensor_types"] == {ggml_type.name: {"tuned": len(linears), "rewritten": len(result.rewritten)}}
    assert report["error_ratio"] < 1 and not (tmp_path / "rec.gguf.reconstruct").exists()


def calibration_kl(path: Path, source: Path, synth: Path, last: int) -> float:
    """The whole model's KL(teacher || file) per counted position of the last `last` calibration windows, from the files."""
    ids, counted = reconstruct_module.counted_windows(source, synth, None, reconstruct_module.DEFAULT_SAMPLES, None)
    ids, counted = ids[-last:], counted[-last:].to(torch.bool)
    with torch.no_grad():
        p = torch.log_softmax(build_teacher(source)[0](input_ids=ids).logits.float(), -1)[counted]
        q = torch.log_softmax(build_student(path)[0](input_ids=ids).logits.float(), -1)[counted]
    return float((p.exp() * (p - q)).sum(-1).mean())


# The output head's stage: the tied token embedding of stories260K, the untied output matrix of a Qwen2 and Gemma 3's tied,
# scaled embedding, all at 4 bits.
HEAD_CASES = [("stories", T.Q4_0, TensorTypeRule(r"token_embd\.weight", T.Q4_0)),
              ("qwen2", T.Q4_K, TensorTypeRule(r"output\.weight", T.Q4_K)),
              ("gemma3", T.Q4_K, TensorTypeRule(r"token_embd\.weight", T.Q4_K))]


@pytest.mark.parametrize("model,ggml_type,head_rule", HEAD_CASES, ids=[c[0] for c in HEAD_CASES])
def test_the_output_head_learns_the_next_token_kl_and_its_record_is_the_written_files_own(model, ggml_type, head_rule, models,
                                                                                           synth, tmp_path):
    """Same blocks with and without the head's stage; only the head's bytes differ, and the recorded held-out KLs are the
    two files' own (recomputed here through whole forward passes of the files); llama.cpp computes the written head."""
    torch_threads()
    source = models[model]
    base = export_unpadded(source, ggml_type, tmp_path / "base.gguf", head_rule)
    blocks_only = reconstruct(base, tmp_path / "blocks.gguf", teacher=source, samples=synth,
                              settings=dataclasses.replace(SETTINGS, head=False))
    result = reconstruct(base, tmp_path / "head.gguf", teacher=source, samples=synth, settings=SETTINGS)
    head = result.head
    assert blocks_only.head is None and head is not None
    assert (head.tensor, head.ggml_type, head.tied) == (head_rule.pattern.replace("\\", ""), head_rule.ggml_type.name, model != "qwen2")
    assert head.held_out_windows == 2  # 1 in 8 of the 16 windows
    assert head.kept and head.kl_after < head.kl_before, head
    assert head.kl_before == pytest.approx(calibration_kl(blocks_only.path, source, synth, 2), rel=1e-4)
    assert head.kl_after == pytest.approx(calibration_kl(result.path, source, synth, 2), rel=1e-4)
    old, new = tensors(blocks_only.path), tensors(result.path)
    for name in old:
        assert np.array_equal(raw_bytes(new[name]), raw_bytes(old[name])) == (name != head.tensor), name
    assert json.loads(result.report_path.read_text())["head"]["kept"] is True
    student, _ = build_student(result.path)
    ids = sample_tokens(32, seed=6)
    ours, theirs = torch_logits(student, ids), llama_cpp_logits(result.path, ids, f32_kv_cache=True)
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 5e-2


@pytest.fixture(scope="module")
def stories_q4_0(tmp_path_factory) -> Path:
    torch_threads()
    return export_unpadded(STORIES_DIR, T.Q4_0, tmp_path_factory.mktemp("reconstruct-q4_0") / "base.gguf")


class Interrupted(Exception):
    pass


def interrupt_at(monkeypatch, block: int) -> None:
    real = reconstruct_module.reconstruct_block

    def stop(index, *args, **kwargs):
        if index == block:
            raise Interrupted
        return real(index, *args, **kwargs)

    monkeypatch.setattr(reconstruct_module, "reconstruct_block", stop)


def test_same_settings_same_bytes_and_an_interrupted_run_resumes_to_them(stories_q4_0, synth, tmp_path, monkeypatch):
    run = lambda out, **kw: reconstruct(stories_q4_0, out, teacher=STORIES_DIR, samples=synth, **{"settings": SETTINGS, **kw})
    first = run(tmp_path / "a.gguf").path.read_bytes()
    assert run(tmp_path / "b.gguf").path.read_bytes() == first

    out = tmp_path / "c.gguf"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3)
        with pytest.raises(Interrupted):
            run(out)
    work = tmp_path / "c.gguf.reconstruct"
    assert sorted(p.name for p in work.iterdir()) == ["block-000.safetensors", "block-001.safetensors", "block-002.safetensors", "settings.json"]
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))  # nothing half-written
    resumed = run(out)
    assert resumed.resumed_blocks == 3 and out.read_bytes() == first and not work.exists()


def test_a_checkpoint_of_other_settings_is_refused_before_loading_models_or_discarded_with_force(stories_q4_0, synth, tmp_path, monkeypatch):
    out = tmp_path / "c.gguf"
    run = lambda **kw: reconstruct(stories_q4_0, out, teacher=STORIES_DIR, samples=synth, **{"settings": SETTINGS, **kw})
    with monkeypatch.context() as patch:
        interrupt_at(patch, 1)
        with pytest.raises(Interrupted):
            run()
    with monkeypatch.context() as patch:
        patch.setattr("recover_lora.recovery.student.build_teacher", lambda *a, **k: pytest.fail("loaded a model before refusing"))
        with pytest.raises(RecoverLoraError, match=rf"c\.gguf\.reconstruct is the checkpoint of another run \(iters was {ITERS} there, 5 now\); .*--force"):
            run(settings=dataclasses.replace(SETTINGS, iters=5))
        with pytest.raises(RecoverLoraError, match=r"\(seed was 0 there, 1 now\)"):
            run(settings=dataclasses.replace(SETTINGS, seed=1))
        with pytest.raises(RecoverLoraError, match=r"\(calibration\.windows was 16 there, 8 now\)"):
            run(max_samples=8)
    result = run(settings=dataclasses.replace(SETTINGS, iters=5), force=True)
    assert result.resumed_blocks == 0 and out.is_file()


def test_padded_gguf_and_bad_inputs_are_one_line_errors_that_leave_nothing(stories_gateup, stories_q4_0, synth, models, tmp_path, monkeypatch):
    run = lambda base, teacher=STORIES_DIR, **kw: reconstruct(base, tmp_path / "x.gguf", teacher=teacher, samples=synth, **kw)
    with pytest.raises(RecoverLoraError, match=r"padded widths .* export it with --pad none"):
        run(stories_gateup)
    with pytest.raises(RecoverLoraError, match="--teacher"):
        run(stories_q4_0, teacher=models["llama"])
    with pytest.raises(RecoverLoraError, match="--iters=0 must be a positive integer"):
        ReconstructSettings(iters=0)
    with pytest.raises(RecoverLoraError, match="--lr=-1"):
        ReconstructSettings(lr=-1)

    def refuse(*args, **kwargs):
        raise RecoverLoraError("llama.cpp refused")

    monkeypatch.setattr("recover_lora.export.llama_load.llama_cpp_load_check", refuse)
    with pytest.raises(RecoverLoraError, match="refused"):
        run(stories_q4_0, settings=ReconstructSettings(iters=2, batch_size=4))
    leftover = sorted(p.name for p in tmp_path.iterdir())
    assert leftover == ["x.gguf.reconstruct"], leftover  # finished blocks stay to resume from; no output, no temporary file


def test_cli_reconstructs_and_refuses_to_overwrite(stories_q4_0, synth, tmp_path):
    from typer.testing import CliRunner

    from recover_lora.cli import app

    out = tmp_path / "rec.gguf"
    args = ["reconstruct", str(stories_q4_0), "-o", str(out), "--teacher", str(STORIES_DIR), "--samples", str(synth),
            "--iters", "4", "--batch-size", "4", "--json", str(tmp_path / "report.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "block 0: error" in result.stdout and "5 left as they are" in result.stdout and out.is_file()
    assert json.loads((tmp_path / "report.json").read_text())["settings"]["iters"] == 4
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, RecoverLoraError) and "--force" in str(again.exception)


def test_block_output_fisher_predicts_the_kl_of_a_perturbation_of_a_block_output():
    """½ Σ F Δ² (BRECQ's weighting of a block's output error) against the KL measured in torch on the same windows, for a
    small random perturbation of block 2's output at every position."""
    from recover_lora.recovery.decoder_blocks import block_output_fisher, decoder_layers
    from recover_lora.recovery.imatrix import calibration_windows

    torch_threads()
    ids, counted, _ = calibration_windows(STORIES_DIR, None, HELDOUT_TEXT, max_samples=48, seq_len=64, max_tokens=4096)
    teacher, _ = build_teacher(STORIES_DIR)
    fisher = block_output_fisher(teacher, ids, counted)
    assert len(fisher) == len(decoder_layers(teacher)) and fisher[2].shape == (*ids.shape, teacher.config.hidden_size)
    with torch.no_grad():
        p = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
    noise = 0.05 * torch.randn(fisher[2].shape, generator=torch.Generator().manual_seed(0))

    def perturb(module, args, out):
        return (out[0] + noise,) + tuple(out[1:]) if isinstance(out, tuple) else out + noise

    handle = decoder_layers(teacher)[2].register_forward_hook(perturb)
    with torch.no_grad():
        q = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
    handle.remove()
    measured = float((p.exp() * (p - q)).sum(-1)[counted].mean())
    predicted = 0.5 * float((fisher[2] * noise ** 2).sum()) / int(counted.sum())
    assert measured > 0
    assert 0.6 < predicted / measured < 1.6, (predicted, measured)


@pytest.mark.parametrize("field,value", [("tune", "weights"), ("target", "teacher"), ("weighting", "rms")])
def test_unknown_choices_are_one_line_errors(field, value):
    with pytest.raises(RecoverLoraError, match=rf"--{field}='{value}': choose one of"):
        ReconstructSettings(**{field: value})


def test_a_kept_type_keeps_its_bytes_while_the_others_learn_and_a_bad_name_is_a_one_line_error(synth, tmp_path):
    """--keep-type: llama.cpp's bytes for that type (the grid types, where the held-out gain came from the others)."""
    torch_threads()
    rules = [TensorTypeRule(r"blk\.\d+\.ffn_down\.weight", T.F16), TensorTypeRule(r"blk\.\d+\.ffn_(gate|up)\.weight", T.Q5_0)]
    base = export_unpadded(STORIES_DIR, T.Q4_0, tmp_path / "base.gguf", head_rule=None, extra_rules=rules)
    settings = dataclasses.replace(SETTINGS, head=False, keep_types=("Q5_0",))
    result = reconstruct(base, tmp_path / "rec.gguf", teacher=STORIES_DIR, samples=synth, settings=settings)
    old, new = tensors(base), tensors(result.path)
    kept = {n for n, t in old.items() if t.tensor_type == T.Q5_0}
    assert kept and all(np.array_equal(raw_bytes(new[n]), raw_bytes(old[n])) for n in kept)
    assert kept <= set(result.untouched) and result.rewritten and not set(result.rewritten) & kept
    assert json.loads(result.report_path.read_text())["settings"]["keep_types"] == ["Q5_0"]
    with pytest.raises(RecoverLoraError, match="nothing to reconstruct") as error:
        reconstruct(base, tmp_path / "none.gguf", teacher=STORIES_DIR, samples=synth,
                    settings=dataclasses.replace(settings, keep_types=("Q5_0", "Q4_0")))
    assert "outside --keep-type Q5_0 Q4_0" in str(error.value) and not (tmp_path / "none.gguf").exists()
    assert ReconstructSettings().keep_types == ("IQ3_S", "IQ3_XXS")  # the grids stay llama.cpp's unless asked
    assert (keep_types_setting(None), keep_types_setting(["none"]), keep_types_setting(["Q5_0", "Q4_0"])) == \
        (("IQ3_S", "IQ3_XXS"), (), ("Q5_0", "Q4_0"))
    with pytest.raises(RecoverLoraError, match="--keep-type IQ9_Z: not a ggml type") as error:
        ReconstructSettings(keep_types=("IQ9_Z",))
    assert "\n" not in str(error.value)


def test_heldout_with_every_quantized_tensor_from_the_teacher_is_the_teacher_and_a_wrong_name_is_refused(stories_q4_0):
    """`heldout --teacher-tensor`: what a tensor's quantization costs. All of them swapped back: KL 0, the teacher's ppl."""
    from recover_lora.recovery.heldout import heldout_report
    from recover_lora.recovery.student import read_student_info

    torch_threads()
    quantized = tuple(n for n, t in read_student_info(stories_q4_0).tensor_types.items() if t != T.F32)
    common = dict(teacher_source=STORIES_DIR, text=HELDOUT_TEXT, window=64, max_tokens=512, device="cpu")
    plain = heldout_report(stories_q4_0, **common)["rows"]
    one = heldout_report(stories_q4_0, teacher_tensors=("blk.0.ffn_up.weight",), **common)["rows"]
    every = heldout_report(stories_q4_0, teacher_tensors=quantized, **common)["rows"]
    assert plain[1]["kl_to_teacher"] > 0 and one[1]["kl_to_teacher"] != plain[1]["kl_to_teacher"]
    assert every[1]["kl_to_teacher"] == pytest.approx(0, abs=1e-6)
    assert every[1]["perplexity"] == pytest.approx(every[0]["perplexity"], rel=1e-5)
    with pytest.raises(RecoverLoraError, match=r"--teacher-tensor blk\.9\.ffn_up\.weight: .* has no such tensor"):
        heldout_report(stories_q4_0, teacher_tensors=("blk.9.ffn_up.weight",), **common)


def test_heldout_block_errors_are_each_blocks_own_and_vanish_where_the_teacher_weights_are(stories_q4_0):
    """`heldout --block-errors`: block 0 with the teacher's weights adds no error, every other quantized block does."""
    from recover_lora.recovery.heldout import format_report, heldout_report
    from recover_lora.recovery.student import read_student_info

    torch_threads()
    block0 = tuple(n for n, t in read_student_info(stories_q4_0).tensor_types.items() if n.startswith("blk.0.") and t != T.F32)
    common = dict(teacher_source=STORIES_DIR, text=HELDOUT_TEXT, window=64, max_tokens=512, device="cpu", block_errors=True)
    plain = heldout_report(stories_q4_0, **common)
    fixed = heldout_report(stories_q4_0, teacher_tensors=block0, **common)["block_errors"]
    assert block0 and len(plain["block_errors"]) == len(fixed) == build_teacher(STORIES_DIR)[1].num_layers
    assert all(error > 0 for error in plain["block_errors"]) and all(error > 0 for error in fixed[1:])
    assert fixed[0] == pytest.approx(0, abs=1e-12)
    assert "block output errors of the student" in format_report(plain)
    assert heldout_report(stories_q4_0, **{**common, "block_errors": False})["block_errors"] is None


def test_a_preset_with_an_unknown_reconstruct_weighting_is_refused_when_built():
    from recover_lora.presets import PRESETS

    with pytest.raises(RecoverLoraError, match=r"preset smoke: reconstruct_weighting 'rms' must be one of mse, fisher"):
        dataclasses.replace(PRESETS["smoke"], reconstruct_weighting="rms")
