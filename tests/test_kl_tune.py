"""End-to-end KL tuning of a GGUF's codes (recovery/kl_tune.py): exact bytes, llama.cpp's logits, a lower held-out KL.

stories260K exported at its own widths (block linears Q4_0 / Q4_K-free block-32 types, ffn_down F16, the token
embedding Q8_0) and tuned on 12 synthetic windows, 4 held out. The oracles: gguf-py's dequantization of the written
bytes (the torch student built from the file), llama.cpp's logits of the written file, and the held-out KL recomputed
here from the files with plain forward passes, independently of the module's tuner.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import STORIES_DIR, llama_cpp_logits, make_tiny_hf_model, sample_tokens, torch_logits, torch_threads
from recover_lora.errors import RecoverLoraError
from recover_lora.recovery import kl_tune as kl_tune_module
from recover_lora.recovery.activations import counted_positions
from recover_lora.recovery.kl_tune import KLTuneSettings, kl_tune
from recover_lora.recovery.samples import load_samples
from recover_lora.recovery.student import build_student, build_teacher
from test_imatrix import synth_folder
from test_reconstruct import export_unpadded, raw_bytes, tensors

T = gguf.GGMLQuantizationType
SETTINGS = KLTuneSettings(epochs=3, held_out=4, batch_size=4)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return synth_folder(tmp_path_factory.mktemp("kl-tune-synth") / "synth", n=16, seq_len=32)


@pytest.fixture(scope="module")
def stories_q4_0(tmp_path_factory) -> Path:
    torch_threads()
    return export_unpadded(STORIES_DIR, T.Q4_0, tmp_path_factory.mktemp("kl-tune-base") / "base.gguf")


def held_out_kl(path: Path, synth: Path, held_out: int, teacher: Path = STORIES_DIR) -> float:
    """KL from the teacher to the file's torch student over the counted positions of the last `held_out` windows."""
    samples = load_samples(synth)
    ids, counted = samples.input_ids, counted_positions(samples.loss_mask)
    keep = counted.any(dim=1)
    ids, counted = ids[keep][-held_out:], counted[keep][-held_out:]
    teacher, student = build_teacher(teacher)[0], build_student(path)[0]
    with torch.no_grad():
        p = F.log_softmax(teacher(ids, use_cache=False).logits.float(), dim=-1)
        q = F.log_softmax(student(ids, use_cache=False).logits.float(), dim=-1)
    per_position = (p.exp() * (p - q)).sum(dim=-1)
    return float(per_position[counted].mean())


def test_tuned_gguf_is_exact_runs_in_llama_cpp_and_lowers_the_held_out_kl(stories_q4_0, synth, tmp_path):
    torch_threads()
    result = kl_tune(stories_q4_0, tmp_path / "tuned.gguf", teacher=STORIES_DIR, samples=synth, settings=SETTINGS)

    # Same header and tensors; every tensor of a block format learned, the tied embedding (output head) included.
    old, new = tensors(stories_q4_0), tensors(result.path)
    assert result.path.stat().st_size == stories_q4_0.stat().st_size and new.keys() == old.keys()
    header = min(int(t.data_offset) for t in old.values())
    assert result.path.read_bytes()[:header] == stories_q4_0.read_bytes()[:header]
    assert result.kept and result.tensors["token_embd.weight"] == "Q8_0"
    assert result.untouched == {f"blk.{i}.ffn_down.weight": "F16" for i in range(5)}
    changed = {name for name, t in old.items() if not np.array_equal(raw_bytes(new[name]), raw_bytes(t))}
    assert "token_embd.weight" in changed and changed <= set(result.tensors)
    for name, tensor in old.items():
        assert new[name].tensor_type == tensor.tensor_type

    # The report's held-out KL before and after are the files' own, recomputed here; after is lower.
    before, after = held_out_kl(stories_q4_0, synth, SETTINGS.held_out), held_out_kl(result.path, synth, SETTINGS.held_out)
    assert result.held_out_kl_before == pytest.approx(before, rel=1e-4)
    assert result.held_out_kl_after == pytest.approx(after, rel=1e-4)
    assert after < 0.8 * before, (before, after)
    assert min(s.held_out_kl for s in result.snapshots) == pytest.approx(after, rel=1e-6)

    # llama.cpp computes the model torch trained against.
    student, _ = build_student(result.path)
    ids = sample_tokens(32, seed=5)
    ours, theirs = torch_logits(student, ids), llama_cpp_logits(result.path, ids, f32_kv_cache=True)
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 5e-2
    report = json.loads(result.report_path.read_text())
    assert report["settings"]["lr"] == SETTINGS.lr and report["kept"] and not (tmp_path / "tuned.gguf.kltune").exists()


# Shaped as real checkpoints are: Qwen2 (q/k/v biases, GQA, an untied output head), Gemma 3 (tied embedding scaled by
# sqrt(hidden), 4:1 heads of 256, sliding windows), Phi-3 (fused qkv and gate|up). K-quant blocks (hidden 256); the
# IQ4_XS codebook on one of them, the IQ3_S and IQ3_XXS grids (a grid point per 4 weights) on Qwen2 and Gemma 3.
ARCH_CASES = [("qwen2", T.Q4_K), ("gemma3", T.Q4_K), ("phi3", T.IQ4_XS), ("qwen2", T.IQ3_S), ("gemma3", T.IQ3_XXS)]


@pytest.mark.parametrize("arch,ggml_type", ARCH_CASES, ids=[f"{a}-{t.name}" for a, t in ARCH_CASES])
def test_every_architecture_writes_what_it_trained_and_llama_cpp_computes_it(arch, ggml_type, synth, tmp_path):
    """The held-out KL the tuner measured on its trained weights is the written file's own, recomputed from gguf-py's
    dequantization (so every tensor, permuted q/k rows and fused ones included, is written where it was trained),
    and llama.cpp's logits of that file are torch's."""
    torch_threads()
    # Not a folder named "phi3": general.name is the folder's, and llama.cpp gives a model of that name Phi-3's token
    # attributes, looking up "<|endoftext|>", which the stories260K vocabulary lacks.
    source = make_tiny_hf_model(tmp_path / "model", arch, seed=2)
    base = export_unpadded(source, ggml_type, tmp_path / "base.gguf")
    result = kl_tune(base, tmp_path / "tuned.gguf", teacher=source, samples=synth, settings=SETTINGS)
    assert result.kept and ggml_type.name in result.tensors.values() and not result.untouched
    changed = {n for n, t in tensors(base).items() if not np.array_equal(raw_bytes(tensors(result.path)[n]), raw_bytes(t))}
    assert changed and changed <= set(result.tensors)
    assert result.held_out_kl_after == pytest.approx(held_out_kl(result.path, synth, SETTINGS.held_out, teacher=source), rel=1e-4)
    assert result.held_out_kl_after < result.held_out_kl_before
    student, _ = build_student(result.path)
    ids = sample_tokens(32, seed=5)
    ours, theirs = torch_logits(student, ids), llama_cpp_logits(result.path, ids, f32_kv_cache=True)
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 5e-2


class Interrupted(Exception):
    pass


def test_groups_tune_one_after_another_write_what_they_trained_and_resume_across_a_group(stories_q4_0, synth, tmp_path, monkeypatch):
    """Three groups of consecutive tensors, each tuned with the others held at their bytes: together every tensor, the
    written file's KL is the tuner's, and a run killed at the boundary of two groups or inside one resumes to its bytes."""
    torch_threads()
    settings = dataclasses.replace(SETTINGS, groups=3, epochs=1)
    run = lambda out: kl_tune(stories_q4_0, out, teacher=STORIES_DIR, samples=synth, settings=settings)
    result = run(tmp_path / "a.gguf")
    assert len(result.groups) == 3 and [n for g in result.groups for n in g.tensors] == list(result.tensors)
    assert all(g.weights > 0 for g in result.groups) and result.groups[0].held_out_kl_before == result.held_out_kl_before
    for earlier, later in zip(result.groups, result.groups[1:]):  # each group starts from the model the one before left
        assert later.held_out_kl_before == earlier.held_out_kl_after
    assert result.held_out_kl_after == result.groups[-1].held_out_kl_after < result.held_out_kl_before
    assert result.held_out_kl_after == pytest.approx(held_out_kl(result.path, synth, settings.held_out), rel=1e-4)
    assert {s.group for s in result.snapshots} == {0, 1, 2} and result.steps == 3 * 3
    old, new = tensors(stories_q4_0), tensors(result.path)
    kept = {n for g in result.groups if g.kept for n in g.tensors}
    for name, tensor in old.items():
        assert (not np.array_equal(raw_bytes(new[name]), raw_bytes(tensor))) <= (name in kept), name
    first = result.path.read_bytes()

    real, saves = kl_tune_module._save_state, []
    for stop_at in (4, 5):  # 3 steps per group, a save at each and one at the boundary: 4 is group 1's start, 5 inside it
        out = tmp_path / f"b{stop_at}.gguf"

        def stop(*args, **kwargs):
            real(*args, **kwargs)
            saves.append(1)
            if len(saves) == stop_at:
                raise Interrupted

        saves.clear()
        with monkeypatch.context() as patch:
            patch.setattr(kl_tune_module, "_save_state", stop)
            with pytest.raises(Interrupted):
                run(out)
        resumed = run(out)
        assert resumed.resumed_at == 3 + (stop_at - 4) and out.read_bytes() == first
        assert resumed.groups == result.groups

    # The pipeline report says how the tensors were tuned, from the step's JSON.
    from recover_lora.report import kltune_section

    rows = {"reconstructed": {"kl_to_teacher": 0.05}, "kl-tuned": {"kl_to_teacher": 0.04}}
    text = "\n".join(kltune_section(json.loads(result.report_path.read_text()), rows))
    kept_groups = sum(g.kept for g in result.groups)
    assert f"in 3 groups, one after another; {kept_groups} of them beat the model before them" in text


def test_same_settings_same_bytes_and_an_interrupted_run_resumes_to_them(stories_q4_0, synth, tmp_path, monkeypatch):
    torch_threads()
    run = lambda out, **kw: kl_tune(stories_q4_0, out, teacher=STORIES_DIR, samples=synth, **{"settings": SETTINGS, **kw})
    first = run(tmp_path / "a.gguf").path.read_bytes()

    out = tmp_path / "b.gguf"
    real, saved = kl_tune_module._save_state, []

    def stop_after_two(*args, **kwargs):
        real(*args, **kwargs)
        saved.append(1)
        if len(saved) == 2:
            raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(kl_tune_module, "_save_state", stop_after_two)
        with pytest.raises(Interrupted):
            run(out)
    work = tmp_path / "b.gguf.kltune"
    assert sorted(p.name for p in work.iterdir()) == ["settings.json", "state.safetensors"]
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))  # nothing half-written
    resumed = run(out)
    assert resumed.resumed_at > 0 and out.read_bytes() == first and not work.exists()


def test_a_checkpoint_of_other_settings_is_refused_before_loading_models_or_discarded_with_force(stories_q4_0, synth, tmp_path, monkeypatch):
    out = tmp_path / "c.gguf"
    run = lambda **kw: kl_tune(stories_q4_0, out, teacher=STORIES_DIR, samples=synth, **{"settings": SETTINGS, **kw})
    real = kl_tune_module._save_state

    def stop(*args, **kwargs):
        real(*args, **kwargs)
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(kl_tune_module, "_save_state", stop)
        with pytest.raises(Interrupted):
            run()
    with monkeypatch.context() as patch:
        patch.setattr("recover_lora.recovery.student.build_teacher", lambda *a, **k: pytest.fail("loaded a model before refusing"))
        with pytest.raises(RecoverLoraError, match=r"c\.gguf\.kltune is the checkpoint of another run \(epochs was 3 there, 2 now\); .*--force"):
            run(settings=dataclasses.replace(SETTINGS, epochs=2))
        with pytest.raises(RecoverLoraError, match=r"\(calibration\.windows was 16 there, 12 now\)"):
            run(max_samples=12)
    result = run(settings=dataclasses.replace(SETTINGS, epochs=1), force=True)
    assert result.resumed_at == 0 and out.is_file()


def test_bad_inputs_are_one_line_errors_that_leave_nothing(stories_gateup, stories_q4_0, synth, tmp_path):
    run = lambda base, **kw: kl_tune(base, tmp_path / "x.gguf", teacher=STORIES_DIR, samples=synth, **kw)
    with pytest.raises(RecoverLoraError, match=r"padded widths .* export it with --pad none"):
        run(stories_gateup)
    with pytest.raises(RecoverLoraError, match=r"16 calibration windows .* leave none to train on beside --held-out 16"):
        run(stories_q4_0, settings=KLTuneSettings(held_out=16))
    with pytest.raises(RecoverLoraError, match="does not exist"):
        run(tmp_path / "missing.gguf")
    for field, value, message in (("epochs", 0, "--epochs=0 must be a positive integer"), ("lr", 0.0, r"--lr=0.0 must be within \(0, 0.5\]"),
                                  ("tune", "scales", "--tune='scales': choose one of codes, both"),
                                  ("held_out", -1, "--held-out=-1 must be a positive integer")):
        with pytest.raises(RecoverLoraError, match=message):
            KLTuneSettings(**{field: value})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_tunes_and_refuses_to_overwrite(stories_q4_0, synth, tmp_path):
    from typer.testing import CliRunner

    from recover_lora.cli import app

    out = tmp_path / "tuned.gguf"
    args = ["kl-tune", str(stories_q4_0), "-o", str(out), "--teacher", str(STORIES_DIR), "--samples", str(synth),
            "--epochs", "1", "--held-out", "4", "--batch-size", "4", "--tune", "both", "--json", str(tmp_path / "report.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "held-out KL" in result.stdout and "5 left as they are" in result.stdout and out.is_file()
    assert json.loads((tmp_path / "report.json").read_text())["settings"]["tune"] == "both"
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, RecoverLoraError) and "--force" in str(again.exception)
