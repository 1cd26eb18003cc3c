"""How much each weight matters to the teacher's output distribution: the diagonal of its Fisher information.

Near the teacher, the KL from the teacher to a model with weights W + ΔW is, to second order,
    KL ≈ ½ Σ F_ij ΔW_ij²,  F = E_x E_{y ~ teacher(·|x)} [(∂ log p(y|x) / ∂W)²]  (per token),
so a quantization error ΔW of any type costs ½ Σ F ΔW² in held-out KL units: one number per
(tensor, type) that the type search (export/type_search.py) adds up across tensors. F is estimated
with labels sampled from the teacher itself (the true Fisher, not the empirical one on data labels)
and one backward pass per calibration window; the squared window gradient over its counted tokens
estimates the per-token diagonal when positions are roughly independent.

A gradient and a float32 sum for every weight at once would hold two more copies of the model; when they do not fit,
the weights are split into groups and the windows run once per group, only that group's weights taking gradients.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from recover_lora.errors import RecoverLoraError

# Of the RAM (or GPU memory) free once the teacher is built, the share one group may plan on: the rest is slack for
# the allocator and for what the caller holds beside (the type search's mapped source, its importance matrix).
FREE_MEMORY_SHARE = 0.9
# [tokens, vocab] fp32 arrays of one window's loss: the logits, their counted rows, log_softmax, its exp (the sampling
# distribution) and the gradient flowing back.
WINDOW_LOGIT_FP32_COPIES = 5
PROGRESS_LINES_PER_PASS = 16  # a pass over a few hundred windows reports every n-th one, and its last


def window_bytes(config, tokens: int) -> int:
    """fp32 bytes one calibration window of `tokens` holds through its forward and backward, beyond the weights and their
    gradients: every layer's saved activations and the loss's [tokens, vocab] arrays (`config`: an export ModelConfig)."""
    # Saved for backward per token and layer, counted as devices/memory_plan.train_phases counts a training step: the
    # norms' inputs and outputs, q/k/v before and after rope, the attention output, the MLP's gate, up, act(gate) and
    # their product, and a margin for backward's temporaries.
    per_layer = (8 * config.hidden_size + (3 * config.num_heads + 4 * config.num_kv_heads) * config.head_dim
                 + 4 * config.intermediate_size)
    return 4 * tokens * (config.num_layers * per_layer + WINDOW_LOGIT_FP32_COPIES * config.vocab_size)


def weight_groups(costs: Sequence[int], max_bytes: int) -> list[range]:
    """Consecutive runs of weights (indices into `costs`, each weight's gradient + sum bytes) of about equal cost, each
    within `max_bytes`; a weight over `max_bytes` makes a group alone. One group when all fit.

    Example:
        weight_groups([4, 4, 4, 4], 10)  # [range(0, 2), range(2, 4)]
    """
    total = sum(costs)
    if total <= max_bytes:
        return [range(len(costs))]
    # Closing a group once it reaches total / n (n: the fewest groups the budget allows) keeps the groups even, so
    # the peak is one n-th of the whole rather than the budget itself.
    target = total / math.ceil(total / max(max_bytes, 1))
    groups, start, held = [], 0, 0
    for i, cost in enumerate(costs):
        if i > start and (held + cost > max_bytes or held >= target):
            groups.append(range(start, i))
            start, held = i, 0
        held += cost
    groups.append(range(start, len(costs)))
    return groups


def _free_bytes_for_groups(weights: dict[str, torch.Tensor], device: torch.device, window: int) -> int:
    """Bytes one group's gradients and sums may take, from what is free now that the teacher is built, less `window`
    (one window's activations and logits)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)  # the sums leave the GPU with their group: only one group's stay
        return int(free * FREE_MEMORY_SHARE) - window
    import psutil  # free host RAM, as devices/memory_check.available_memory measures it for the plan

    result = sum(4 * p.numel() for p in weights.values())
    room = int(psutil.virtual_memory().available * FREE_MEMORY_SHARE) - window - result
    # On the host the finished groups' sums stay (they are the result), so a group adds only its gradients to the
    # whole result: budget its gradients + sums at that room scaled by their bytes over the gradients'.
    gradient = next(iter(weights.values())).element_size()
    return room * (gradient + 4) // gradient


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def kl_fisher_diagonal(source: str | Path | None, ids: torch.Tensor, counted: torch.Tensor, device: str = "cpu",
                       seed: int = 0, progress: Callable[[str], None] | None = None,
                       max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Per-token Fisher diagonal of every 2-D weight of the teacher, by Hugging Face tensor name (float32).

    A tied embedding gets both its uses (lookup and output projection) in one entry, as the GGUF stores one tensor.

    Args:
        max_bytes: what one group's gradients and Fisher sums (fp32) may take; weights past it are split into groups,
            each a pass over every window. Default: what this machine has free once the teacher is built (on the host,
            less the whole result and one window's activations). The result does not depend on it beyond float rounding.

    Example:
        ids, counted, _ = calibration_windows(None, "runs/synth", None, max_samples=32)
        fisher = kl_fisher_diagonal(None, ids, counted)
    """
    from recover_lora.recovery.student import build_teacher

    if ids.ndim != 2 or ids.shape != counted.shape:
        raise RecoverLoraError(f"calibration ids {tuple(ids.shape)} and their counted mask {tuple(counted.shape)} must be [n, seq] alike")
    if max_bytes is not None and max_bytes <= 0:
        raise RecoverLoraError(f"max_bytes={max_bytes} for the Fisher's gradients must be > 0")
    tokens = int(counted.to(torch.bool).sum())
    if tokens == 0:
        raise RecoverLoraError("the calibration windows count no token; give samples or text with content")
    say = progress or (lambda message: None)
    model, config = build_teacher(source)
    gc.collect()  # a GGUF reader's dequantized leftovers sit in reference cycles: free them before measuring what is free
    device = torch.device(device)
    model.to(device)
    weights = {name: p for name, p in model.named_parameters() if p.ndim == 2}
    costs = [p.numel() * (p.element_size() + 4) for p in weights.values()]
    if max_bytes is None:
        max_bytes = max(_free_bytes_for_groups(weights, device, window_bytes(config, ids.shape[1])), max(costs))
    groups = weight_groups(costs, max_bytes)
    names = list(weights)
    if len(groups) > 1:
        say(f"Fisher: gradients and sums of all weights take {_mib(sum(costs))}, {_mib(max_bytes)} allowed: "
            f"{len(groups)} passes over the windows, one group of weights each")
    # Labels are drawn once, in the first pass, so every group differentiates the same sampled tokens.
    generator = torch.Generator(device="cpu").manual_seed(seed)
    labels: dict[int, torch.Tensor] = {}
    every = max(1, ids.shape[0] // PROGRESS_LINES_PER_PASS)
    fisher: dict[str, np.ndarray] = {}
    for g, members in enumerate(groups):
        group = {names[j]: weights[names[j]] for j in members}
        sums = _squared_gradients(model, group, ids, counted, labels, generator,
                                  lambda i: say(f"Fisher: group {g + 1}/{len(groups)}, window {i + 1}/{ids.shape[0]}")
                                  if (i + 1) % every == 0 or i + 1 == ids.shape[0] else None)
        for name in list(sums):  # on the CPU the array is a view of the sum itself; from a GPU, one tensor at a time
            fisher[name] = sums.pop(name).div_(tokens).cpu().numpy()
    del model, weights, group
    gc.collect()  # the teacher goes before the caller quantizes, even if a reference cycle holds it
    return fisher


def _squared_gradients(model, group: dict[str, torch.Tensor], ids: torch.Tensor, counted: torch.Tensor,
                       labels: dict[int, torch.Tensor], generator: torch.Generator, done: Callable[[int], None]) -> dict[str, torch.Tensor]:
    """One pass over the windows: Σ over windows of each `group` weight's squared gradient of the sampled tokens'
    log-likelihood (float32). A window's labels are drawn into `labels` the first time it is seen."""
    device = next(iter(group.values())).device
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in group)
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in group.items()}
    for i in range(ids.shape[0]):
        rows = counted[i].to(torch.bool)
        if not rows.any():
            continue
        logits = model(input_ids=ids[i : i + 1].to(device), use_cache=False).logits[0][rows.to(device)].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        if i not in labels:
            labels[i] = torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=generator).to(device)
        (-log_probs.gather(1, labels[i]).sum()).backward()
        for name, parameter in group.items():
            gradient = parameter.grad.float()
            sums[name].addcmul_(gradient, gradient)  # in place: no squared copy of the largest weight
            parameter.grad = None
        done(i)
    return sums
