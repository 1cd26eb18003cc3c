"""Which variant is worth deploying: Pareto dominance over size, accuracy and speed.

A variant dominates another when it is at least as good on every axis and strictly better on one.
Axes a row lacks (a variant without a bench record, say) are left out of that comparison.

Example:
    rows = {"w4": {"bytes": 112, "kl": 0.01, "tok_s": 99}, "gateup": {"bytes": 96, "kl": 0.41, "tok_s": 105}}
    dominated_by(rows, {"bytes": "min", "kl": "min", "tok_s": "max"})   # {"w4": [], "gateup": []}
"""

from __future__ import annotations

from collections.abc import Mapping

from recover_lora.errors import RecoverLoraError

DIRECTIONS = ("min", "max")


def _at_least_as_good(a: float, b: float, direction: str) -> bool:
    return a <= b if direction == "min" else a >= b


def dominates(a: Mapping[str, float], b: Mapping[str, float], axes: Mapping[str, str]) -> bool:
    shared = [axis for axis in axes if a.get(axis) is not None and b.get(axis) is not None]
    if not shared:
        return False
    return all(_at_least_as_good(a[x], b[x], axes[x]) for x in shared) and any(a[x] != b[x] for x in shared)


def dominated_by(rows: Mapping[str, Mapping[str, float]], axes: Mapping[str, str]) -> dict[str, list[str]]:
    """label -> the labels that dominate it (empty: on the Pareto front)."""
    bad = [f"{axis}={direction!r}" for axis, direction in axes.items() if direction not in DIRECTIONS]
    if bad:
        raise RecoverLoraError(f"Pareto axis {bad[0]} must be 'min' or 'max'")
    return {label: [other for other in rows if other != label and dominates(rows[other], row, axes)] for label, row in rows.items()}
