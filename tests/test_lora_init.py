"""LoRA init from the quantization error (svd / eora): the linear algebra, a better step 0, the adapter GGUF, train()."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import STORIES_DIR, sample_tokens, torch_threads
from recover_lora.errors import RecoverLoraError
from recover_lora.recovery.activations import ActivationStats
from recover_lora.recovery.distill import TrainConfig, train, wrap_with_lora
from recover_lora.recovery.lora_init import apply_lora_init, compute_lora_init, low_rank_factors, whitening
from recover_lora.recovery.student import build_student, build_teacher, target_module_names
from test_imatrix import synth_folder


def test_svd_factors_are_the_truncated_svd():
    rng = np.random.default_rng(0)
    delta = rng.standard_normal((40, 24))
    a, b = low_rank_factors(delta, 24)
    np.testing.assert_allclose(b @ a, delta, atol=1e-10)
    a, b = low_rank_factors(delta, 5)
    u, s, vt = np.linalg.svd(delta)
    np.testing.assert_allclose(b @ a, (u[:, :5] * s[:5]) @ vt[:5], atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=0))  # balanced factors


def weighted_error(delta, a, b, x) -> float:
    return float(np.linalg.norm((delta - b @ a) @ x.T))


def test_eora_minimises_the_activation_weighted_error_and_skips_dead_columns():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 24)) @ rng.standard_normal((24, 24)) * np.geomspace(0.01, 10, 24)
    x[:, -4:] = 0  # padded columns: never any activation
    delta = rng.standard_normal((40, 24))
    full = ActivationStats((x**2).sum(0), 500, x.T @ x)
    diagonal = ActivationStats((x**2).sum(0), 500)
    plain = low_rank_factors(delta, 5)
    eora = low_rank_factors(delta, 5, whitening(full))
    qera = low_rank_factors(delta, 5, whitening(diagonal))
    # The optimum of ‖(ΔW − L) Xᵀ‖ over rank-5 L: the tail singular values of ΔW Xᵀ.
    tail = np.linalg.svd(delta @ x.T, compute_uv=False)[5:]
    assert weighted_error(delta, *eora, x) == pytest.approx(np.sqrt((tail**2).sum()), rel=1e-6)
    assert weighted_error(delta, *eora, x) < weighted_error(delta, *qera, x) < weighted_error(delta, *plain, x)
    for a, _ in (eora, qera):
        assert np.isfinite(a).all() and not a[:, -4:].any()  # nothing is "corrected" where no input ever comes


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from recover_lora.export.quantize import export_model

    torch_threads()
    return export_model(STORIES_DIR, tmp_path_factory.mktemp("lora-init") / "stories.gateup.gguf", "gateup", threads=2).path


def tokens(n_rows: int, seed: int) -> torch.Tensor:
    return torch.tensor([sample_tokens(32, seed=seed * 100 + i) for i in range(n_rows)])


def initialised(base: Path, method: str, targets: str = "low-bit", rank: int = 8):
    """The student wrapped with LoRA and initialised by `method` from 8 'training' rows."""
    student, info = build_student(base)
    modules = target_module_names(info, targets)
    ids = tokens(8, seed=0)
    factors = compute_lora_init(method, student, modules, STORIES_DIR, rank, ids, torch.ones_like(ids, dtype=torch.bool))
    torch.manual_seed(0)
    model = wrap_with_lora(student, TrainConfig(base=base, output="unused", samples="unused", rank=rank), modules)
    apply_lora_init(model, factors)
    return model.eval()


def kl_to_teacher(teacher, model, ids) -> float:
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=ids).logits, -1)
        student = torch.log_softmax(model(input_ids=ids).logits, -1)
    return float((target.exp() * (target - student)).sum(-1).mean())


def test_svd_and_eora_start_closer_to_the_teacher_than_zero(base):
    torch_threads()
    teacher, _ = build_teacher(STORIES_DIR)
    held_out = tokens(4, seed=1)  # not the rows the statistics came from
    kl = {method: kl_to_teacher(teacher, initialised(base, method), held_out) for method in ("zero", "svd", "eora")}
    print(kl)
    assert kl["svd"] < kl["zero"] and kl["eora"] < kl["zero"]
    # Full rank on every linear: the correction is exact and only the Q6_K embedding's error is left.
    full = kl_to_teacher(teacher, initialised(base, "svd", targets="all", rank=256), held_out)
    assert full < 0.05 * kl["zero"]


def test_zero_init_computes_nothing_and_unknown_methods_are_refused():
    torch_threads()
    student = torch.nn.Module()
    assert compute_lora_init("zero", student, ["model.layers.0.mlp.gate_proj"], STORIES_DIR, 4) == {}
    with pytest.raises(RecoverLoraError, match="--init 'pissa' is unknown"):
        compute_lora_init("pissa", student, [], STORIES_DIR, 4)


def test_initialised_adapter_gguf_matches_torch_in_llama_cpp(base, tmp_path):
    """eora init on every linear (q/k included: llama.cpp's rotary order is the exporter's job) in llama.cpp."""
    from recover_lora.export.gguf_io import read_gguf, write_gguf
    from recover_lora.recovery.adapter_gguf import write_adapter_gguf
    from test_adapter_gguf import llama_logits, max_rel, torch_logits

    model = initialised(base, "eora", targets="all", rank=8)
    model.save_pretrained(tmp_path / "peft")
    adapter = write_adapter_gguf(tmp_path / "peft", base, tmp_path / "adapter.gguf", dtype="f32").path
    rendered = write_gguf(read_gguf(base), tmp_path / "base.f32.gguf")
    ids = sample_tokens(40, seed=7)
    with_lora, without = torch_logits(model, ids), torch_logits(model, ids, adapter=False)
    assert max_rel(with_lora, without) > 1e-2  # the init really changes the output
    assert max_rel(with_lora, llama_logits(rendered, ids, adapter)) < 1e-4


def test_train_starts_lower_records_the_init_and_refuses_another_on_resume(base, tmp_path):
    synth = synth_folder(tmp_path / "synth", n=8, seq_len=16)
    settings = dict(base=base, teacher=str(STORIES_DIR), samples=synth, batch_size=4, max_steps=2, lr=1e-3,
                    checkpoint_every=1, progress=False, rank=4)
    first_loss = {}
    for method in ("zero", "eora"):
        result = train(TrainConfig(output=tmp_path / method, init=method, **settings))
        first_loss[method] = json.loads((result.run_dir / "train_log.jsonl").read_text().splitlines()[0])["loss"]
        assert json.loads((result.run_dir / "run_config.json").read_text())["init"] == method
    assert first_loss["eora"] < first_loss["zero"]  # step 0's batch, before any update
    with pytest.raises(RecoverLoraError, match="init was 'eora'.*'svd'"):
        train(TrainConfig(output=tmp_path / "eora", init="svd", resume=True, **settings))
    with pytest.raises(RecoverLoraError, match="--init 'random'"):
        TrainConfig(output=tmp_path / "x", init="random", **settings)


def test_zero_steps_write_the_initial_adapter(base, tmp_path):
    """`train --max-steps 0 --init eora`: the EoRA correction alone, as a peft folder and an adapter GGUF."""
    from safetensors.numpy import load_file

    synth = synth_folder(tmp_path / "synth", n=8, seq_len=16)
    settings = dict(base=base, teacher=str(STORIES_DIR), samples=synth, batch_size=4, max_steps=0, progress=False, rank=4)
    eora = train(TrainConfig(output=tmp_path / "eora", init="eora", **settings))
    zero = train(TrainConfig(output=tmp_path / "zero", init="zero", **settings))
    assert eora.steps == 0 and (eora.run_dir / "train_log.jsonl").read_text() == ""
    assert eora.adapter_gguf.is_file()
    lora_b = {k: v for k, v in load_file(eora.adapter_dir / "adapter_model.safetensors").items() if "lora_B" in k}
    assert lora_b and all(abs(v).max() > 0 for v in lora_b.values())  # the correction, not peft's zero B
    zero_b = [v for k, v in load_file(zero.adapter_dir / "adapter_model.safetensors").items() if "lora_B" in k]
    assert all(abs(v).max() == 0 for v in zero_b)
    with pytest.raises(RecoverLoraError, match="--max-steps=-1 must be >= 0"):
        TrainConfig(output=tmp_path / "x", **(settings | {"max_steps": -1}))
