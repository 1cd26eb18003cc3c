"""LoRA A and B from the quantization error, so that step 0 already corrects part of it.

- zero: peft's own init (B = 0): step 0 is exactly the quantized model.
- svd: the rank-r truncated SVD of ΔW = W_teacher − W_student, the best rank-r correction in the
  plain Frobenius norm (Eckart–Young).
- eora: the best rank-r correction in the activation-weighted norm E‖(ΔW − BA)x‖² (EoRA, arXiv
  2410.21271; QERA, arXiv 2410.06040): with C = E[x xᵀ] = QΛQᵀ, the rank-r SVD of ΔW·Q√Λ mapped back
  with (Q√Λ)⁻¹. A module whose full C does not fit the memory budget gets the diagonal √E[x²]
  weighting instead (QERA's cheap variant). Directions that never see activation (width padding)
  are left out: nothing is corrected there.

Everything is in Hugging Face layout: the student built from the GGUF already is (read_gguf undoes
llama.cpp's q/k rotary permutation) and so is the teacher; adapter_gguf.py permutes on export.
W_teacher is the teacher padded exactly as the student was, and the activation statistics come from
the padded teacher on the training samples (never held-out text).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from recover_lora.errors import RecoverLoraError
from recover_lora.recovery.activations import ActivationStats

INIT_METHODS = ("zero", "svd", "eora")
# Eigenvalues (or mean squares) below this fraction of the largest count as "no activation".
RELATIVE_ACTIVATION_FLOOR = 1e-10
# Full input covariances (float64, in² each) are collected for modules until this many bytes.
COVARIANCE_BUDGET_BYTES = 2 << 30


def whitening(stats: ActivationStats) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(basis [in, k] or None for the coordinate axes, scale [k] = √eigenvalue, kept [in] mask or None).

    With the full covariance: its eigenvectors with a non-zero eigenvalue. Without: the columns with
    a non-zero E[x²] (basis None, `kept` says which columns).
    """
    covariance = stats.covariance()
    if covariance is not None:
        eigenvalues, vectors = np.linalg.eigh(covariance)
        keep = eigenvalues > RELATIVE_ACTIVATION_FLOOR * max(float(eigenvalues.max()), 0.0)
        return vectors[:, keep], np.sqrt(eigenvalues[keep]), None
    mean_sq = stats.mean_sq()
    keep = mean_sq > RELATIVE_ACTIVATION_FLOOR * max(float(mean_sq.max()), 0.0)
    return None, np.sqrt(mean_sq[keep]), keep


def low_rank_factors(delta: np.ndarray, rank: int, weighting: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A [r', in] and B [out, r'] (r' ≤ rank) with B @ A the best rank-r approximation of `delta`.

    Best in the plain Frobenius norm (weighting None) or in the norm weighted by `whitening(stats)`.
    Each rank-one term is balanced (‖B[:, k]‖ = ‖A[k]‖), so both factors start at the same scale.
    """
    delta = np.asarray(delta, dtype=np.float64)
    if weighting is None:
        target = delta
    else:
        basis, scale, kept = weighting
        target = (delta @ basis if basis is not None else delta[:, kept]) * scale
    u, s, vt = np.linalg.svd(target, full_matrices=False)
    r = int(min(rank, np.count_nonzero(s > s[0] * 1e-12))) if s.size and s[0] > 0 else 0
    u, s, vt = u[:, :r], s[:r], vt[:r]
    if weighting is None:
        a = vt
    else:
        basis, scale, kept = weighting
        whitened = vt / scale  # (Q√Λ)⁻¹ on the kept directions
        if basis is not None:
            a = whitened @ basis.T
        else:
            a = np.zeros((r, delta.shape[1]))
            a[:, kept] = whitened
    b = u * s
    balance = np.sqrt(np.linalg.norm(a, axis=1) / np.maximum(np.linalg.norm(b, axis=0), 1e-300))
    return a / balance[:, None], b * balance


def _teacher_like_student(teacher_source, student):
    """The teacher's weights padded exactly as the student's GGUF was (nothing loaded yet: lazy)."""
    from recover_lora.export.pad import pad_model
    from recover_lora.export.sources import load_model

    weights = load_model(teacher_source)
    widths = (weights.config.hidden_size, weights.config.intermediate_size)
    if widths != (student.config.hidden_size, student.config.intermediate_size):
        weights = pad_model(weights)
    return weights


def compute_lora_init(
    method: str,
    student,
    modules: list[str],
    teacher_source: str | Path | None,
    rank: int,
    input_ids: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    covariance_budget_bytes: int = COVARIANCE_BUDGET_BYTES,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per target module, (A, B) with B @ A ≈ W_teacher − W_student (before peft's alpha / r scaling).

    Args:
        method: "zero" (returns {}), "svd" or "eora".
        student: the student (transformers model from `build_student`), before LoRA wrapping.
        modules: the target module names ('model.layers.0.mlp.gate_proj', ...).
        teacher_source: the full-precision model (None: the default model).
        rank: LoRA rank r.
        input_ids, loss_mask: eora: the training samples the activation statistics come from.

    Example:
        factors = compute_lora_init("eora", student, modules, None, 16, samples.input_ids[:64], samples.loss_mask[:64])
        apply_lora_init(peft_model, factors)
    """
    if method not in INIT_METHODS:
        raise RecoverLoraError(f"--init {method!r} is unknown; use one of: {', '.join(INIT_METHODS)}")
    if method == "zero":
        return {}
    weights = _teacher_like_student(teacher_source, student)
    stats: dict[str, ActivationStats] = {}
    if method == "eora":
        from recover_lora.export.torch_model import to_hf_model
        from recover_lora.recovery.activations import collect_activation_stats, counted_positions, token_batches

        if input_ids is None or loss_mask is None:
            raise RecoverLoraError("--init eora needs training samples for its activation statistics")
        teacher = to_hf_model(weights, dtype=torch.float32, device=str(device))
        covariance, budget = [], covariance_budget_bytes
        for name in modules:
            size = 8 * teacher.get_submodule(name).in_features ** 2
            if size <= budget:
                covariance.append(name)
                budget -= size
        batches = token_batches(input_ids, counted_positions(loss_mask), batch_size)
        stats = collect_activation_stats(teacher, batches, modules=modules, covariance=covariance, device=device)
        del teacher
    factors = {}
    for name in modules:
        student_weight = student.get_submodule(name).weight.detach().double().cpu().numpy()
        teacher_weight = np.asarray(weights.tensors[f"{name}.weight"], dtype=np.float64)
        if teacher_weight.shape != student_weight.shape:
            raise RecoverLoraError(
                f"{name}: the teacher's weight is {teacher_weight.shape} but the student's is {student_weight.shape}; "
                "pass the model the GGUF was exported from as --teacher"
            )
        weighting = whitening(stats[name]) if name in stats else None
        factors[name] = low_rank_factors(teacher_weight - student_weight, rank, weighting)
    return factors


def apply_lora_init(peft_model, factors: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write (A, B) into peft's lora_A / lora_B, divided by √scaling each (peft adds scaling · B A).

    Components beyond the factors' rank keep peft's own init (random A, zero B), so they still train.
    """
    root = peft_model.base_model.model
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = root.get_submodule(name)
            adapter = layer.active_adapters[0]
            lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            r = a.shape[0]
            if r > lora_a.shape[0]:
                raise RecoverLoraError(f"internal error: init of rank {r} for a LoRA of rank {lora_a.shape[0]} on {name}")
            factor = 1.0 / math.sqrt(layer.scaling[adapter])
            lora_a[:r] = torch.from_numpy(a * factor).to(lora_a.dtype)
            lora_b[:, :r] = torch.from_numpy(b * factor).to(lora_b.dtype)
