"""`recover-lora pipeline` end to end on stories260K with the `smoke` preset: outputs, report, skip, resume, force."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import STORIES_DIR
from recover_lora.errors import RecoverLoraError
from recover_lora.pipeline import STEPS, Pipeline, PipelineConfig, run_pipeline


def smoke_config(out: Path, **kwargs) -> PipelineConfig:
    return PipelineConfig(out_dir=out, model=str(STORIES_DIR), preset="smoke", device="cpu", threads=2, **kwargs)


COMMANDS = ["recover-lora pipeline tests/fixtures/stories260K --preset smoke -o run"]


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
                 "bench.jsonl", "host.toml", "roofline.json", "report.md", "report.html", "accuracy.png", "tokens_per_s.png"):
        assert (finished_run / name).is_file(), name
    steps = manifest(finished_run)["steps"]
    assert list(steps) == list(STEPS)
    for record in steps.values():
        assert record["outputs"] and all(len(h) == 64 for h in record["outputs"].values())


def test_report_has_the_tables_read_from_the_step_outputs(finished_run):
    text = (finished_run / "report.md").read_text()
    for heading in ("## Accuracy", "## Closeness to the teacher", "## Speed on this machine", "## Files", "## How this was made"):
        assert heading in text
    for task in ("arc_easy", "piqa", "sciq"):
        assert task in text
    heldout = json.loads((finished_run / "heldout.json").read_text())
    assert f"{heldout['rows']['gateup']['kl_to_teacher']:.3f}" in text
    bench = [json.loads(line) for line in (finished_run / "bench.jsonl").read_text().splitlines()]
    assert {r["pipeline_label"] for r in bench} == {"w4", "gateup", "gateup+adapter"}
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
    monkeypatch.setattr("recover_lora.recovery.synth_cli.synthesize", must_not_run)
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
    for step in ("synth", "imatrix", "export", "train", "heldout", "bench"):
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
    assert set(manifest(out)["steps"]) == {"synth", "imatrix", "export", "train"}

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished step ran again after the interruption")

    ran = []
    monkeypatch.setattr("recover_lora.export.quantize.export_model", must_not_run)
    monkeypatch.setattr("recover_lora.recovery.synth_cli.synthesize", must_not_run)
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
