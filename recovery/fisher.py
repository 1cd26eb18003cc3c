"""How much each weight matters to the teacher's output distribution: the diagonal of its Fisher information.

Near the teacher, the KL from the teacher to a model with weights W + ΔW is, to second order,
    KL ≈ ½ Σ F_ij ΔW_ij²,  F = E_x E_{y ~ teacher(·|x)} [(∂ log p(y|x) / ∂W)²]  (per token),
so a quantization error ΔW of any type costs ½ Σ F ΔW² in held-out KL units: one number per
(tensor, type) that the type search (export/type_search.py) adds up across tensors. F is estimated
with labels sampled from the teacher itself (the true Fisher, not the empirical one on data labels)
and one backward pass per calibration window; the squared window gradient over its counted tokens
estimates the per-token diagonal when positions are roughly independent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recover_lora.errors import RecoverLoraError


def kl_fisher_diagonal(source: str | Path | None, ids: torch.Tensor, counted: torch.Tensor, device: str = "cpu",
                       seed: int = 0, progress=None) -> dict[str, np.ndarray]:
    """Per-token Fisher diagonal of every 2-D weight of the teacher, by Hugging Face tensor name (float32).

    A tied embedding gets both its uses (lookup and output projection) in one entry, as the GGUF stores one tensor.

    Example:
        ids, counted, _ = calibration_windows(None, "runs/synth", None, max_samples=32)
        fisher = kl_fisher_diagonal(None, ids, counted)
    """
    from recover_lora.recovery.student import build_teacher

    if ids.ndim != 2 or ids.shape != counted.shape:
        raise RecoverLoraError(f"calibration ids {tuple(ids.shape)} and their counted mask {tuple(counted.shape)} must be [n, seq] alike")
    model, _ = build_teacher(source)
    model.to(device)
    weights = {name: p for name, p in model.named_parameters() if p.ndim == 2}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in weights)
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in weights.items()}
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tokens = 0
    for i in range(ids.shape[0]):
        rows = counted[i].to(torch.bool)
        if not rows.any():
            continue
        logits = model(input_ids=ids[i : i + 1].to(device)).logits[0][rows.to(device)].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        labels = torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=generator).to(device)
        (-log_probs.gather(1, labels).sum()).backward()
        for name, parameter in weights.items():
            sums[name] += parameter.grad.float() ** 2
            parameter.grad = None
        tokens += int(rows.sum())
        if progress:
            progress(f"Fisher: window {i + 1}/{ids.shape[0]}")
    if tokens == 0:
        raise RecoverLoraError("the calibration windows count no token; give samples or text with content")
    return {name: (total / tokens).cpu().numpy() for name, total in sums.items()}
