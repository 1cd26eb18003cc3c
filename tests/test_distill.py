"""Recover-LoRA training on a tiny padded gateup model: start point, progress, resume, NaN, data modes, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import STORIES_DIR, torch_threads
from recover_lora.errors import RecoverLoraError
from recover_lora.recovery.distill import TrainConfig, TrainHooks, batch_rows, lr_factor, train, wrap_with_lora
from recover_lora.recovery.samples import FORMAT_VERSION, write_manifest, write_token_file
from recover_lora.recovery.student import build_student, read_student_info, target_module_names

N_SAMPLES, SEQ_LEN = 16, 16


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from recover_lora.export.quantize import export_model

    path = tmp_path_factory.mktemp("distill") / "stories.gateup.gguf"
    export_model(STORIES_DIR, path, "gateup", threads=2)
    return path


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    """A synthetic set in `recover-lora synth`'s format: random tokens, some rows ending early."""
    folder = tmp_path_factory.mktemp("synth")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (N_SAMPLES, SEQ_LEN), generator=generator)
    ids[:, 0] = 1
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[::3, 10:] = False  # an EOS at position 10 in every third row: nothing after it is trained
    write_token_file(folder / "samples.safetensors", ids, mask)
    write_manifest(folder, {"format_version": FORMAT_VERSION, "counts": {"n_samples": N_SAMPLES, "seq_len": SEQ_LEN},
                            "tokenizer": {"vocab_size": 512}})
    return folder


def config(base, synth_dir, out, **overrides) -> TrainConfig:
    settings = dict(base=base, teacher=str(STORIES_DIR), samples=synth_dir, output=out, batch_size=4, max_steps=4,
                    lr=5e-3, checkpoint_every=2, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def log_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_step_zero_is_exactly_the_quantized_model(base):
    torch = torch_threads()
    student, info = build_student(base)
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = student(input_ids=ids).logits.clone()
    cfg = TrainConfig(base=base, output="unused", samples="unused", rank=4)
    model = wrap_with_lora(student, cfg, target_module_names(info))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * info.config.num_layers and all(not p.any() for p in lora_b)


def test_training_pulls_the_student_towards_the_teacher(base, synth_dir, tmp_path):
    from peft import PeftModel

    from recover_lora.recovery.heldout import measure_heldout
    from recover_lora.recovery.student import build_teacher

    result = train(config(base, synth_dir, tmp_path / "run", max_steps=12, lr=1e-2))
    assert result.steps == 12 and result.adapter_gguf.is_file()
    student, _ = build_student(base)
    model = PeftModel.from_pretrained(student, str(result.adapter_dir))
    teacher, _ = build_teacher(STORIES_DIR)
    windows = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(7))
    rows = {m.model: m for m in measure_heldout(teacher, model, windows, with_adapter=True)}
    assert rows["teacher"].kl_to_teacher == pytest.approx(0.0, abs=1e-6) and rows["teacher"].top1_agreement == 1.0
    assert rows["student + adapter"].kl_to_teacher < 0.8 * rows["student"].kl_to_teacher
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["target_modules"] == result.target_tensors


class Killed(Exception):
    pass


def test_resume_after_a_kill_is_bit_identical(base, synth_dir, tmp_path):
    settings = dict(max_steps=6, dropout=0.1, lr=1e-2)  # dropout: the restored RNG state matters
    train(config(base, synth_dir, tmp_path / "straight", **settings))

    def kill_after_step_3(step: int) -> None:
        if step == 3:
            raise Killed()

    with pytest.raises(Killed):
        train(config(base, synth_dir, tmp_path / "killed", **settings), TrainHooks(after_step=kill_after_step_3))
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)["step"] == 2
    result = train(config(base, synth_dir, tmp_path / "killed", resume=True, **settings))
    assert result.resumed_from == 2
    straight, resumed = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "killed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [r["loss"] for r in log_rows(tmp_path / "straight")] == [r["loss"] for r in log_rows(tmp_path / "killed")]


def test_resume_refuses_changed_settings_and_a_second_start(base, synth_dir, tmp_path):
    train(config(base, synth_dir, tmp_path / "run", max_steps=2))
    with pytest.raises(RecoverLoraError, match="--resume"):
        train(config(base, synth_dir, tmp_path / "run", max_steps=2))
    with pytest.raises(RecoverLoraError, match="lr was 0.005"):
        train(config(base, synth_dir, tmp_path / "run", max_steps=2, lr=1e-3, resume=True))
    # Refused before any work: no teacher top-k cache is built for a run that cannot resume.
    with pytest.raises(RecoverLoraError, match="does not exist; start without --resume"):
        train(config(base, synth_dir, tmp_path / "fresh", resume=True, top_k=8))
    assert not (tmp_path / "fresh" / "teacher_topk.safetensors").exists()


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(base, synth_dir, tmp_path):
    def nan_at_step_4(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step == 3 else loss

    run = tmp_path / "run"
    with pytest.raises(RecoverLoraError, match=r"loss is nan at step 4.*checkpoint \(step 2\)"):
        train(config(base, synth_dir, run, max_steps=6), TrainHooks(loss_hook=nan_at_step_4))
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["adapter"].values())
    assert not (run / "adapter").exists()


def test_topk_cache_with_the_whole_vocabulary_gives_the_full_kl(base, synth_dir, tmp_path):
    full = train(config(base, synth_dir, tmp_path / "full", max_steps=1))
    cached = train(config(base, synth_dir, tmp_path / "cached", max_steps=1, top_k=512))
    assert (tmp_path / "cached" / "teacher_topk.safetensors").is_file()
    assert cached.metrics["kl"] == pytest.approx(full.metrics["kl"], rel=1e-4)
    small = train(config(base, synth_dir, tmp_path / "small", max_steps=1, top_k=8))
    assert 0 < small.metrics["kl"] <= full.metrics["kl"] + 1e-6  # a coarser distribution has less KL


def test_all_linears_and_reverse_kl_train_too(base, synth_dir, tmp_path):
    result = train(config(base, synth_dir, tmp_path / "run", max_steps=2, targets="all", loss="reverse", adapter_dtype="q8_0"))
    assert len(result.target_tensors) == 7 * read_student_info(base).config.num_layers
    assert all(r["kl"] > 0 for r in log_rows(tmp_path / "run"))


def write_labeled(path: Path) -> Path:
    rows = [
        {"prompt": "Once upon a time", "response": " there was a little girl named Lily."},
        {"question": "What did Tom see?", "answer": "Tom saw a big red ball in the park."},
        {"text": "The cat sat on the mat. It was happy."},
        {"prompt": "One day", "response": " a boy went to the park with his mom."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_labeled_rows_train_only_on_the_response(base, tmp_path):
    from recover_lora.recovery.text_data import GGUFTokenizer, labeled_samples

    samples = labeled_samples(write_labeled(tmp_path / "data.jsonl"), base, seq_len=32)
    tokenizer = GGUFTokenizer(base)
    response = tokenizer.encode(" there was a little girl named Lily.", add_bos=False) + [tokenizer.eos_id]
    positions = samples.loss_mask[0].nonzero().squeeze(1)
    # The prediction at position t targets token t + 1: exactly the response and its EOS.
    assert samples.input_ids[0, positions + 1].tolist() == response
    plain = tokenizer.encode("The cat sat on the mat. It was happy.", add_bos=True) + [tokenizer.eos_id]
    assert int(samples.loss_mask[2].sum()) == len(plain) - 1


def test_labeled_data_mode_with_cross_entropy(base, tmp_path):
    data = write_labeled(tmp_path / "data.jsonl")
    result = train(TrainConfig(base=base, teacher=str(STORIES_DIR), data=data, output=tmp_path / "run", batch_size=2,
                               max_steps=2, seq_len=32, ce_weight=0.5, progress=False))
    row = log_rows(tmp_path / "run")[-1]
    assert row["loss"] == pytest.approx(row["kl"] + 0.5 * row["ce"], rel=1e-5)
    assert result.adapter_gguf.is_file()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(data="x.jsonl"), "exactly one training set"),
        (dict(rank=0), "--rank"),
        (dict(dropout=1.0), "--dropout"),
        (dict(device="tpu"), "--device"),
        (dict(loss="sideways"), "loss kind"),
        (dict(adapter_dtype="q4_k"), "--adapter-dtype"),
    ],
)
def test_bad_settings_are_refused_before_loading(tmp_path, overrides, message):
    settings = dict(base=tmp_path / "b.gguf", samples=tmp_path, output=tmp_path / "run") | overrides
    with pytest.raises(RecoverLoraError, match=message):
        TrainConfig(**settings)


def test_schedule_and_data_order():
    factors = [lr_factor(s, 10, 2, 0.1) for s in range(10)]
    assert factors[0] == 0.5 and factors[1] == 1.0 and factors[2] == pytest.approx(1.0)
    assert factors[-1] > 0.1 and lr_factor(10, 10, 2, 0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    epoch = torch.cat([batch_rows(s, 10, 3, seed=0) for s in range(3)])
    assert len(set(epoch.tolist())) == 9  # each sample at most once per epoch
    assert not torch.equal(batch_rows(0, 10, 3, 0), batch_rows(3, 10, 3, 0))  # next epoch, new order
    assert torch.equal(batch_rows(4, 10, 3, 0), batch_rows(4, 10, 3, 0))


def cli(args: list[str]) -> int:
    from recover_lora.cli import main

    try:
        main(args)
    except SystemExit as e:  # typer exits 0 on success; main exits 2 on a RecoverLoraError
        return e.code or 0
    return 0


def test_cli_train_export_check_and_heldout(base, synth_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", "--base", str(base), "--teacher", str(STORIES_DIR), "--samples", str(synth_dir), "-o", str(run),
                "--max-steps", "2", "--batch-size", "4", "--rank", "4", "--no-progress"]) == 0
    assert (run / "adapter.gguf").is_file()
    assert cli(["export-adapter", str(run / "adapter"), "--base", str(base), "-o", str(tmp_path / "a.gguf"), "--dtype", "f32"]) == 0
    assert cli(["check-adapter", str(tmp_path / "a.gguf"), "--base", str(base)]) == 0
    assert "ok: a.gguf fits" in capsys.readouterr().out
    text = tmp_path / "heldout.txt"
    text.write_text("Once upon a time there was a cat.\n\nThe dog ran to the park and played with a ball all day.\n\n" * 20)
    assert cli(["heldout", "--base", str(base), "--adapter", str(run / "adapter"), "--teacher", str(STORIES_DIR),
                "--text", str(text), "--window", "32", "--max-tokens", "256", "--json", str(tmp_path / "h.json")]) == 0
    report = json.loads((tmp_path / "h.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["teacher", "student", "student + adapter"]
    assert cli(["train", "--base", str(tmp_path / "missing.gguf"), "--samples", str(synth_dir), "-o", str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().err


def test_presets_are_valid_training_settings(tmp_path):
    from recover_lora.presets import PRESETS, get_preset

    for preset in PRESETS.values():
        cfg = TrainConfig(base=tmp_path / "b.gguf", samples=tmp_path, output=tmp_path / "run", **preset.train)
        assert cfg.rank == preset.train["rank"] and preset.synth_samples >= cfg.batch_size
    with pytest.raises(RecoverLoraError, match="cpu-demo"):
        get_preset("gpu-demo")


def test_a_preset_recipe_sets_train_config_fields_of_their_types():
    from recover_lora.presets import TrainRecipe

    assert dict(TrainRecipe(rank=4, init="eora")) == {"rank": 4, "init": "eora"}  # unset fields keep TrainConfig's defaults
    with pytest.raises(RecoverLoraError, match=r"rank=16.0 must be int, the type of TrainConfig.rank") as error:
        TrainRecipe(rank=16.0)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{not json\n', r"data.jsonl:2 is not JSON"),
        ('["a", "b"]\n', r"data.jsonl:1 is not a JSON object"),
        ('{"text": "ok"}\n{"input": "x", "output": "y"}\n', r"data.jsonl:2 has keys \['input', 'output'\]"),
        ("\n\n", r"data.jsonl has no rows"),
    ],
)
def test_bad_labeled_rows_are_one_line_errors(tmp_path, content, message):
    from recover_lora.recovery.text_data import read_jsonl_pairs

    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(RecoverLoraError, match=message) as error:
        read_jsonl_pairs(path)
    assert "\n" not in str(error.value)


def test_labeled_row_formats(tmp_path):
    from recover_lora.recovery.text_data import read_jsonl_pairs

    path = tmp_path / "data.jsonl"
    rows = [{"text": "plain"}, {"prompt": "p", "response": "r"}, {"question": "q", "answer": "a", "id": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_jsonl_pairs(path) == [("", "plain"), ("p", "r"), ("q", "a")]
