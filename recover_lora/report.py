"""The pipeline's report: DIR/report.md, DIR/report.html and its plots, from the step outputs.

Every number in the report is read from a file a pipeline step wrote (eval/*.json,
heldout.json, bench.jsonl, roofline.json, the GGUFs), so rerunning the pipeline's command
reproduces it.
"""

from __future__ import annotations

import json
from pathlib import Path

from recover_lora.fileio import atomic_output

ACCURACY_PLOT = "accuracy.png"
SPEED_PLOT = "tokens_per_s.png"


def recovered_fraction(teacher: float, quantized: float, recovered: float) -> float | None:
    """Share of the teacher-to-quantized gap the adapter closes (None when there is no gap)."""
    gap = quantized - teacher
    return None if abs(gap) < 1e-12 else (quantized - recovered) / gap


def heldout_section(heldout: dict) -> list[str]:
    rows = heldout["rows"]
    lines = [
        f"Held-out text: `{Path(heldout['text']).name}` ({heldout['windows']} windows × {heldout['window']} tokens; "
        "never used in training). KL is KL(teacher ‖ model) per token; top-1 is agreement with the teacher's argmax.",
        "",
        "| model | KL to teacher | top-1 agreement | perplexity |",
        "|---|---:|---:|---:|",
    ]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['kl_to_teacher']:.3f} | {row['top1_agreement']:.3f} | {row['perplexity']:.2f} |")
    t, q, r = rows["teacher"], rows["gateup"], rows["gateup+adapter"]
    kl_back = recovered_fraction(0.0, q["kl_to_teacher"], r["kl_to_teacher"])
    ppl_back = recovered_fraction(t["perplexity"], q["perplexity"], r["perplexity"])
    lines += ["", f"Recover-LoRA closes **{kl_back:.0%}** of the gateup model's KL to the teacher and "
                  f"**{ppl_back:.0%}** of its perplexity gap ({q['perplexity']:.2f} → {r['perplexity']:.2f}; teacher {t['perplexity']:.2f})."]
    return lines


def files_section(export_summary: dict) -> list[str]:
    lines = ["| file | size (MiB) | bits/weight, linear layers | bits/weight, whole file | tensor types |", "|---|---:|---:|---:|---|"]
    for policy, info in export_summary["files"].items():
        types = ", ".join(f"{k} ×{v}" for k, v in sorted(info["types"].items()))
        lines.append(f"| {policy}.gguf | {info['file_bytes'] / 2**20:.1f} | {info['linear_bpw']:.3f} | {info['file_bpw']:.3f} | {types} |")
    return lines


def speed_rows(records: list[dict], roofline: dict) -> list[dict]:
    """One row per (variant, depth): measured decode/prefill tokens/s, ratio to w4, roofline prediction."""
    predictions = {
        label: {row["ctx"]: row["decode_tokens_per_s"] for row in rows} for label, rows in roofline["predictions"].items()
    }
    rows = []
    for record in records:
        label, depth = record["pipeline_label"], record["depth"]
        tg, pp = record["tg_tokens_per_s"], record["pp_tokens_per_s"]
        ratio = record["ratio_vs_baseline"]["tg"] if record.get("ratio_vs_baseline") else None
        predicted = predictions.get(label, {}).get(depth)
        baseline = predictions.get("w4", {}).get(depth)
        rows.append({
            "label": label, "depth": depth, "tg_median": tg["median"], "tg_min": tg["min"], "tg_max": tg["max"],
            "pp_median": pp["median"], "ratio": ratio, "predicted": predicted,
            "predicted_ratio": predicted / baseline if predicted and baseline else None,
            "load_average": record.get("load_average"),
        })
    return rows


def profile_text(profile: dict) -> str:
    """'read bandwidth 33.6 GB/s; matrix-vector rates (G weights/s): Q4_K 60.1, ...' from a profile table."""
    text = f"effective bandwidth {profile.get('effective_bandwidth_GB_per_s', float('nan')):.1f} GB/s"
    rates = profile.get("matvec_weights_per_s")
    if rates:
        text += "; llama.cpp matrix-vector rates (G weights/s): " + ", ".join(f"{t} {r / 1e9:.1f}" for t, r in rates.items())
    if profile.get("attention_compute_TFLOP_per_s"):
        text += f"; llama.cpp attention {profile['attention_compute_TFLOP_per_s'] * 1e3:.1f} GFLOP/s"
    return text


def speed_section(rows: list[dict], records: list[dict], roofline: dict) -> list[str]:
    first = records[0]
    settings = first["settings"]
    lines = [
        f"Measured with `recover-lora bench` semantics: {settings['repeats']} interleaved repeats, {first['n_gen']} generated "
        f"tokens and {first['n_prompt']}-token prompts, {settings['threads']} threads, at each KV-cache depth. "
        "Ratios are per-repeat decode ratios to w4 (median, min–max). Predicted: the roofline model (`devices/roofline.py`) "
        f"on this machine's profile as probed by the same run ({profile_text(roofline['profile'])}).",
        "",
        "| variant | depth | decode tok/s (median, min–max) | prefill tok/s | decode vs w4 | roofline decode tok/s | roofline vs w4 | measured / predicted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = "—" if row["ratio"] is None else f"{row['ratio']['median']:.3f} ({row['ratio']['min']:.2f}–{row['ratio']['max']:.2f})"
        predicted = "—" if row["predicted"] is None else f"{row['predicted']:.1f}"
        fraction = "—" if row["predicted"] is None else f"{row['tg_median'] / row['predicted']:.2f}"
        predicted_ratio = "—" if row["predicted_ratio"] is None or row["label"] == "w4" else f"{row['predicted_ratio']:.3f}"
        lines.append(
            f"| {row['label']} | {row['depth']} | {row['tg_median']:.1f} ({row['tg_min']:.1f}–{row['tg_max']:.1f}) | "
            f"{row['pp_median']:.0f} | {ratio} | {predicted} | {predicted_ratio} | {fraction} |"
        )
    loads = [r["load_average"][0] for r in rows if r.get("load_average")]
    if loads:
        lines += ["", f"1-minute load average during the runs: {min(loads):.1f}–{max(loads):.1f} (on {first['device'].get('cpu_cores_logical')} logical cores)."]
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_path: Path) -> None:
    fig.tight_layout()
    with atomic_output(out_path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    _pyplot().close(fig)


def plot_accuracy(comparison, out_path: Path) -> None:
    plt = _pyplot()
    labels = comparison.labels
    tasks = [row.task for row in comparison.rows]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 2), 4))
    for i, label in enumerate(labels):
        values = [row.scores[label].value for row in comparison.rows]
        errors = [[v - row.scores[label].low for v, row in zip(values, comparison.rows)],
                  [row.scores[label].high - v for v, row in zip(values, comparison.rows)]]
        ax.bar([t + (i - (len(labels) - 1) / 2) * width for t in range(len(tasks))], values, width, yerr=errors, capsize=2, label=label)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy (95 % CI)")
    ax.set_title("Accuracy per task and variant")
    ax.legend(fontsize=8)
    _save(fig, out_path)


def plot_speed(rows: list[dict], roofline: dict, out_path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, predictions) in enumerate(roofline["predictions"].items()):
        color = f"C{i}"
        ax.plot([p["ctx"] for p in predictions], [p["decode_tokens_per_s"] for p in predictions], "--", color=color, label=f"{label} (roofline)")
        measured = [r for r in rows if r["label"] == label]
        ax.errorbar([r["depth"] for r in measured], [r["tg_median"] for r in measured],
                    yerr=[[r["tg_median"] - r["tg_min"] for r in measured], [r["tg_max"] - r["tg_median"] for r in measured]],
                    fmt="o", color=color, capsize=3, label=f"{label} (measured)")
    ax.set_xlabel("tokens already in the KV cache")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode speed vs context: measured and predicted")
    ax.legend(fontsize=7)
    _save(fig, out_path)


def write_report(pipeline, commands: list[str]) -> Path:
    """Write report.md, report.html and the plots into the pipeline's folder."""
    import markdown

    from recover_lora.runtime.bench import read_records
    from recover_lora.runtime.compare import compare_results, format_markdown

    out = pipeline.out
    steps = pipeline.manifest.steps
    meta = pipeline.manifest.meta
    comparison = compare_results([pipeline.path["eval"] / f"{label}.json" for label in ("teacher", "w4", "gateup", "gateup+adapter")])
    records = read_records(pipeline.path["bench"])
    roofline = json.loads(pipeline.path["roofline"].read_text())
    rows = speed_rows(records, roofline)
    plot_accuracy(comparison, out / ACCURACY_PLOT)
    plot_speed(rows, roofline, out / SPEED_PLOT)
    device = records[0]["device"]
    eval_any = json.loads((pipeline.path["eval"] / "gateup.json").read_text())
    limit = eval_any["settings"].get("limit")
    total_seconds = sum(record.seconds for record in steps.values())
    lines = [
        f"# Recover-LoRA report: {meta.get('model', 'default')} ({meta.get('preset')})",
        "",
        f"Machine: {device.get('cpu_model')}, {device.get('cpu_cores_logical')} logical cores, "
        f"{(device.get('ram_bytes') or 0) / 2**30:.0f} GiB RAM, {device.get('os')} {device.get('os_release', '')}, "
        f"llama.cpp back end {device.get('backend')}. Steps took {total_seconds / 60:.1f} min in all "
        f"({', '.join(f'{k} {v.seconds:.0f} s' for k, v in steps.items())}).",
        "",
        "The teacher is the full-precision model (for the default model: SmolLM2-135M-Instruct's Q4_1 weights dequantized "
        "to float32, run in torch); every other variant runs in llama.cpp from its GGUF, the adapter as a llama.cpp LoRA GGUF.",
        "",
        "## Accuracy",
        "",
        f"lm-evaluation-harness tasks, {limit if limit else 'all'} documents per task (the same documents for every "
        "variant); 95 % bootstrap CIs. Recovery = (gateup+adapter − gateup) / (teacher − gateup), marked "
        "*not significant* where the teacher–gateup gap is inside the noise.",
        "",
        format_markdown(comparison),
        "",
        f"![accuracy per task]({ACCURACY_PLOT})",
        "",
        "## Closeness to the teacher on held-out text",
        "",
        *heldout_section(json.loads(pipeline.path["heldout"].read_text())),
        "",
        "## Speed on this machine",
        "",
        *speed_section(rows, records, roofline),
        "",
        f"![tokens/s vs context]({SPEED_PLOT})",
        "",
        "## Files",
        "",
        *files_section(steps["export"].summary),
        "",
        f"Adapter: `train/adapter.gguf`, {(out / 'train' / 'adapter.gguf').stat().st_size / 2**20:.2f} MiB, "
        f"LoRA on {len(steps['train'].summary.get('targets', []))} tensors, {steps['train'].summary.get('steps')} training steps.",
        "",
        "## How this was made",
        "",
        "```sh",
        *commands,
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()) + f"; Python {meta.get('python')}.",
        "",
    ]
    text = "\n".join(lines)
    with atomic_output(out / "report.md", force=True) as tmp:
        tmp.write_text(text)
    body = markdown.markdown(text, extensions=["tables", "fenced_code"])
    html = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Recover-LoRA report</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;line-height:1.45}"
        "table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .6em}"
        "th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}"
        "pre{background:#f6f6f6;padding:.8em;overflow-x:auto}</style></head><body>" + body + "</body></html>"
    )
    with atomic_output(out / "report.html", force=True) as tmp:
        tmp.write_text(html)
    return out / "report.md"
