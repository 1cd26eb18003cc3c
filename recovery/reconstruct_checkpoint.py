"""The work folder of `recover-lora reconstruct`: one file per finished block, so a killed run resumes.

`<out>.reconstruct/` holds settings.json (what the blocks depend on: the base GGUF's and the teacher's
hashes, the calibration windows' hash, iters, lr, batch size, seed, device) and block-NNN.safetensors
per finished block: the new bytes of its reconstructed tensors (none when the block was reverted) and
its report record in the metadata. Each is written to a temporary file and renamed, so a kill leaves
whole files only. A folder of other settings is refused before any model is loaded, naming the first
setting that differs; with --force it is discarded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output

SETTINGS_FILE = "settings.json"
CHECKPOINT_VERSION = 1


def work_folder(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".reconstruct")


def _block_file(work: Path, block: int) -> Path:
    return work / f"block-{block:03d}.safetensors"


def _first_difference(saved, now, key: str = "") -> tuple[str, object, object] | None:
    if isinstance(saved, dict) and isinstance(now, dict):
        for name in [*now, *(k for k in saved if k not in now)]:  # in the order the settings are written
            found = _first_difference(saved.get(name), now.get(name), f"{key}.{name}" if key else name)
            if found:
                return found
        return None
    return None if saved == now else (key, saved, now)


def _versioned(settings: dict) -> dict:
    return json.loads(json.dumps({"version": CHECKPOINT_VERSION, **settings}))  # as it reads back from JSON


def check_work_folder(work: Path, settings: dict, force: bool) -> None:
    """Keep a folder of these settings (to resume from), refuse one of others, or with `force` discard it."""
    if not work.exists():
        return
    try:
        saved = json.loads((work / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        saved = {"version": "unreadable"}
    difference = _first_difference(saved, _versioned(settings))
    if difference and not force:
        key, then, now = difference
        raise RecoverLoraError(f"{work} is the checkpoint of another run ({key} was {then!r} there, {now!r} now); "
                               f"rerun with its settings to resume it, or pass --force to discard it")
    if difference:
        shutil.rmtree(work)


def write_settings(work: Path, settings: dict) -> None:
    """Make the folder and its settings.json, if not there yet: with the first saved state, so a run that fails
    before one leaves nothing (also kl_tune's work folder)."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / SETTINGS_FILE).is_file():
        with atomic_output(work / SETTINGS_FILE, force=True) as tmp:
            tmp.write_text(json.dumps(_versioned(settings), indent=1) + "\n")


def save_block(work: Path, settings: dict, block: int, record: dict | None, tensors: dict[str, np.ndarray]) -> Path:
    """A finished block: its tensors' new bytes (GGUF name -> uint8 array) and its report record."""
    from safetensors.numpy import save_file

    write_settings(work, settings)
    path = _block_file(work, block)
    with atomic_output(path, force=True) as tmp:
        save_file({name: np.ascontiguousarray(raw).view(np.uint8).reshape(-1) for name, raw in tensors.items()}, str(tmp),
                  metadata={"record": json.dumps(record)})
    return path


def load_blocks(work: Path, n_blocks: int) -> list[tuple[dict, dict[str, np.ndarray]]]:
    """(record, tensors) of the finished blocks 0, 1, ... up to the first one missing."""
    from safetensors import safe_open

    finished = []
    for block in range(n_blocks):
        path = _block_file(work, block)
        if not path.is_file():
            break
        try:
            with safe_open(str(path), framework="numpy") as handle:
                record = json.loads(handle.metadata()["record"])
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as e:  # whatever safetensors raises for a damaged file
            raise RecoverLoraError(f"{path} cannot be read ({e}); delete it to redo that block, or pass --force to start over") from None
        finished.append((record, tensors))
    return finished
