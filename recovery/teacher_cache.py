"""A cache of the teacher's top-k next-token log-probabilities, computed once per run.

With it the teacher runs one forward pass over the data instead of one per step and epoch, and
can leave memory before training. Stored in the run folder as safetensors (log-probs float32,
ids int32, [N, L, k]) with the settings it was made with, so a resumed run reuses it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output
from recover_lora.recovery.losses import teacher_topk

CACHE_FILE = "teacher_topk.safetensors"


def build_topk(teacher, input_ids: torch.Tensor, k: int, temperature: float, batch_size: int, device, autocast,
               loss_chunk: int | None = None):
    """(log-probs [N, L, k] float32, ids [N, L, k] int32) of the teacher over every position.

    loss_chunk: the output projection runs over at most this many positions at a time, so the
    teacher's logits of a whole batch never exist at once (None: one batch at a time).
    """
    from recover_lora.recovery.student import decoder_hidden_states, output_logits

    values, ids = [], []
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            if loss_chunk is None:
                with autocast:
                    logits = teacher(input_ids=batch, use_cache=False).logits
                v, i = teacher_topk(logits, k, temperature)
            else:
                with autocast:
                    hidden = decoder_hidden_states(teacher, batch)
                rows = hidden.reshape(-1, hidden.shape[-1])
                chunks = []
                for row in range(0, len(rows), loss_chunk):
                    with autocast:
                        logits = output_logits(teacher, rows[row : row + loss_chunk])
                    chunks.append(teacher_topk(logits, k, temperature))
                v = torch.cat([c[0] for c in chunks]).reshape(*batch.shape, k)
                i = torch.cat([c[1] for c in chunks]).reshape(*batch.shape, k)
            values.append(v.float().cpu())
            ids.append(i.to(torch.int32).cpu())
    return torch.cat(values), torch.cat(ids)


def load_or_build_topk(run_dir: Path, teacher, samples, config, device, autocast, fingerprint: str):
    """The run's cache: reused when it matches (k, temperature, data), else computed and written."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    if config.top_k > teacher.config.vocab_size:
        raise RecoverLoraError(f"--top-k={config.top_k} exceeds the vocabulary size {teacher.config.vocab_size}")
    path = run_dir / CACHE_FILE
    # The teacher's dtype changes its log-probs; the loss chunk does not.
    expected = {"k": str(config.top_k), "temperature": repr(config.temperature), "samples": fingerprint,
                "dtype": str(teacher.dtype)}
    if path.exists():
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if {key: metadata.get(key) for key in expected} == expected:
            tensors = load_file(str(path))
            return tensors["log_probs"], tensors["ids"]
    values, ids = build_topk(teacher, samples.input_ids, config.top_k, config.temperature, config.batch_size, device, autocast,
                             config.loss_chunk)
    with atomic_output(path, force=True) as tmp:
        save_file({"log_probs": values, "ids": ids}, str(tmp), metadata=expected)
    return values, ids
