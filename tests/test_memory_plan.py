"""The memory plan (devices/memory_plan.py, memory_check.py): its arithmetic on a tiny shape by hand, the
refusals, and `plan` / `train` / `pipeline` refusing before anything loads."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import STORIES_DIR
from recover_lora.cli import main
from recover_lora.devices import memory_check
from recover_lora.devices.memory_check import checked_plan
from recover_lora.devices.memory_plan import (
    ADAMW_BYTES_PER_PARAM,
    GiB,
    MiB,
    STUDENT_LOGIT_FP32_COPIES,
    TEACHER_LOGIT_FP32_COPIES,
    Available,
    PlanSettings,
    StepMemory,
    TrainPlan,
    plan_memory,
    plan_settings,
    train_phases,
)
from recover_lora.devices.memory_sizes import model_sizes, n_params
from recover_lora.devices.shapes import load_model_shape
from recover_lora.errors import RecoverLoraError

# A tiny Llama whose K-quant rows need no padding: every term below is counted by hand from these numbers.
VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 512, 256, 512, 2, 4, 2, 64
BATCH, SEQ, SAMPLES, RANK = 2, 32, 8, 4


@pytest.fixture
def tiny(tmp_path):
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 256, "tie_word_embeddings": True}
    path = tmp_path / "tiny" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(config))
    return model_sizes(load_model_shape(path))


def train_settings(**changes) -> TrainPlan:
    return replace(TrainPlan(batch_size=BATCH, seq_len=SEQ, n_samples=SAMPLES, rank=RANK, init="zero"), **changes)


def train_step(sizes, gpus: int = 0, **changes):
    """The training steps' own phase: (host parts, GPU parts)."""
    phases, _, _ = train_phases(sizes, train_settings(**changes), gpus)
    host, gpu = phases["steps"]
    return StepMemory("train", {k: v for k, v in host.items() if v}, {k: v for k, v in gpu.items() if v}, 0)


def test_parameters_by_hand(tiny):
    layer = 2 * HIDDEN + HEADS * HEAD_DIM * HIDDEN * 2 + KV_HEADS * HEAD_DIM * HIDDEN * 2 + 3 * INTER * HIDDEN
    assert n_params(tiny.teacher) == VOCAB * HIDDEN + HIDDEN + LAYERS * layer == 1_312_000
    assert n_params(tiny.student) == n_params(tiny.teacher)  # 256-wide rows: the gateup export pads nothing


def test_train_terms_by_hand(tiny):
    step = train_step(tiny)  # the CPU: fp32 weights and activations, everything in host RAM
    tokens = BATCH * SEQ
    assert step.gpu == {}
    assert step.host["student fp32"] == n_params(tiny.student) * 4
    assert step.host["teacher fp32"] == n_params(tiny.teacher) * 4
    lora = RANK * (INTER + HIDDEN) * 2 * LAYERS  # gate and up: the Q2_K ("low-bit") linears of the gateup export
    assert step.host["LoRA + AdamW"] == lora * ADAMW_BYTES_PER_PARAM == lora * 16
    assert step.host["student logits"] == tokens * VOCAB * (2 * 4 + 4 * STUDENT_LOGIT_FP32_COPIES)
    assert step.host["teacher logits"] == tokens * VOCAB * (2 * 4 + 4 * TEACHER_LOGIT_FP32_COPIES)


def test_the_peak_phase_is_the_steps_step(tiny):
    settings = PlanSettings(preset="test", train=train_settings(), recover=train_settings(), synth_samples=SAMPLES,
                            synth_seq_len=SEQ, synth_batch_size=SAMPLES, imatrix_samples=SAMPLES, steps=("train",))
    (step,) = plan_memory(tiny, settings, Available(gpus=0)).steps
    assert step.host == train_step(tiny).host and step.host_bytes == sum(step.host.values())
    assert step.note.startswith("peak while steps")


def test_bf16_halves_the_weights(tiny):
    fp32, bf16 = train_step(tiny), train_step(tiny, dtype="bfloat16")
    assert bf16.host["student bf16"] * 2 == fp32.host["student fp32"]
    assert bf16.host["teacher bf16"] * 2 == fp32.host["teacher fp32"]


def test_each_setting_lowers_its_own_terms(tiny):
    base = train_step(tiny)
    chunked = train_step(tiny, loss_chunk=16)
    assert chunked.host["student logits (chunks of 16)"] * (BATCH * SEQ // 16) == base.host["student logits"]
    assert chunked.host["teacher logits"] * (BATCH * SEQ // 16) == base.host["teacher logits"]
    assert chunked.host["activations"] == base.host["activations"]

    topk = train_step(tiny, top_k=8)  # the teacher and its logits leave training; the cache takes their place
    assert "teacher logits" not in topk.host and "teacher fp32" not in topk.host
    assert topk.host["top-k cache"] == SAMPLES * SEQ * 8 * 8  # fp32 log-prob + int32 id per entry
    assert topk.host["student logits"] < base.host["student logits"]

    checkpointed = train_step(tiny, gradient_checkpointing=True)
    assert checkpointed.host["activations (checkpointed)"] < base.host["activations"]
    assert checkpointed.host["student logits"] == base.host["student logits"]

    one, two = train_step(tiny, gpus=1), train_step(tiny, gpus=2)
    embedding = VOCAB * HIDDEN * 2  # bf16 on a GPU, whole on every GPU (recovery/distributed.py)
    assert one.gpu["student bf16"] == n_params(tiny.student) * 2
    assert two.gpu["student bf16 (layers /2)"] == embedding + (n_params(tiny.student) * 2 - embedding) // 2
    assert two.gpu["activations"] * 2 == one.gpu["activations"]  # the global batch split over the GPUs
    assert two.gpu["teacher bf16"] == one.gpu["teacher bf16"]  # a replica per process


def test_refusal_names_step_need_and_setting():
    sizes = model_sizes(load_model_shape("qwen3-4b"))
    plan = checked_plan(sizes, plan_settings("paper", policies=("w4", "gateup")), Available(gpus=1, gpu_bytes=24 * GiB))
    assert not plan.fits
    train = next(p for p in plan.problems if p.startswith("train "))
    assert "GiB of GPU memory for qwen3-4b" in train and "but 24.0 GiB is available (as given by --gpu-memory)" in train
    assert "--top-k" in train and "\n" not in train
    with pytest.raises(RecoverLoraError, match=r"^synth|^imatrix|^search|^kltune|^train|^recover|^heldout"):
        plan.check()
    roomy = checked_plan(sizes, plan_settings("paper", {"top_k": 64, "loss_chunk": 1024, "gradient_checkpointing": True}),
                         Available(gpus=1, gpu_bytes=140 * GiB))
    assert roomy.fits, roomy.problems


def test_a_refusal_says_whose_numbers_it_used(tmp_path):
    from recover_lora.devices.memory_check import available_memory

    sizes = model_sizes(load_model_shape("qwen3-4b"))
    settings = plan_settings("paper", policies=("w4", "gateup"))
    # This machine's RAM (GPU and disk given): the refusal says so and names the flag that plans another machine.
    here = available_memory(tmp_path, gpus=1, gpu_gib=80, disk_gib=1000)
    assert here.measured == ("host",)
    tight = checked_plan(sizes, settings, replace(here, host_bytes=GiB))
    host_lines = [p for p in tight.problems if "of host RAM" in p]
    assert host_lines and all("(this machine's; --host-memory GB plans another)" in p for p in host_lines)
    # Every number given: no word of this machine.
    given = available_memory(tmp_path, gpus=1, gpu_gib=80, host_gib=1, disk_gib=1000)
    assert given.measured == ()
    assert all("this machine" not in p for p in checked_plan(sizes, settings, given).problems)


def refuse_everything(monkeypatch):
    """A machine with 1 MiB of everything, and every step's entry point forbidden."""
    tiny = Available(host_bytes=MiB, disk_bytes=MiB, gpus=0)
    monkeypatch.setattr(memory_check, "available_memory", lambda *args, **kwargs: tiny)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a step started although the plan does not fit")

    for name in ("recovery.distill.train", "recovery.synth.synthesize", "export.quantize.export_model",
                 "recovery.student.build_student", "recovery.student.build_teacher"):
        monkeypatch.setattr(f"recover_lora.{name}", must_not_run)


def test_train_refuses_before_loading(tmp_path, monkeypatch, capsys):
    from recover_lora.export.gguf_io import write_gguf
    from recover_lora.export.sources import load_model

    base = tmp_path / "stories.f32.gguf"
    write_gguf(load_model(STORIES_DIR), base)
    samples = tmp_path / "synth"
    samples.mkdir()
    (samples / "manifest.json").write_text(json.dumps({"counts": {"n_samples": 8, "seq_len": 32}}))
    refuse_everything(monkeypatch)
    args = ["train", "--base", str(base), "--teacher", str(STORIES_DIR), "--samples", str(samples), "--out", str(tmp_path / "run"),
            "--targets", "ffn_gate,ffn_up", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: train needs") and "of host RAM" in error and "but 0.0 GiB is available" in error
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_pipeline_refuses_before_any_step(tmp_path, monkeypatch):
    from recover_lora.pipeline import PipelineConfig, run_pipeline

    refuse_everything(monkeypatch)
    out = tmp_path / "run"
    config = PipelineConfig(out_dir=out, model=str(STORIES_DIR), preset="smoke", device="cpu")
    with pytest.raises(RecoverLoraError, match=r"^synth needs .* of host RAM for stories260K .* but 0\.0 GiB is available \(as given by --host-memory\): "):
        run_pipeline(config)
    assert not out.exists()  # not even the run folder: nothing started
    with pytest.raises(AssertionError, match="a step started"):  # --no-plan-check goes straight to the steps
        run_pipeline(replace(config, plan_check=False))


def test_plan_command_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["plan", "qwen3-4b", "--preset", "paper", "--gpus", "1", "--gpu-memory", "141", "--host-memory", "512",
            "--disk", "1000", "--top-k", "64", "--loss-chunk", "1024", "--gradient-checkpointing", "--json", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "qwen3-4b: qwen3, 36 layers" in printed and "\nfits\n" in printed
    rows = [line.split()[0] for line in printed.splitlines()[4:18]]
    assert rows == ["synth", "imatrix", "export", "baselines", "autoround", "search", "reconstruct", "kltune", "train", "recover",
                    "heldout", "eval", "bench", "report"]
    plan = json.loads(out.read_text())
    assert plan["fits"] and plan["gpus"] == 1 and [s["step"] for s in plan["steps"]] == rows
    train = next(s for s in plan["steps"] if s["step"] == "train")
    assert train["gpu_bytes"] == sum(train["gpu_parts"].values()) > 8 * GiB


def test_plan_command_refusal_exits_non_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "qwen3-4b", "--preset", "paper", "--gpus", "1", "--gpu-memory", "24", "--host-memory", "512", "--disk", "1000"])
    assert exit_info.value.code == 1
    assert "does not fit: train needs" in capsys.readouterr().out


def test_unknown_shape_lists_the_bundled_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "qwen9-1t"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "unknown model 'qwen9-1t'" in error and "qwen3-4b" in error and "mistral-small-22b" in error


def test_gptq_codes_add_the_teachers_and_the_gram_matrices_to_export(tiny):
    settings = plan_settings("smoke", steps=("export",))
    without = plan_memory(tiny, replace(settings, gptq_codes=False), Available()).steps[0].host
    with_gptq = plan_memory(tiny, replace(settings, gptq_codes=True), Available()).steps[0].host
    # gate and up of every layer are Q2_K under gateup and read one tensor: one HIDDEN x HIDDEN float64 Gram matrix
    assert with_gptq["Gram matrices (float64)"] == LAYERS * HIDDEN**2 * 8
    assert with_gptq["teacher fp32"] == n_params(tiny.student) * 4 and "teacher fp32" not in without


def test_search_plans_the_fisher_in_groups_when_all_gradients_do_not_fit(tiny):
    settings = plan_settings("smoke", steps=("search",))
    weights = n_params(tiny.teacher) - HIDDEN - LAYERS * 2 * HIDDEN  # the 2-D ones: all but the norms
    one = plan_memory(tiny, settings, Available()).steps[0]  # nothing known to fit: every weight in one group
    assert one.host["teacher fp32"] == n_params(tiny.teacher) * 4
    assert one.host["Fisher diagonal (numpy)"] == one.host["gradients fp32"] == weights * 4  # the sums are the result
    assert one.note == ""
    assert plan_memory(tiny, settings, Available(host_bytes=one.host_bytes)).steps[0] == one  # they just fit
    # Room for half the gradients: the Fisher runs in groups, and the plan needs only the largest group's gradients.
    tight = one.host_bytes - weights * 4 // 2
    grouped = plan_memory(tiny, settings, Available(host_bytes=tight)).steps[0]
    (label,) = [k for k in grouped.host if k.startswith("gradients fp32 (the largest of ")]
    assert "gradients fp32" not in grouped.host and int(label.split()[-2]) >= 2
    assert weights * 4 // 3 <= grouped.host[label] <= weights * 4 // 2
    assert grouped.host_bytes == one.host_bytes - weights * 4 + grouped.host[label] <= tight
    assert grouped.note.startswith(f"the Fisher in {label.split()[-2]} passes")
    assert checked_plan(tiny, settings, Available(host_bytes=tight)).fits
    # Not even the largest weight's gradient fits: refused.
    assert not checked_plan(tiny, settings, Available(host_bytes=one.host_bytes - weights * 4)).fits


def test_eora_covariances_count_one_gram_matrix_per_layer_input(tiny):
    """gate and up read one tensor, so eora's init holds one HIDDEN x HIDDEN float64 XᵀX per layer for them."""
    phases, _, _ = train_phases(tiny, train_settings(init="eora", targets="low-bit"), 0)
    host, _ = phases["LoRA init"]
    assert host["covariances"] == LAYERS * HIDDEN**2 * 8
    phases, _, _ = train_phases(tiny, train_settings(init="eora", targets="all"), 0)
    # ... and q, k, v one more per layer; o and down read their own (HEADS * HEAD_DIM and INTER wide).
    assert phases["LoRA init"][0]["covariances"] == LAYERS * (2 * HIDDEN**2 + (HEADS * HEAD_DIM) ** 2 + INTER**2) * 8


def test_heldout_on_a_gpu_holds_one_model_at_a_time_on_the_host(tiny):
    """recovery/heldout.py moves the teacher to the GPU before it builds the student: the host never holds both."""
    settings = plan_settings("smoke", steps=("heldout",))
    step = plan_memory(tiny, settings, Available(gpus=1)).steps[0]
    assert step.host["one model staged fp32"] == max(n_params(tiny.student), n_params(tiny.teacher)) * 4
    assert "student fp32" not in step.host and "teacher fp32" not in step.host
    assert step.gpu["student fp32"] == n_params(tiny.student) * 4 and step.gpu["teacher fp32"] == n_params(tiny.teacher) * 4


def test_kltune_is_planned_with_both_models_and_every_weights_tuning_state_or_skipped_by_the_preset(tiny):
    from recover_lora.devices.memory_plan import KLTUNE_BYTES_PER_WEIGHT

    settings = plan_settings("smoke", steps=("kltune",))
    step = plan_memory(tiny, settings, Available()).steps[0]
    assert step.host["weights being tuned"] == n_params(tiny.student) * KLTUNE_BYTES_PER_WEIGHT
    assert step.host["student fp32"] == n_params(tiny.student) * 4 and step.host["teacher fp32"] == n_params(tiny.teacher) * 4
    skipped = plan_memory(tiny, replace(settings, kltune=False), Available()).steps[0]
    assert "weights being tuned" not in skipped.host and skipped.note == "skipped by the preset"
    # In groups, one group's state at a time: a share of the weights and at most one more tensor (the largest).
    grouped = plan_memory(tiny, replace(settings, kltune_groups=4), Available()).steps[0]
    largest = max(tiny.student.vocab_size, tiny.student.intermediate_size) * tiny.student.hidden_size
    assert grouped.host["weights being tuned"] == (n_params(tiny.student) // 4 + largest) * KLTUNE_BYTES_PER_WEIGHT
    assert grouped.host["weights being tuned"] < step.host["weights being tuned"]
    assert grouped.host["student fp32"] == step.host["student fp32"]  # both models stay whole


def test_the_paper_preset_plans_kltune_for_a_4b_model_on_one_80_gb_gpu():
    """In 8 groups and 2 windows a step, Qwen3-4B's KL tuning fits one 80 GiB GPU; all at once it would not."""
    from recover_lora.devices.memory_sizes import model_sizes

    sizes = model_sizes(load_model_shape("qwen3-4b"))
    settings = plan_settings("paper", steps=("kltune",))
    assert settings.kltune_groups == 8 and settings.kltune_batch_size == 2
    step = plan_memory(sizes, settings, Available(gpus=1, gpu_bytes=80 * 2**30)).steps[0]
    assert sum(step.gpu.values()) < 80 * 2**30
    whole = plan_memory(sizes, replace(settings, kltune_groups=1), Available(gpus=1, gpu_bytes=80 * 2**30)).steps[0]
    assert sum(whole.gpu.values()) > 80 * 2**30


def test_a_step_that_does_not_fit_and_can_be_left_out_says_so_and_a_run_without_it_plans_it_skipped(tmp_path):
    from recover_lora.pipeline import Pipeline, PipelineConfig

    sizes = model_sizes(load_model_shape("llama-3.1-8b"))
    available = Available(gpus=1, gpu_bytes=80 * GiB)
    plan = checked_plan(sizes, plan_settings("paper", steps=("kltune",)), available)
    assert len(plan.problems) == 1 and plan.problems[0].endswith("use a GPU with more memory, or leave the step out (pipeline --skip kltune)")
    skipped = checked_plan(sizes, plan_settings("paper", steps=("kltune",), skip=("kltune",)), available)
    assert skipped.fits and skipped.steps[0].note == "skipped by the preset"
    # The pipeline's own check and its steps see the same preset: kltune off, AutoRound's files none.
    config = PipelineConfig(out_dir=tmp_path / "run", preset="paper", skip=("kltune", "autoround"))
    pipeline = Pipeline(config)
    assert not pipeline.preset.kltune and pipeline.preset.autoround_baselines == () and pipeline.preset.kltune_groups == 8
    with pytest.raises(RecoverLoraError, match=r"^--skip 'train': only autoround, kltune can be left out"):
        PipelineConfig(out_dir=tmp_path / "run", skip=("train",))


def test_reconstruct_plans_each_resource_at_its_larger_phase_and_a_head_too_big_for_the_gpu_names_no_head():
    """Qwen3-14B on a 24 GiB GPU: the blocks' phase needs more host RAM, the output head's phase (a 778 M-weight head
    being tuned) more GPU memory. The plan keeps each resource's own peak, refuses on the GPU, and says that the
    blocks alone fit (`reconstruct --no-head`); without the head's stage the same plan fits."""
    sizes = model_sizes(load_model_shape("qwen3-14b"))
    available = Available(gpus=1, gpu_bytes=24 * GiB, host_bytes=256 * GiB, disk_bytes=1000 * GiB)
    settings = plan_settings("cpu-demo", steps=("reconstruct",))
    assert settings.reconstruct_head
    plan = checked_plan(sizes, settings, available)
    step = plan.steps[0]
    assert "output head being tuned" in step.gpu and "teacher fp32" in step.host  # GPU from one phase, host from the other
    assert len(plan.problems) == 1 and plan.problems[0].startswith("reconstruct needs ")
    assert "leave the output head's stage out (recover-lora reconstruct --no-head)" in plan.problems[0]
    blocks_only = checked_plan(sizes, replace(settings, reconstruct_head=False), available)
    assert blocks_only.fits and "output head being tuned" not in blocks_only.steps[0].gpu
    assert blocks_only.steps[0].host == step.host
