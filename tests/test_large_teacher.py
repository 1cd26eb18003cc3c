"""Training that fits large teachers: --loss-chunk, --gradient-checkpointing, --dtype (issue 14).

Chunking and checkpointing change memory, never the math: their losses and gradients are checked
against the plain path in float32. The memory property itself is a test that can fail: a hook on
lm_head sees every row count it is called with.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from conftest import STORIES_DIR, make_tiny_hf_model, torch_threads
from recover_lora.errors import RecoverLoraError
from recover_lora.recovery import distill
from recover_lora.recovery.distill import TeacherSignal, TrainConfig, TrainHooks, step_loss, train, wrap_with_lora
from recover_lora.recovery.losses import LossConfig, next_token_rows, next_token_targets
from recover_lora.recovery.samples import FORMAT_VERSION, write_manifest, write_token_file
from recover_lora.recovery.student import (
    build_student,
    build_teacher,
    causal_lm,
    decoder_hidden_states,
    enable_gradient_checkpointing,
    output_logits,
    target_module_names,
)
from recover_lora.recovery.teacher_cache import build_topk

N_SAMPLES, SEQ_LEN, CHUNK = 16, 16, 7
NO_AUTOCAST = contextlib.nullcontext()


@pytest.fixture(scope="module")
def base(stories_gateup) -> Path:
    return stories_gateup


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synth")
    ids = torch.randint(3, 512, (N_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[::3, 10:] = False
    write_token_file(folder / "samples.safetensors", ids, mask)
    write_manifest(folder, {"format_version": FORMAT_VERSION, "counts": {"n_samples": N_SAMPLES, "seq_len": SEQ_LEN},
                            "tokenizer": {"vocab_size": 512}})
    return folder


def lora_student(model, modules: list[str], rank: int = 4):
    """peft LoRA with B away from 0, so A gets gradients and the student differs from the base."""
    cfg = TrainConfig(base="unused", output="unused", samples="unused", rank=rank)
    torch.manual_seed(0)
    model = wrap_with_lora(model, cfg, modules)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def stories(base):
    """(LoRA student, teacher, ids [3, 16], mask with 41 loss rows): 41 is no multiple of CHUNK."""
    torch_threads()
    student, info = build_student(base)
    model = lora_student(student, target_module_names(info))
    teacher, _ = build_teacher(STORIES_DIR)
    ids = torch.randint(3, 512, (3, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :4] = False
    mask[2, 13:] = False
    assert int(mask.sum()) % CHUNK != 0
    return model, teacher, ids, mask


def loss_and_grads(model, signal, ids, mask, loss_config, chunk):
    model.zero_grad(set_to_none=True)
    loss, parts = step_loss(model, signal, ids, mask, torch.arange(len(ids)), loss_config, NO_AUTOCAST, chunk)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), {k: v.detach() for k, v in parts.items()}, grads


def assert_same(plain, chunked):
    (loss_a, parts_a, grads_a), (loss_b, parts_b, grads_b) = plain, chunked
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)
    assert parts_a.keys() == parts_b.keys()
    for key in parts_a:
        torch.testing.assert_close(parts_b[key], parts_a[key], rtol=1e-5, atol=1e-7)
    assert grads_a.keys() == grads_b.keys() and grads_a
    scale = max(float(g.abs().max()) for g in grads_a.values())
    assert scale > 0
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize(
    "loss_config, top_k",
    [
        (LossConfig("forward"), None),
        (LossConfig("reverse", temperature=2.0), None),
        (LossConfig("mix", mix_weight=0.3), None),
        (LossConfig("forward"), 8),
        (LossConfig("mix"), 8),
        (LossConfig("forward", ce_weight=0.5), None),
        (LossConfig("forward", ce_weight=1.0, kl_weight=0.0), None),
    ],
    ids=["forward", "reverse-T2", "mix", "topk-forward", "topk-mix", "kl+ce", "ce-only"],
)
def test_chunked_loss_and_gradients_equal_the_plain_ones(stories, loss_config, top_k):
    model, teacher, ids, mask = stories
    topk = None if top_k is None else build_topk(teacher, ids, top_k, loss_config.temperature, 2, "cpu", NO_AUTOCAST)
    signal = TeacherSignal(None if topk else teacher, topk)
    plain = loss_and_grads(model, signal, ids, mask, loss_config, None)
    assert_same(plain, loss_and_grads(model, signal, ids, mask, loss_config, CHUNK))
    assert_same(plain, loss_and_grads(model, signal, ids, mask, loss_config, 1000))  # one chunk of every row


def test_next_token_targets_are_the_rows_of_next_token_rows(stories):
    _, _, ids, mask = stories
    targets = next_token_targets(ids, mask)
    ce_rows, ce_targets = next_token_rows(ids, mask)
    assert targets.shape == (int(mask.sum()),)
    assert torch.equal(targets[ce_rows[mask]], ce_targets) and (targets[~ce_rows[mask]] == -100).all()


def rows_seen_by(module) -> tuple[list[int], object]:
    seen = []
    handle = module.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0].shape[:-1].numel()))
    return seen, handle


def test_no_lm_head_call_sees_more_than_loss_chunk_rows(stories):
    model, teacher, ids, mask = stories
    student_seen, student_hook = rows_seen_by(causal_lm(model).lm_head)
    teacher_seen, teacher_hook = rows_seen_by(teacher.lm_head)
    try:
        loss_and_grads(model, TeacherSignal(teacher, None), ids, mask, LossConfig(ce_weight=0.5), CHUNK)
        # Student: forward and backward's recompute; teacher: the same, under no_grad.
        assert len(student_seen) == 2 * -(-int(mask.sum()) // CHUNK) and max(student_seen) == CHUNK
        assert len(teacher_seen) == len(student_seen) and max(teacher_seen) == CHUNK
        teacher_seen.clear()
        values, top_ids = build_topk(teacher, ids, 8, 1.0, 2, "cpu", NO_AUTOCAST, loss_chunk=CHUNK)
        assert teacher_seen and max(teacher_seen) == CHUNK
        plain_values, plain_ids = build_topk(teacher, ids, 8, 1.0, 2, "cpu", NO_AUTOCAST)
        torch.testing.assert_close(values, plain_values, rtol=1e-5, atol=1e-6)
        assert torch.equal(top_ids, plain_ids)
        teacher_seen.clear(), student_seen.clear()
        loss_and_grads(model, TeacherSignal(teacher, None), ids, mask, LossConfig(), None)
        assert max(student_seen) == ids.numel() and max(teacher_seen) == ids.numel()  # the hooks can fail
    finally:
        student_hook.remove(), teacher_hook.remove()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(base, stories):
    _, teacher, ids, mask = stories
    student, info = build_student(base)
    model = lora_student(student, target_module_names(info)).train()
    calls = []
    # transformers checkpoints a layer's forward, not its hooks; the layer's first module runs again in backward.
    causal_lm(model).model.layers[0].input_layernorm.register_forward_pre_hook(lambda *_: calls.append(1))
    signal = TeacherSignal(teacher, None)
    plain = loss_and_grads(model, signal, ids, mask, LossConfig(), None)
    assert len(calls) == 1
    enable_gradient_checkpointing(model)
    checkpointed = loss_and_grads(model, signal, ids, mask, LossConfig(), None)
    assert len(calls) == 3  # the layer ran again in backward: checkpointing is on
    assert_same(plain, checkpointed)
    assert_same(plain, loss_and_grads(model, signal, ids, mask, LossConfig(), CHUNK))


ARCHS = ["llama", "qwen2", "qwen3", "phi3", "gemma3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_head_gives_each_architectures_own_logits(tmp_path, arch):
    """output_logits(decoder_hidden_states) is the model's forward, Gemma 3's final soft-capping included."""
    torch = torch_threads()
    import transformers

    overrides = {"final_logit_softcapping": 1.0} if arch == "gemma3" else {}  # a cap the logits actually reach
    folder = make_tiny_hf_model(tmp_path / arch, arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        rows = decoder_hidden_states(model, ids).reshape(-1, model.config.hidden_size)
        chunked = torch.cat([output_logits(model, rows[i : i + 5]) for i in range(0, len(rows), 5)])
    torch.testing.assert_close(chunked.reshape(expected.shape), expected, rtol=1e-6, atol=1e-6)
    if arch == "gemma3":
        assert expected.abs().max() < 1.0 and expected.abs().max() > 0.5


def test_gemma3_chunked_loss_equals_the_plain_loss(tmp_path):
    torch = torch_threads()
    import transformers

    def tiny(seed: int):
        folder = make_tiny_hf_model(tmp_path / f"g{seed}", "gemma3", seed=seed, final_logit_softcapping=5.0)
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    model = lora_student(tiny(0), ["model.layers.0.mlp.gate_proj", "model.layers.3.self_attn.q_proj"])
    teacher = tiny(1)
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :5] = False
    signal = TeacherSignal(teacher, None)
    for loss_config in (LossConfig("mix"), LossConfig(ce_weight=0.5)):
        plain = loss_and_grads(model, signal, ids, mask, loss_config, None)
        assert_same(plain, loss_and_grads(model, signal, ids, mask, loss_config, CHUNK))


def config(base, synth_dir, out, **overrides) -> TrainConfig:
    settings = dict(base=base, teacher=str(STORIES_DIR), samples=synth_dir, output=out, batch_size=4, max_steps=4,
                    lr=5e-3, checkpoint_every=2, progress=False)
    return TrainConfig(**(settings | overrides))


class Killed(Exception):
    pass


def test_bfloat16_run_on_cpu_trains_float32_parameters_and_resumes_only_in_bfloat16(base, synth_dir, tmp_path, monkeypatch):
    seen = {"frozen": set(), "trainable": set()}
    real_step_loss = distill.step_loss

    def recording_step_loss(model, *args):
        for param in model.parameters():
            seen["trainable" if param.requires_grad else "frozen"].add(param.dtype)
        return real_step_loss(model, *args)

    def kill_after_step_2(step: int) -> None:
        if step == 2:
            raise Killed()

    monkeypatch.setattr(distill, "step_loss", recording_step_loss)
    # LoRA on the 4-bit linears and block scales on the Q2_K ones: both kinds of trainable parameters.
    settings = dict(dtype="bfloat16", targets="high-bit", block_scales=True, top_k=16)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(config(base, synth_dir, run, **settings), TrainHooks(after_step=kill_after_step_2))
    assert seen == {"frozen": {torch.bfloat16}, "trainable": {torch.float32}}
    assert json.loads((run / "run_config.json").read_text())["dtype"] == "bfloat16"

    with pytest.raises(RecoverLoraError, match="--resume: dtype was 'bfloat16' in the checkpointed run but is 'float32'"):
        train(config(base, synth_dir, run, resume=True, **(settings | {"dtype": "float32"})))
    result = train(config(base, synth_dir, run, resume=True, loss_chunk=5, gradient_checkpointing=True, **settings))
    assert result.resumed_from == 2 and result.steps == 4 and result.adapter_gguf.is_file()
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()))
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(run / "adapter" / "adapter_model.safetensors")).values()} == {torch.float32}


def cli(args: list[str]) -> int:
    from recover_lora.cli import main

    try:
        main(args)
    except SystemExit as e:
        return e.code or 0
    return 0


def test_cli_passes_the_new_options(base, synth_dir, tmp_path, monkeypatch, capsys):
    configs = []
    real_train = distill.train

    def recording_train(config, hooks=None):
        configs.append(config)
        return real_train(config, hooks)

    monkeypatch.setattr(distill, "train", recording_train)
    common = ["train", "--base", str(base), "--teacher", str(STORIES_DIR), "--samples", str(synth_dir),
              "--max-steps", "1", "--batch-size", "4", "--rank", "4", "--no-progress"]
    assert cli(common + ["-o", str(tmp_path / "run"), "--dtype", "bfloat16", "--loss-chunk", "7", "--gradient-checkpointing"]) == 0
    assert (configs[0].dtype, configs[0].loss_chunk, configs[0].gradient_checkpointing) == ("bfloat16", 7, True)
    assert (tmp_path / "run" / "adapter.gguf").is_file()
    assert cli(common + ["-o", str(tmp_path / "bad"), "--dtype", "fp16"]) == 2
    assert "--dtype 'fp16' is unknown; use one of: auto, float32, bfloat16" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dtype="half"), r"--dtype 'half' is unknown; use one of: auto, float32, bfloat16"),
        (dict(loss_chunk=0), r"--loss-chunk=0 must be > 0"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(RecoverLoraError, match=message) as error:
        TrainConfig(base=tmp_path / "b.gguf", samples=tmp_path, output=tmp_path / "run", **overrides)
    assert "\n" not in str(error.value)


def test_memory_settings_are_not_part_of_the_trajectory(tmp_path):
    settings = dict(base=tmp_path / "b.gguf", samples=tmp_path, output=tmp_path / "run")
    plain = TrainConfig(**settings).trajectory()
    assert TrainConfig(**settings, loss_chunk=64, gradient_checkpointing=True).trajectory() == plain
    assert TrainConfig(**settings, dtype="bfloat16").trajectory() != plain
