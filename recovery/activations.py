"""Input statistics of a model's linear layers: Σ x² per column, token count, optionally Σ x xᵀ.

One forward pre-hook per `nn.Linear` of the decoder blocks (never the LM head) accumulates, over
the counted positions of every batch, the sum of squared inputs per column (what llama.cpp's
importance matrix holds) and, for the modules asked for, the full input Gram matrix XᵀX (what an
EoRA-style LoRA initialisation whitens with). Linears that read the same tensor (q/k/v, gate/up)
share one computation, and one XᵀX array: in² float64 per layer input, not per linear (a 4B model's
gate and up would otherwise hold two copies of 36 × 52 MB). Used by `recovery.imatrix`,
`recovery.lora_init` and `recovery.gptq`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from recover_lora.errors import RecoverLoraError

# A transformers *ForCausalLM keeps its decoder blocks at model.layers.N.
_BLOCK_MODULE_RE = re.compile(r"model\.layers\.\d+\..+")


@dataclass
class ActivationStats:
    """Statistics of one linear layer's input over `count` tokens."""

    sum_sq: np.ndarray  # float64 [in]: Σ x² per input column
    count: int  # tokens
    xtx: np.ndarray | None = None  # float64 [in, in]: Σ x xᵀ, where asked for

    def mean_sq(self) -> np.ndarray:
        """E[x²] per column."""
        return self.sum_sq / max(self.count, 1)

    def covariance(self) -> np.ndarray | None:
        """E[x xᵀ] (uncentred, as EoRA uses it), or None if not collected."""
        return None if self.xtx is None else self.xtx / max(self.count, 1)


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear of the decoder blocks by module name ('model.layers.0.mlp.gate_proj'); no LM head."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _BLOCK_MODULE_RE.fullmatch(name)}
    if not found:
        raise RecoverLoraError("the model has no linear layers under model.layers.N; pass a plain transformers *ForCausalLM")
    return found


def counted_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions whose inputs are real text: every position up to the last training target of each row.

    `loss_mask` is 0 on prompts (real input, counted) and from the first EOS on (padding, not counted).
    """
    positions = torch.arange(loss_mask.shape[1]).expand_as(loss_mask)
    last = torch.where(loss_mask.any(dim=1), (positions * loss_mask).amax(dim=1), torch.full_like(loss_mask[:, 0], -1, dtype=torch.long))
    return positions <= last[:, None]


def token_batches(input_ids: torch.Tensor, counted: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, counted) batches of `batch_size` rows, in order."""
    for start in range(0, input_ids.shape[0], batch_size):
        yield input_ids[start : start + batch_size], counted[start : start + batch_size]


def collect_activation_stats(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    modules: Collection[str] | None = None,
    covariance: Collection[str] = (),
    device: str | torch.device = "cpu",
) -> dict[str, ActivationStats]:
    """Run `model` over `batches` of (input_ids [B, T], counted [B, T] bool) and collect input statistics.

    Args:
        model: a transformers *ForCausalLM (eval mode; nothing is trained).
        batches: token ids and which positions to count (e.g. `counted_positions(loss_mask)`).
        modules: linear module names to hook (default: every linear of the decoder blocks).
        covariance: module names that also get the full XᵀX (memory: in² float64 per distinct input; linears
            reading the same tensor get the same array — copy it before changing it in place).
        device: where the forward passes run.

    Example:
        stats = collect_activation_stats(teacher, token_batches(ids, counted_positions(mask), 8))
        stats["model.layers.0.mlp.gate_proj"].mean_sq()  # E[x²] per input column
    """
    linears = decoder_linears(model)
    names = list(linears) if modules is None else list(modules)
    unknown = [n for n in list(names) + list(covariance) if n not in linears]
    if unknown:
        raise RecoverLoraError(f"{unknown[0]} is not a linear layer of the model's decoder blocks")
    wants_xtx = set(covariance)
    stats = {n: ActivationStats(np.zeros(linears[n].in_features), 0) for n in names}
    # XᵀX owner of each module asked for it: the first such module to read its input tensor (found in the
    # first forward; the order of the calls is the model's). Owners accumulate; the others alias the array.
    xtx_owner: dict[str, str] = {}
    state: dict = {"counted": None, "x": None, "rows": None, "sum_sq": None, "xtx": None, "owner": None}

    def hook(name: str):
        def pre_hook(module, args):
            x = args[0]
            if x is not state["x"]:  # a new input tensor (q/k/v and gate/up read the same one)
                rows = x.detach()[state["counted"]].double()
                state.update(x=x, rows=rows, sum_sq=(rows * rows).sum(dim=0).cpu().numpy(), xtx=None, owner=None)
            entry = stats[name]
            entry.sum_sq += state["sum_sq"]
            entry.count += state["rows"].shape[0]
            if name in wants_xtx:
                if state["owner"] is None:  # the first module asked for XᵀX to read this tensor owns its array
                    state["owner"] = name
                owner = xtx_owner.setdefault(name, state["owner"])
                if owner != name:
                    entry.xtx = stats[owner].xtx
                    return
                if state["xtx"] is None:
                    state["xtx"] = (state["rows"].T @ state["rows"]).cpu().numpy()
                if entry.xtx is None:
                    entry.xtx = np.zeros((linears[name].in_features, linears[name].in_features))
                entry.xtx += state["xtx"]

        return pre_hook

    handles = [linears[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for ids, counted in batches:
                state.update(counted=counted.to(device), x=None, rows=None, sum_sq=None, xtx=None, owner=None)
                if counted.any():
                    # The decoder alone where the model has one (model.model): the LM head's logits are not needed.
                    getattr(model, "model", model)(input_ids=ids.to(device))
    finally:
        for handle in handles:
            handle.remove()
        state.clear()
    for name in wants_xtx:  # no counted position at all: an empty sum, as for sum_sq
        if stats[name].xtx is None:
            stats[name].xtx = np.zeros((linears[name].in_features, linears[name].in_features))
    return stats
