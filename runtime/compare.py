"""`recover-lora compare`: the paper's accuracy table from several `eval` result files.

Columns are the variants (by their labels, e.g. teacher, w4, gateup, gateup+adapter); rows are
tasks, each with the task's reported metric and its 95 % CI, plus the task average (documents
resampled within each task). Recovery =
(acc_recovered - acc_quantized) / (acc_teacher - acc_quantized), with a paired bootstrap CI
(documents resampled jointly for the three variants). Where the teacher-quantized gap's CI
includes 0 there is nothing measurable to recover, and the row is marked "not significant".
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from recover_lora.errors import RecoverLoraError
from recover_lora.runtime.evaluate import RESULT_KIND, SCHEMA_VERSION
from recover_lora.runtime.stats import Interval, macro_mean_ci, macro_recovery_ci, mean_ci, paired_difference_ci, recovery_ci

DEFAULT_ROLES = {"teacher": "teacher", "quantized": "gateup", "recovered": "gateup+adapter"}
NOT_SIGNIFICANT = "not significant"


def load_result(path: str | os.PathLike) -> dict:
    """Read and check one `recover-lora eval` results file."""
    path = Path(path)
    if not path.is_file():
        raise RecoverLoraError(f"results file {path} does not exist; make it with `recover-lora eval ... -o {path}`")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecoverLoraError(f"{path} is not JSON ({e.msg}); give a file written by `recover-lora eval`") from None
    if not isinstance(result, dict) or result.get("kind") != RESULT_KIND:
        raise RecoverLoraError(f"{path} is not a `recover-lora eval` results file")
    if result.get("schema_version") != SCHEMA_VERSION:
        raise RecoverLoraError(f"{path} has schema_version {result.get('schema_version')!r}; this version reads {SCHEMA_VERSION}")
    if not result.get("tasks"):
        raise RecoverLoraError(f"{path} holds no finished task; rerun its `recover-lora eval` to resume it")
    return result


@dataclass
class TaskRow:
    task: str
    metric: str
    n: int  # documents every variant answered
    scores: dict[str, Interval]  # label -> accuracy with CI
    gap: Interval | None = None  # teacher - quantized
    recovery: Interval | None = None

    @property
    def significant(self) -> bool | None:
        if self.gap is None:
            return None
        return not self.gap.contains(0.0)


@dataclass
class Comparison:
    labels: list[str]
    rows: list[TaskRow]
    average: TaskRow | None
    roles: dict[str, str] | None  # role -> label, when recovery could be computed
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        def interval(i: Interval | None):
            return None if i is None else {"value": _finite(i.value), "ci95": [_finite(i.low), _finite(i.high)]}

        def row(r: TaskRow) -> dict:
            return {
                "task": r.task,
                "metric": r.metric,
                "n": r.n,
                "scores": {k: interval(v) for k, v in r.scores.items()},
                "gap_teacher_minus_quantized": interval(r.gap),
                "recovery": interval(r.recovery),
                "significant": r.significant,
            }

        return {
            "labels": self.labels,
            "roles": self.roles,
            "rows": [row(r) for r in self.rows],
            "average": row(self.average) if self.average else None,
            "notes": self.notes,
        }


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


def _paired_scores(results: dict[str, dict], task: str, metric: str) -> tuple[int, dict[str, list[float]]]:
    """Per-document scores of `task` restricted to documents every variant answered."""
    by_label = {}
    for label, result in results.items():
        samples = result["tasks"][task]["samples"]
        by_label[label] = {d: (h, s) for d, h, s in zip(samples["doc_id"], samples["doc_hash"], samples[metric])}
    common = sorted(set.intersection(*(set(v) for v in by_label.values())))
    for doc in common:
        hashes = {by_label[label][doc][0] for label in by_label}
        if len(hashes) > 1:
            raise RecoverLoraError(
                f"task {task} document {doc} differs between result files; they were made with different data or task versions"
            )
    return len(common), {label: [by_label[label][d][1] for d in common] for label in by_label}


def compare_results(paths: list[str | os.PathLike], roles: dict[str, str] | None = None) -> Comparison:
    """Build the comparison of several result files (one per variant, distinct labels).

    Args:
        paths: `recover-lora eval` result files, in column order.
        roles: {"teacher": label, "quantized": label, "recovered": label}; default
            teacher / gateup / gateup+adapter. Recovery is computed when all three are present.

    Example:
        table = compare_results(["teacher.json", "w4.json", "gateup.json", "adapter.json"])
        print(format_comparison(table))
    """
    if not paths:
        raise RecoverLoraError("give at least one results file")
    results: dict[str, dict] = {}
    for path in paths:
        result = load_result(path)
        label = result["label"]
        if label in results:
            raise RecoverLoraError(f"two results files carry the label {label!r}; rerun eval with distinct --label values")
        results[label] = result
    labels = list(results)
    roles = dict(DEFAULT_ROLES | (roles or {}))
    notes = []
    missing_roles = [f"{role}={label!r}" for role, label in roles.items() if label not in results]
    if missing_roles:
        notes.append(f"no recovery column: no results labelled {', '.join(missing_roles)} (labels: {', '.join(labels)})")
        roles = None
    tasks = [t for t in results[labels[0]]["tasks"] if all(t in r["tasks"] for r in results.values())]
    skipped = sorted({t for r in results.values() for t in r["tasks"]} - set(tasks))
    if skipped:
        notes.append(f"tasks not in every file are left out: {', '.join(skipped)}")
    if not tasks:
        raise RecoverLoraError("the result files share no task; evaluate them on the same --tasks")

    rows, triples = [], []
    per_task: dict[str, list[list[float]]] = {}
    for task in tasks:
        metric = results[labels[0]]["tasks"][task]["metric"]
        n, scores = _paired_scores(results, task, metric)
        if n == 0:
            notes.append(f"{task}: no document in common; left out")
            continue
        row = TaskRow(task, metric, n, {label: mean_ci(s) for label, s in scores.items()})
        for label, s in scores.items():
            per_task.setdefault(label, []).append(s)
        if roles:
            t, q, r = (scores[roles[k]] for k in ("teacher", "quantized", "recovered"))
            row.gap = paired_difference_ci(t, q)
            row.recovery = recovery_ci(t, q, r)
            triples.append((t, q, r))
        rows.append(row)
    average = None
    if rows:
        average = TaskRow("average", "mean", sum(r.n for r in rows), {l: macro_mean_ci(per_task[l]) for l in labels})
        if roles and triples:
            average.recovery, average.gap = macro_recovery_ci(triples)
    return Comparison(labels=labels, rows=rows, average=average, roles=roles, notes=notes)


def _percent(i: Interval | None) -> str:
    if i is None or math.isnan(i.value):
        return "-"
    low = "?" if math.isnan(i.low) else f"{100 * i.low:.0f}"
    high = "?" if math.isnan(i.high) else f"{100 * i.high:.0f}"
    return f"{100 * i.value:.0f}% [{low}, {high}]"


def _recovery_text(row: TaskRow) -> str:
    if row.recovery is None:
        return "-"
    if row.significant is False:
        return NOT_SIGNIFICANT if math.isnan(row.recovery.value) else f"{_percent(row.recovery)} ({NOT_SIGNIFICANT})"
    return _percent(row.recovery)


def table_rows(table: Comparison) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison (for text or markdown)."""
    header = ["task", "metric", "n"] + table.labels + (["gap T-Q", "recovery"] if table.roles else [])
    cells = []
    for row in table.rows + ([table.average] if table.average else []):
        line = [row.task, row.metric, str(row.n)]
        line += [f"{100 * row.scores[l].value:.1f} [{100 * row.scores[l].low:.1f}, {100 * row.scores[l].high:.1f}]" for l in table.labels]
        if table.roles:
            gap = row.gap
            line.append("-" if gap is None else f"{100 * gap.value:+.1f} [{100 * gap.low:+.1f}, {100 * gap.high:+.1f}]")
            line.append(_recovery_text(row))
        cells.append(line)
    return header, cells


def format_comparison(table: Comparison) -> str:
    """Plain-text table, accuracies in %, 95 % CIs in brackets."""
    header, cells = table_rows(table)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(lines + [f"note: {n}" for n in table.notes])


def format_markdown(table: Comparison) -> str:
    """The same table in Markdown (for reports)."""
    header, cells = table_rows(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)
