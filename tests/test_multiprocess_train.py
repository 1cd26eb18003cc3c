"""`train` on 2 CPU processes (gloo, FSDP2) against one process: loss curve, adapter, checkpoints, resume after a kill."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import STORIES_DIR
from recover_lora.errors import RecoverLoraError
from recover_lora.recovery.block_scales import load_block_scales
from recover_lora.recovery.distill import train
from test_distill import adapter_weights, base, config, log_rows, synth_dir  # noqa: F401  (fixtures)

# Float tolerances against one process: the 2 processes sum the batch's loss rows and reduce the
# gradients in another order (observed: loss within 2e-7 relative, LoRA weights within 3e-5, the
# largest at single elements whose gradient is near 0, which Adam's normalisation magnifies). The gradient
# norm by step 4 carries three updates of that drift: 3.8e-5 relative on an AVX-512 machine (a factor of 2
# from a missing average would still be far outside).
LOSS_RTOL, GRAD_NORM_RTOL, WEIGHT_ATOL = 1e-5, 1e-4, 1e-4
# LoRA on two 4-bit kinds and block scales on the 2-bit gate/up, from a top-k teacher cache: every output there is.
SETTINGS = dict(targets="attn_v,ffn_down", block_scales=True, top_k=32)

# A run with a kill: rank 1 dies (SIGKILL, no clean-up) after step argv[2] (0: never).
RUN_SCRIPT = """
import json, os, signal, sys
from recover_lora.recovery.distill import TrainConfig, TrainHooks, train

def kill_rank_1(step):
    if step == int(sys.argv[2]) and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)

train(TrainConfig(**json.loads(sys.argv[1])), TrainHooks(after_step=kill_rank_1))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, args: list[str]) -> subprocess.CompletedProcess:
    """2 CPU processes on this venv's Python: `accelerate launch` (--multi_gpu is its multi-process mode; the
    train command picks gloo for --device cpu) or torchrun, on a free port."""
    port = str(free_port())
    if launcher == "accelerate":
        head = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    else:
        head = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    return subprocess.run([sys.executable, *head, *args], capture_output=True, text=True, timeout=600,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})


def train_cli(base: Path, synth_dir: Path, out: Path) -> list[str]:
    """`recover-lora train` arguments equal to test_distill.config(base, synth_dir, out, device="cpu", **SETTINGS)."""
    return ["-m", "recover_lora", "train", "--base", str(base), "--teacher", str(STORIES_DIR), "--samples", str(synth_dir),
            "-o", str(out), "--batch-size", "4", "--max-steps", "4", "--lr", "5e-3", "--checkpoint-every", "2",
            "--targets", SETTINGS["targets"], "--block-scales", "--top-k", str(SETTINGS["top_k"]), "--device", "cpu",
            "--no-progress"]


def assert_succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_processes_train_as_one(base, synth_dir, tmp_path):
    one = train(config(base, synth_dir, tmp_path / "one", device="cpu", **SETTINGS))
    result = launch("accelerate", train_cli(base, synth_dir, tmp_path / "two"))
    assert_succeeded(result)
    assert result.stdout.count("trained 4 steps") == 1  # rank 0 reports

    one_rows, two_rows = log_rows(tmp_path / "one"), log_rows(tmp_path / "two")
    assert [r["step"] for r in two_rows] == [1, 2, 3, 4]
    for a, b in zip(one_rows, two_rows):
        for key in ("loss", "kl", "grad_norm", "lr"):
            rtol = GRAD_NORM_RTOL if key == "grad_norm" else LOSS_RTOL
            assert b[key] == pytest.approx(a[key], rel=rtol), (a["step"], key)
    one_adapter, two_adapter = adapter_weights(tmp_path / "one"), adapter_weights(tmp_path / "two")
    assert one_adapter.keys() == two_adapter.keys()
    for name in one_adapter:
        torch.testing.assert_close(two_adapter[name], one_adapter[name], rtol=0, atol=WEIGHT_ATOL)
    assert (tmp_path / "two" / "adapter.gguf").is_file() and one.adapter_gguf.is_file()
    # Rounded to Q2_K's fp16 scales and 4-bit codes, the trained block scales come out byte for byte.
    one_scales, two_scales = (load_block_scales(tmp_path / run / "block_scales.safetensors") for run in ("one", "two"))
    assert one_scales.keys() == two_scales.keys() and all((one_scales[k] == two_scales[k]).all() for k in one_scales)

    # The checkpoint is the one-process format (so either resumes the other), plus each process's RNG state.
    first, second = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=False) for run in ("one", "two"))
    assert set(second) - set(first) == {"rng_per_process"} and len(second["rng_per_process"]) == 2
    assert list(first["adapter"]) == list(second["adapter"])
    assert first["optimizer"]["param_groups"] == second["optimizer"]["param_groups"]
    assert first["scheduler"] == second["scheduler"] and first["step"] == second["step"] == 4
    for index, moments in first["optimizer"]["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(second["optimizer"]["state"][index][key], value, rtol=1e-3, atol=1e-6)


def test_resume_after_a_kill_with_two_processes(base, synth_dir, tmp_path):
    settings = dict(base=str(base), teacher=str(STORIES_DIR), samples=str(synth_dir), batch_size=4, max_steps=4, lr=5e-3,
                    checkpoint_every=2, device="cpu", progress=False, dropout=0.1)  # dropout: every process's RNG matters
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    assert_succeeded(launch("torchrun", [str(script), json.dumps(settings | {"output": str(tmp_path / "straight")}), "0"]))
    killed = launch("torchrun", [str(script), json.dumps(settings | {"output": str(tmp_path / "killed")}), "3"])
    assert killed.returncode != 0  # the launcher stopped rank 0 once rank 1 died, rather than leave it waiting
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not (tmp_path / "killed" / "adapter").exists()
    shutil.copytree(tmp_path / "killed", tmp_path / "killed_then_one")

    resumed = launch("accelerate", ["-m", "recover_lora", "train", "--base", str(base), "--teacher", str(STORIES_DIR),
                                    "--samples", str(synth_dir), "-o", str(tmp_path / "killed"), "--batch-size", "4",
                                    "--max-steps", "4", "--lr", "5e-3", "--checkpoint-every", "2", "--dropout", "0.1",
                                    "--device", "cpu", "--no-progress", "--resume"])
    assert_succeeded(resumed)
    assert "resumed from 2" in resumed.stdout
    straight, again = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "killed")
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
    assert [r["loss"] for r in log_rows(tmp_path / "straight")] == [r["loss"] for r in log_rows(tmp_path / "killed")]

    # The same checkpoint resumes in one process (its dropout draws then differ: nothing to compare bit for bit).
    settings_one = {k: v for k, v in settings.items() if k not in ("base", "samples", "teacher")}
    one = train(config(base, synth_dir, tmp_path / "killed_then_one", resume=True, **settings_one))
    assert one.resumed_from == 2 and [r["step"] for r in log_rows(tmp_path / "killed_then_one")] == [1, 2, 3, 4]


def test_a_batch_that_does_not_divide_by_the_processes_is_refused(base, synth_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as the launcher sets it; refused before any process group starts
    with pytest.raises(RecoverLoraError, match=r"--batch-size=3 does not divide by the 2 processes") as error:
        train(config(base, synth_dir, tmp_path / "run", batch_size=3))
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()
