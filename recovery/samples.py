"""The synthetic training set on disk, and the one way to read it back.

A finished set is a folder with three files:

- ``samples.safetensors``: ``input_ids`` int32 [N, L] and ``loss_mask`` uint8 [N, L].
  ``loss_mask[i, t] == 1`` means the teacher's next-token distribution at position t (its
  prediction of token t+1) is a training target. It is 0 on fixed prompt text (the chat
  template, a BOS), on the end-of-sequence token itself and on every position after it
  (those hold padding), so a trainer takes KL over exactly the positions where the mask is 1.
- ``manifest.json``: teacher and tokenizer identity, every setting, counts, early-EOS count,
  duplicate rate, timing, ``format_version``. Written last: its presence marks a finished set.
- ``preview.jsonl``: the first samples detokenized, for a human to read.

Unfinished runs keep one small safetensors file per shard in ``.partial/`` (see synth.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output

FORMAT_VERSION = 1
SAMPLES_FILE = "samples.safetensors"
MANIFEST_FILE = "manifest.json"
PREVIEW_FILE = "preview.jsonl"
LOSS_MASK_MEANING = (
    "loss_mask[i, t] = 1 where the teacher's distribution at position t (predicting token t+1) "
    "is a training target; 0 on fixed prompt text, on the first EOS and after it"
)


@dataclass
class SyntheticSamples:
    """Token ids and loss mask of a synthetic set, with its manifest.

    Example:
        samples = load_samples("runs/synth")
        train, holdout = train_holdout_split(samples, 0.05, seed=0)
        batch_ids, batch_mask = train.input_ids[:8], train.loss_mask[:8]
    """

    input_ids: torch.Tensor  # int64 [N, L]
    loss_mask: torch.Tensor  # bool [N, L]
    manifest: dict

    def __post_init__(self) -> None:
        if self.input_ids.dtype != torch.long or self.input_ids.dim() != 2:
            raise RecoverLoraError(
                f"input_ids must be a 2-D int64 tensor, got {self.input_ids.dtype} of shape {tuple(self.input_ids.shape)}"
            )
        if self.loss_mask.dtype != torch.bool or self.loss_mask.shape != self.input_ids.shape:
            raise RecoverLoraError(
                f"loss_mask must be a bool tensor shaped like input_ids {tuple(self.input_ids.shape)}, "
                f"got {self.loss_mask.dtype} {tuple(self.loss_mask.shape)}"
            )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def subset(self, index: torch.Tensor) -> "SyntheticSamples":
        """The samples at ``index`` (a LongTensor of row numbers), sharing the manifest."""
        return SyntheticSamples(self.input_ids[index], self.loss_mask[index], self.manifest)


def write_token_file(
    path: Path, input_ids: torch.Tensor, loss_mask: torch.Tensor, metadata: dict[str, str] | None = None, overwrite: bool = False
) -> None:
    """Write ids (as int32) and mask (as uint8) atomically; refuses to replace ``path`` unless ``overwrite``."""
    tensors = {
        "input_ids": input_ids.to(torch.int32).contiguous().cpu(),
        "loss_mask": loss_mask.to(torch.uint8).contiguous().cpu(),
    }
    with atomic_output(path, force=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)  # safetensors creates files owner-only; the set is meant to be shared


def read_token_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``input_ids`` (int64) and ``loss_mask`` (bool) from a file made by `write_token_file`."""
    if not path.is_file():
        raise RecoverLoraError(f"{path} is missing; run `recover-lora synth --out {path.parent}` to make it")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RecoverLoraError(f"{path} is corrupt ({e}); delete it and run `recover-lora synth` again") from e
    missing = {"input_ids", "loss_mask"} - set(tensors)
    if missing:
        raise RecoverLoraError(f"{path} lacks tensors {sorted(missing)}; it was not written by `recover-lora synth`")
    ids, mask = tensors["input_ids"], tensors["loss_mask"]
    if ids.dim() != 2 or mask.shape != ids.shape:
        raise RecoverLoraError(
            f"{path} has input_ids {tuple(ids.shape)} and loss_mask {tuple(mask.shape)}; expected two equal [N, L] shapes"
        )
    return ids.long(), mask.bool()


def write_manifest(out_dir: Path, manifest: dict, overwrite: bool = False) -> None:
    with atomic_output(out_dir / MANIFEST_FILE, force=overwrite) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def write_preview(out_dir: Path, rows: list[dict], overwrite: bool = False) -> None:
    with atomic_output(out_dir / PREVIEW_FILE, force=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        raise RecoverLoraError(
            f"{path} is missing: {out_dir} holds no finished synthetic set; run `recover-lora synth --out {out_dir}` "
            "(with --resume to finish an interrupted run)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecoverLoraError(f"{path} is not valid JSON ({e}); run `recover-lora synth --force` to remake the set") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise RecoverLoraError(f"{path} has format_version {found!r}; this version reads {FORMAT_VERSION}; remake the set")
    return manifest


def load_samples(out_dir: str | Path) -> SyntheticSamples:
    """Load a finished synthetic set, checking the token file against its manifest.

    Example:
        samples = load_samples("runs/synth")  # samples.input_ids: LongTensor [N, L]
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    input_ids, loss_mask = read_token_file(out_dir / SAMPLES_FILE)
    counts = manifest.get("counts", {})
    expected = (counts.get("n_samples"), counts.get("seq_len"))
    if tuple(input_ids.shape) != expected:
        raise RecoverLoraError(
            f"{out_dir / SAMPLES_FILE} holds {tuple(input_ids.shape)} tokens but the manifest says {expected}; "
            "the files come from different runs: remake the set with --force"
        )
    vocab_size = manifest.get("tokenizer", {}).get("vocab_size")
    if vocab_size is not None and input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise RecoverLoraError(
            f"{out_dir / SAMPLES_FILE} has token ids outside [0, {vocab_size}); the file is corrupt: remake the set with --force"
        )
    return SyntheticSamples(input_ids, loss_mask, manifest)


def train_holdout_split(
    samples: SyntheticSamples, holdout_fraction: float, seed: int = 0
) -> tuple[SyntheticSamples, SyntheticSamples]:
    """Split rows into (train, holdout) by a seeded permutation; the same seed gives the same split.

    Example:
        train, holdout = train_holdout_split(samples, 0.05, seed=0)  # 5 % held out, at least 1 row
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise RecoverLoraError(f"holdout fraction {holdout_fraction} must be strictly between 0 and 1")
    n = len(samples)
    n_holdout = max(1, round(n * holdout_fraction))
    if n_holdout >= n:
        raise RecoverLoraError(f"holdout fraction {holdout_fraction} leaves no training rows out of {n}; use more samples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    holdout_rows, train_rows = order[:n_holdout].sort().values, order[n_holdout:].sort().values
    return samples.subset(train_rows), samples.subset(holdout_rows)
