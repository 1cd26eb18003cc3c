"""`recover-lora pipeline` end to end on stories260K with the `smoke` preset: outputs, report, skip, resume, force."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import STORIES_DIR
from recover_lora.errors import RecoverLoraError
from recover_lora.pipeline import STEPS, Pipeline, PipelineConfig, run_pipeline


def smoke_config(out: Path, **kwargs) -> PipelineConfig:
    return PipelineConfig(out_dir=out, model=str(STORIES_DIR), preset="smoke", device="cpu", threads=2, **kwargs)


COMMANDS = ["recover-lora pipeline tests/fixtures/stories260K --preset smoke -o run"]


def forbid_every_step(monkeypatch) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("an up-to-date step ran again")

    for name in ("export.quantize.export_model", "export.llama_presets.export_llama_preset", "export.type_search.search_types",
                 "export.autoround.autoround_gguf", "recovery.reconstruct.reconstruct", "recovery.kl_tune.kl_tune",
                 "recovery.synth.synthesize", "recovery.imatrix.compute_imatrix",
                 "recovery.distill.train", "recovery.merge.merge_run", "recovery.heldout.heldout_report", "runtime.evaluate.run_eval",
                 "runtime.bench.run_bench"):
        monkeypatch.setattr(f"recover_lora.{name}", must_not_run)


def count_file_reads(monkeypatch, fresh_process: bool = True) -> Counter:
    """Path -> times its bytes were hashed from now on; `fresh_process` forgets the hashes remembered in memory."""
    from recover_lora import fileio

    reads, read = Counter(), fileio.read_sha256

    def counted(path, *args, **kwargs):
        reads[str(path)] += 1
        return read(path, *args, **kwargs)

    monkeypatch.setattr(fileio, "read_sha256", counted)
    if fresh_process:
        monkeypatch.setattr(fileio, "_hash_cache", {})
    return reads


class Interrupted(Exception):
    """Stands in for a kill: raised from inside a step."""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipeline") / "run"
    run_pipeline(smoke_config(out), commands=COMMANDS)
    return out


def manifest(out: Path) -> dict:
    return json.loads((out / "pipeline.json").read_text())


def test_every_step_writes_its_outputs(finished_run):
    for name in ("w4.gguf", "gateup.gguf", "synth/samples.safetensors", "train/adapter.gguf", "heldout.json",
                 "eval/teacher.json", "eval/w4.json", "eval/gateup.json", "eval/gateup+adapter.json",
                 "recovered.gguf", "recover/block_scales.safetensors", "recover/adapter.gguf", "eval/recovered.json", "pareto.png",
                 "bench.jsonl", "host.toml", "roofline.json", "report.md", "report.html", "accuracy.png", "tokens_per_s.png",
                 "baselines/Q4_K_M.gguf", "baselines/IQ4_XS.gguf", "baselines/autoround-q4_k_m-iters0.gguf", "searched.gguf",
                 "search.json", "eval/searched.json", "reconstructed.gguf", "reconstruct.json", "eval/reconstructed.json",
                 "kl-tuned.gguf", "kltune.json", "eval/kl-tuned.json"):
        assert (finished_run / name).is_file(), name
    steps = manifest(finished_run)["steps"]
    assert list(steps) == list(STEPS)
    for record in steps.values():
        assert record["outputs"] and all(len(h) == 64 for h in record["outputs"].values())


def test_report_has_the_tables_read_from_the_step_outputs(finished_run):
    text = (finished_run / "report.md").read_text()
    for heading in ("## Accuracy", "## Closeness to the teacher", "## Speed on this machine", "## Type search",
                    "## Block-wise reconstruction", "## End-to-end KL tuning", "## Which variant to deploy", "## Files", "## How this was made"):
        assert heading in text
    for task in ("arc_easy", "piqa", "sciq"):
        assert task in text
    heldout = json.loads((finished_run / "heldout.json").read_text())
    assert f"{heldout['rows']['gateup']['kl_to_teacher']:.3f}" in text
    bench = [json.loads(line) for line in (finished_run / "bench.jsonl").read_text().splitlines()]
    baselines = {"llama.cpp Q4_K_M", "llama.cpp IQ4_XS", "AutoRound q4_k_m iters 0"}
    assert {r["pipeline_label"] for r in bench} == {"w4", "gateup", "gateup+adapter", "recovered", "searched", "reconstructed",
                                                    "kl-tuned", *baselines}
    # The stock presets and AutoRound's file stand in the held-out table and the Pareto table beside our files.
    assert set(heldout["rows"]) >= {"searched", "reconstructed", "kl-tuned", *baselines}
    # The reconstructed file has the searched file's types and bytes, and the report gives its held-out KL beside.
    assert (finished_run / "reconstructed.gguf").stat().st_size == (finished_run / "searched.gguf").stat().st_size
    assert f"reconstructed **{heldout['rows']['reconstructed']['kl_to_teacher']:.4f}**" in text
    head = json.loads((finished_run / "reconstruct.json").read_text())["head"]  # its last stage, the output head
    assert head is not None and f"{head['kl_before']:.4f} → {head['tuned_kl']:.4f} on 1 held-out" in text
    # So does the kl-tuned file, tuned on top of the reconstructed one.
    assert (finished_run / "kl-tuned.gguf").stat().st_size == (finished_run / "searched.gguf").stat().st_size
    assert f"kl-tuned **{heldout['rows']['kl-tuned']['kl_to_teacher']:.4f}**" in text
    assert re.search(r"\| llama\.cpp IQ4_XS \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| — \| [0-9.]+ \| ", text)
    assert re.search(r"\| AutoRound q4_k_m iters 0 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| — \| [0-9.]+ \| ", text)
    assert "AutoRound's files (`recover-lora autoround`" in text
    search = json.loads((finished_run / "search.json").read_text())
    assert search["file_bytes"] <= search["max_bytes"] == (finished_run / "baselines" / "IQ4_XS.gguf").stat().st_size
    assert f"{search['predicted_kl']:.4f}" in text
    assert f"{heldout['rows']['recovered']['kl_to_teacher']:.3f}" in text
    assert re.search(r"\| recovered \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| ", text)  # the Pareto table
    assert f"{bench[0]['tg_tokens_per_s']['median']:.1f}" in text
    assert "recover-lora pipeline tests/fixtures/stories260K --preset smoke" in text
    assert re.search(r"\| gateup\.gguf \| [0-9.]+ \| [0-9.]+ \|", text)
    html = (finished_run / "report.html").read_text()
    assert "<table>" in html and "accuracy.png" in html


def test_second_run_skips_every_step(finished_run, monkeypatch, capsys):
    before = manifest(finished_run)

    def must_not_run(*args, **kwargs):
        raise AssertionError("an up-to-date step ran again")

    monkeypatch.setattr("recover_lora.export.quantize.export_model", must_not_run)
    monkeypatch.setattr("recover_lora.export.llama_presets.export_llama_preset", must_not_run)
    monkeypatch.setattr("recover_lora.export.type_search.search_types", must_not_run)
    monkeypatch.setattr("recover_lora.export.autoround.autoround_gguf", must_not_run)
    monkeypatch.setattr("recover_lora.recovery.reconstruct.reconstruct", must_not_run)
    monkeypatch.setattr("recover_lora.recovery.kl_tune.kl_tune", must_not_run)
    monkeypatch.setattr("recover_lora.recovery.synth.synthesize", must_not_run)
    monkeypatch.setattr("recover_lora.recovery.imatrix.compute_imatrix", must_not_run)
    monkeypatch.setattr("recover_lora.recovery.distill.train", must_not_run)
    monkeypatch.setattr("recover_lora.runtime.evaluate.run_eval", must_not_run)
    monkeypatch.setattr("recover_lora.runtime.bench.run_bench", must_not_run)
    run_pipeline(smoke_config(finished_run), commands=COMMANDS)
    assert capsys.readouterr().err.count("up to date, skipped") == len(STEPS)
    assert manifest(finished_run)["steps"] == before["steps"]


def test_force_redoes_that_step_only(tmp_path, finished_run, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    before = manifest(out)["steps"]
    capsys.readouterr()
    run_pipeline(smoke_config(out, force=("eval",)), commands=COMMANDS)
    err = capsys.readouterr().err
    assert "[eval] running" in err
    for step in ("synth", "imatrix", "export", "train", "recover", "heldout", "bench"):
        assert f"[{step}] up to date" in err
        assert manifest(out)["steps"][step] == before[step], step


def test_interrupted_run_resumes_at_the_step_it_stopped(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def killed(self):
        raise Interrupted

    with monkeypatch.context() as m:
        m.setattr(Pipeline, "heldout", killed)
        with pytest.raises(Interrupted):
            run_pipeline(smoke_config(out))
    assert set(manifest(out)["steps"]) == {"synth", "imatrix", "export", "baselines", "autoround", "search", "reconstruct", "kltune",
                                           "train", "recover"}

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished step ran again after the interruption")

    ran = []
    monkeypatch.setattr("recover_lora.export.quantize.export_model", must_not_run)
    monkeypatch.setattr("recover_lora.export.llama_presets.export_llama_preset", must_not_run)
    monkeypatch.setattr("recover_lora.export.type_search.search_types", must_not_run)
    monkeypatch.setattr("recover_lora.export.autoround.autoround_gguf", must_not_run)
    monkeypatch.setattr("recover_lora.recovery.reconstruct.reconstruct", must_not_run)
    monkeypatch.setattr("recover_lora.recovery.kl_tune.kl_tune", must_not_run)
    monkeypatch.setattr("recover_lora.recovery.synth.synthesize", must_not_run)
    monkeypatch.setattr("recover_lora.recovery.imatrix.compute_imatrix", must_not_run)
    monkeypatch.setattr("recover_lora.recovery.distill.train", must_not_run)
    monkeypatch.setattr(Pipeline, "eval", lambda self: ran.append("eval") or {})
    monkeypatch.setattr(Pipeline, "bench", lambda self: ran.append("bench") or {})
    monkeypatch.setattr(Pipeline, "report", lambda self, commands: ran.append("report") or {})
    run_pipeline(smoke_config(out))
    assert (out / "heldout.json").is_file() and ran == ["eval", "bench", "report"]


def test_an_edited_output_is_rebuilt_and_the_steps_before_it_are_kept(tmp_path, finished_run, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    original = (out / "heldout.json").read_text()
    (out / "heldout.json").write_text(original.replace('"rows"', '"rows" ', 1))
    capsys.readouterr()
    run_pipeline(smoke_config(out), commands=COMMANDS)
    err = capsys.readouterr().err
    assert "[heldout] running" in err and "[train] up to date" in err
    assert (out / "heldout.json").read_text() == original  # the step is deterministic


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(preset="huge"), "unknown preset 'huge'"),
        (dict(force=("sync",)), "--force 'sync' is not a step"),
        (dict(extra_policies=("w3",)), "unknown policy 'w3'"),
        (dict(model="/no/such/model"), "does not exist"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, kwargs, message):
    settings = dict(out_dir=tmp_path / "run", model=str(STORIES_DIR), preset="smoke") | kwargs
    with pytest.raises(RecoverLoraError, match=re.escape(message)) as error:
        PipelineConfig(**settings)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_out_is_a_file_and_corrupt_manifest_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RecoverLoraError, match="is a file"):
        smoke_config(tmp_path / "file")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "pipeline.json").write_text("{not json")
    with pytest.raises(RecoverLoraError, match="corrupt .*--force all"):
        Pipeline(smoke_config(tmp_path / "run"))


def test_cli_reports_where_the_report_is(finished_run, capsys):
    from recover_lora.cli import main

    with pytest.raises(SystemExit) as exit_info:  # typer exits 0 on success
        main(["pipeline", str(STORIES_DIR), "--preset", "smoke", "--out", str(finished_run), "--device", "cpu", "--threads", "2"])
    assert exit_info.value.code in (0, None)
    assert f"report: {finished_run / 'report.md'}" in capsys.readouterr().out


def test_editing_a_sources_tokenizer_or_config_reruns_export(tmp_path, monkeypatch, capsys):
    from recover_lora.export import quantize

    model = shutil.copytree(STORIES_DIR, tmp_path / "stories260K")
    out = tmp_path / "run"
    out.mkdir()
    (out / "imatrix.gguf").write_bytes(b"stands in for the importance matrix: export only hashes it here")
    (out / "synth").mkdir()
    (out / "synth" / "samples.safetensors").write_bytes(b"stands in for the samples: hashed only, GPTQ is not run here")
    monkeypatch.setattr(Pipeline, "_gptq_codes", lambda self, path: None)
    exported, export = [], quantize.export_model

    def export_without_imatrix(source, path, policy, imatrix=None, **kwargs):
        exported.append(policy)
        return export(source, path, policy, **kwargs)

    monkeypatch.setattr(quantize, "export_model", export_without_imatrix)

    def run_export() -> str:
        capsys.readouterr()
        Pipeline(PipelineConfig(out_dir=out, model=str(model), preset="smoke", device="cpu", threads=2)).export()
        return capsys.readouterr().err

    run_export()
    assert "[export] up to date" in run_export() and exported == ["w4", "gateup"]
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    (model / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1))  # the same tokenizer, other bytes
    assert "[export] running" in run_export() and exported == ["w4", "gateup"] * 2
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 256}, indent=2))
    assert "[export] running" in run_export() and exported == ["w4", "gateup"] * 3
    assert "[export] up to date" in run_export()


def test_a_no_op_resume_reads_every_file_once_and_then_none(tmp_path, finished_run, monkeypatch, capsys):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    an_hour_ago = time.time() - 3600
    for path in out.rglob("*"):  # files at rest, as when a run is resumed on a later day
        os.utime(path, (an_hour_ago, an_hour_ago))
    forbid_every_step(monkeypatch)
    commands = manifest(out)["meta"]["commands"]  # the last run's (the report step depends on them)
    reads = count_file_reads(monkeypatch)  # a new process: nothing remembered in memory
    capsys.readouterr()
    run_pipeline(smoke_config(out), commands=commands)
    assert capsys.readouterr().err.count("up to date, skipped") == len(STEPS)
    ggufs = [path for path in reads if path.endswith(".gguf")]
    # w4, gateup, imatrix, adapter, recovered, searched, reconstructed, kl-tuned and the three baselines: each an input of several steps
    assert len(ggufs) == 11
    assert max(reads.values()) == 1, reads.most_common(3)
    # Another new process: DIR/file_hashes.json remembers every file the run hashed, so none is read.
    reads = count_file_reads(monkeypatch)
    run_pipeline(smoke_config(out), commands=commands)
    assert not reads, reads


def test_file_hashes_are_remembered_by_path_size_and_mtime(tmp_path, monkeypatch):
    from recover_lora import fileio

    reads = count_file_reads(monkeypatch)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"one")
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    assert fileio.sha256_file(path) == fileio.sha256_file(path) == hashlib.sha256(b"one").hexdigest()
    assert reads[str(path)] == 1
    path.write_bytes(b"two")  # a new mtime: read again
    assert fileio.sha256_file(path) == hashlib.sha256(b"two").hexdigest() and reads[str(path)] == 2
    fileio.sha256_file(path)  # modified just now: a same-size rewrite could keep this mtime, so not remembered yet
    assert reads[str(path)] == 3
    os.utime(path, (an_hour_ago, an_hour_ago))  # size and mtime as when it held b"one"; the ctime tells them apart
    assert fileio.sha256_file(path) == hashlib.sha256(b"two").hexdigest() and reads[str(path)] == 4
    fileio.save_hash_cache(tmp_path / "hashes.json", [tmp_path])
    reads = count_file_reads(monkeypatch)
    fileio.load_hash_cache(tmp_path / "hashes.json")
    assert fileio.sha256_file(path) == hashlib.sha256(b"two").hexdigest() and not reads


def test_report_command_redraws_a_finished_run_from_its_files(tmp_path, finished_run, monkeypatch, capsys):
    from recover_lora.cli import main

    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    report = (out / "report.md").read_text()
    before = manifest(out)
    for name in ("report.md", "report.html", "accuracy.png", "tokens_per_s.png"):
        (out / name).unlink()
    forbid_every_step(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(out)])
    assert exit_info.value.code in (0, None)
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    assert (out / "report.md").read_text() == report
    assert all((out / name).is_file() for name in ("report.html", "accuracy.png", "tokens_per_s.png"))
    assert manifest(out) == before
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2 and "holds no pipeline.json" in capsys.readouterr().err


def test_a_model_autoround_cannot_write_gets_no_autoround_baseline_and_the_run_goes_on(tmp_path, finished_run, monkeypatch, capsys):
    # As for Qwen2 / Gemma 3 with AutoRound 0.16.1 and PyPI's gguf 0.19.0 (export/autoround.py unsupported_reason).
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    monkeypatch.setattr("recover_lora.export.autoround.unsupported_reason", lambda architecture: f"cannot write {architecture}")
    capsys.readouterr()
    run_pipeline(smoke_config(out), commands=COMMANDS)
    err = capsys.readouterr().err
    assert "[autoround] cannot write LlamaForCausalLM: no AutoRound baseline" in err and "[synth] up to date" in err
    assert manifest(out)["steps"]["autoround"]["outputs"] == {}
    assert "AutoRound q4_k_m iters 0" not in json.loads((out / "heldout.json").read_text())["rows"]
    assert "No AutoRound file: cannot write LlamaForCausalLM." in (out / "report.md").read_text()


def test_a_padded_searched_file_is_passed_on_unchanged_by_reconstruct_and_kltune(tmp_path, stories_gateup, monkeypatch):
    """Both tuners need the model's own widths: a padded winner of the search goes on as it is, and the step says why."""
    from test_imatrix import synth_folder

    out = tmp_path / "run"
    out.mkdir()
    shutil.copyfile(stories_gateup, out / "searched.gguf")
    synth_folder(out / "synth", n=8, seq_len=32)
    monkeypatch.setattr("recover_lora.recovery.reconstruct.reconstruct", lambda *a, **k: pytest.fail("tuned a padded file"))
    monkeypatch.setattr("recover_lora.recovery.kl_tune.kl_tune", lambda *a, **k: pytest.fail("tuned a padded file"))
    pipeline = Pipeline(smoke_config(out))
    for step, output in (("reconstruct", "reconstructed.gguf"), ("kltune", "kl-tuned.gguf")):
        summary = getattr(pipeline, step)()
        assert summary["refused"] == f"the search chose padded widths, which {'reconstruction' if step == 'reconstruct' else 'kl-tune'} does not tune"
        assert (out / output).read_bytes() == stories_gateup.read_bytes()
        assert json.loads((out / f"{step}.json").read_text()) == {"refused": summary["refused"]}
