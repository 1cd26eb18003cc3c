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


def file_rows(files: list, heldout_reports: list[dict], bench_records: list[dict]) -> dict[str, dict]:
    """Per GGUF (by file name): bytes on disk, bits per weight over the model's own parameters, held-out KL and
    perplexity (the `recover-lora heldout --json` report whose base is that file) and decode tok/s with its ratio to
    the bench's baseline (median of the interleaved repeats, at the shallowest depth of `recover-lora bench`)."""
    from pathlib import Path

    from recover_lora.export.gguf_info import summarize_gguf

    heldout = {}
    for report in heldout_reports:
        if report.get("adapter") is None:
            student = next(row for row in report["rows"] if row["model"] == "student")
            heldout[Path(report["base"]).resolve()] = student
    depth = min((r["depth"] for r in bench_records), default=None)
    decode = {Path(r["model"]["path"]).resolve(): r for r in bench_records if r["depth"] == depth and r.get("adapter") is None}
    rows = {}
    for path in map(Path, files):
        summary = summarize_gguf(path)
        kl_row, bench = heldout.get(path.resolve(), {}), decode.get(path.resolve())
        ratio = bench["ratio_vs_baseline"]["tg"]["median"] if bench and bench.get("ratio_vs_baseline") else (1.0 if bench else None)
        rows[path.name] = {"bytes": summary.file_bytes, "bpw": summary.file_bits_per_weight, "kl": kl_row.get("kl_to_teacher"),
                           "perplexity": kl_row.get("perplexity"), "decode": bench["tg_tokens_per_s"]["median"] if bench else None,
                           "decode_ratio": ratio, "depth": depth}
    return rows


def markdown_table(rows: Mapping[str, Mapping], baseline: str | None = None) -> str:
    """The rows of `file_rows` as a Markdown table with each file's dominators (bytes, KL, decode tok/s)."""
    beaten = dominated_by({label: {"bytes": r["bytes"], "kl": r["kl"], "decode": r["decode"]} for label, r in rows.items()},
                          {"bytes": "min", "kl": "min", "decode": "max"})

    def cell(value, spec):
        return "—" if value is None else format(value, spec)

    lines = [f"| file | MB | bits/weight | KL to teacher | perplexity | decode tok/s | decode vs {baseline or 'the first'} | dominated by |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['bytes'] / 1e6:.1f} | {r['bpw']:.2f} | {cell(r['kl'], '.4f')} | {cell(r['perplexity'], '.2f')} | "
                     f"{cell(r['decode'], '.1f')} | {cell(r['decode_ratio'], '.2f')} | {', '.join(beaten[label]) or '— (front)'} |")
    return "\n".join(lines)
