"""Training checkpoints that make `--resume` bit-identical to an uninterrupted run.

A checkpoint holds everything the next step depends on: the LoRA weights, the AdamW moments, the
LR schedule position, every RNG state (dropout draws from torch's global generator) and the step
count — the data order is a pure function of (seed, epoch), so the step fixes the position in it.
A run on several processes (distributed.py) writes the same file, gathered into whole tensors, plus
each process's RNG state under "rng_per_process".
It is written to a temporary file and renamed, so a kill mid-write leaves the previous one intact.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_VERSION = 1


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def checkpoint_state(step: int, adapter: dict, optimizer_state: dict, scheduler_state: dict, rng: dict,
                     trajectory: dict, metrics: dict) -> dict:
    """What checkpoint.pt holds: the trainable parameters by name, `optimizer.state_dict()`, and so on."""
    return {
        "version": CHECKPOINT_VERSION,
        "step": step,
        "adapter": adapter,
        "optimizer": optimizer_state,
        "scheduler": scheduler_state,
        "rng": rng,
        "trajectory": trajectory,
        "metrics": metrics,
    }


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, trajectory: dict, metrics: dict) -> Path:
    """Write run_dir/checkpoint.pt atomically (replacing the previous one)."""
    state = checkpoint_state(step, trainable_state(model), optimizer.state_dict(), scheduler.state_dict(), rng_state(),
                             trajectory, metrics)
    return write_checkpoint(run_dir, state)


def write_checkpoint(run_dir: Path, state: dict) -> Path:
    """torch.save to a temporary file, then a rename: a kill mid-write keeps the previous checkpoint."""
    path = run_dir / CHECKPOINT_FILE
    with atomic_output(path, force=True) as tmp:
        torch.save(state, tmp)
    return path


def checkpoint_to_resume(run_dir: Path) -> Path:
    """run_dir/checkpoint.pt, or a one-line error when there is none to resume from."""
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise RecoverLoraError(f"--resume: {path} does not exist; start without --resume")
    return path


def load_checkpoint(run_dir: Path, trajectory: dict) -> dict:
    """Read run_dir/checkpoint.pt and refuse it if it came from different training settings."""
    path = checkpoint_to_resume(run_dir)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a file torch cannot unpickle is corrupt, whatever the exception type
        raise RecoverLoraError(f"{path} cannot be read ({e}); start over with --force") from None
    if state.get("version") != CHECKPOINT_VERSION:
        raise RecoverLoraError(f"{path} has checkpoint version {state.get('version')}; start over with --force")
    saved = state["trajectory"]
    for key in sorted(set(saved) | set(trajectory)):
        if saved.get(key) != trajectory.get(key):
            raise RecoverLoraError(
                f"--resume: {key} was {saved.get(key)!r} in the checkpointed run but is {trajectory.get(key)!r} now; "
                f"use the same settings to resume, or --force to start over"
            )
    return state


def restore(state: dict, model, optimizer, scheduler) -> int:
    """Load a checkpoint's state into freshly built objects; returns the step to continue from."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["adapter"].items():
            if name not in params:
                raise RecoverLoraError(f"checkpoint holds {name}, which the model does not have; start over with --force")
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])
