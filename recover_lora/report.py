"""The pipeline's report: DIR/report.md, DIR/report.html and its plots, from the step outputs.

Every number in the report is read from DIR/pipeline.json (the run's preset, model, commands,
variants and step records) and the files the steps wrote (eval/*.json, heldout.json, bench.jsonl,
roofline.json, the GGUFs): `recover-lora report DIR` redraws it without running anything, and
rerunning the pipeline's command reproduces it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output
from recover_lora.manifest import MANIFEST_FILE, STEPS

ACCURACY_PLOT = "accuracy.png"
SPEED_PLOT = "tokens_per_s.png"
PARETO_PLOT = "pareto.png"
# Lower bytes and KL, higher accuracy and decode speed are better (recover_lora.pareto).
PARETO_AXES = {"bytes": "min", "kl": "min", "accuracy": "max", "decode": "max"}


def recovered_fraction(teacher: float, quantized: float, recovered: float) -> float | None:
    """Share of the teacher-to-quantized gap the adapter closes (None when there is no gap)."""
    gap = quantized - teacher
    return None if abs(gap) < 1e-12 else (quantized - recovered) / gap


def heldout_section(heldout: dict, roles: dict[str, str]) -> list[str]:
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
    t, q = rows[roles["teacher"]], rows[roles["quantized"]]
    lines.append("")
    for role in ("adapter", "recovered"):
        label = roles.get(role)
        if label not in rows:
            continue
        r = rows[label]
        kl_back = recovered_fraction(0.0, q["kl_to_teacher"], r["kl_to_teacher"])
        ppl_back = recovered_fraction(t["perplexity"], q["perplexity"], r["perplexity"])
        lines.append(f"- {label} closes **{kl_back:.0%}** of the {roles['quantized']} model's KL to the teacher and "
                     f"**{ppl_back:.0%}** of its perplexity gap ({q['perplexity']:.2f} → {r['perplexity']:.2f}; teacher {t['perplexity']:.2f}).")
    return lines


def pareto_rows(variants: dict, heldout_rows: dict, comparison, speed: list[dict], out: Path) -> dict[str, dict]:
    """Per deployable variant (ours and the stock baselines): bytes on disk (model + adapter), held-out KL and
    perplexity, average accuracy (where evaluated), decode tok/s at the shallowest benchmarked depth. The teacher
    is the reference, not a candidate."""
    averages = {label: score.value for label, score in comparison.average.scores.items()} if comparison.average else {}
    depth = min((row["depth"] for row in speed), default=None)
    decode = {row["label"]: row["tg_median"] for row in speed if row["depth"] == depth}
    rows = {}
    for label, variant in variants.items():
        if variant["model"] is None:
            continue
        files = [out / variant[key] for key in ("model", "lora") if variant.get(key)]
        rows[label] = {"bytes": sum(f.stat().st_size for f in files), "kl": heldout_rows.get(label, {}).get("kl_to_teacher"),
                       "perplexity": heldout_rows.get(label, {}).get("perplexity"), "accuracy": averages.get(label),
                       "decode": decode.get(label), "depth": depth}
    return rows


def pareto_section(rows: dict[str, dict]) -> list[str]:
    from recover_lora.pareto import dominated_by

    beaten = dominated_by(rows, PARETO_AXES)
    depth = next(iter(rows.values()))["depth"] if rows else None

    def cell(value, spec):
        return "—" if value is None else format(value, spec)

    lines = [
        f"Each deployable variant on the four axes a user trades: bytes on disk (model + adapter), held-out KL to the "
        f"teacher (and perplexity), average task accuracy, decode tok/s at depth {depth} on this machine. A variant is "
        "dominated when another is at least as good on every axis and better on one.",
        "",
        "| variant | MiB | KL to teacher | perplexity | avg accuracy | decode tok/s | dominated by |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['bytes'] / 2**20:.1f} | {cell(row['kl'], '.3f')} | {cell(row['perplexity'], '.2f')} | "
                     f"{cell(None if row['accuracy'] is None else 100 * row['accuracy'], '.1f')} | {cell(row['decode'], '.1f')} | "
                     f"{', '.join(beaten[label]) or '— (Pareto front)'} |")
    front = [label for label in rows if not beaten[label]]
    dominant = [label for label in front if all(label in beaten[other] for other in rows if other != label)]
    lines.append("")
    if dominant:
        lines.append(f"**{dominant[0]}** dominates every other variant.")
    else:
        lines.append(f"No variant dominates all others; the Pareto front is: {', '.join(front)}.")
    return lines


def plot_pareto(rows: dict[str, dict], out_path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, row in rows.items():
        if row["kl"] is None:
            continue
        ax.scatter(row["bytes"] / 2**20, row["kl"], s=40)
        speed = "" if row["decode"] is None else f" ({row['decode']:.0f} tok/s)"
        ax.annotate(label + speed, (row["bytes"] / 2**20, row["kl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("MiB on disk (model + adapter)")
    ax.set_ylabel("held-out KL to the teacher")
    ax.grid(alpha=0.3)
    _save(fig, out_path)


def files_section(files: dict[str, dict]) -> list[str]:
    """One row per file: bits per weight over the model's own parameters; a padded file's bits per stored weight beside."""
    any_info = next(iter(files.values()))
    lines = [f"Bits per weight are over the model's own {any_info['model_parameters']:,} parameters; a padded file also "
             "stores zeros, and its bits per *stored* weight (what earlier reports printed) stand beside.", "",
             "| file | size (MiB) | bits/weight, linear layers | bits/weight, whole file | padded: per stored weight | tensor types |",
             "|---|---:|---:|---:|---:|---|"]
    for name, info in files.items():
        types = ", ".join(f"{k} ×{v}" for k, v in sorted(info["types"].items()))
        padded = "—" if info.get("padded_file_bpw") is None else f"{info['padded_file_bpw']:.3f}"
        lines.append(f"| {name} | {info['file_bytes'] / 2**20:.1f} | {info['linear_bpw']:.3f} | {info['file_bpw']:.3f} | {padded} | {types} |")
    return lines


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} ×"


def search_section(search: dict, heldout_rows: dict, speed: list[dict], reference: str) -> list[str]:
    """What the type search chose, and its predictions beside what the held-out text and the bench measured."""
    depth = min((row["depth"] for row in speed), default=None)
    decode = {row["label"]: row["tg_median"] for row in speed if row["depth"] == depth}
    measured_ratio = decode["searched"] / decode[reference] if decode.get("searched") and decode.get(reference) else None
    plans = "; ".join(f"pad {p['pad']}: {'fits' if p['feasible'] else 'does not fit'}, predicted KL {p['predicted_kl']:.4f}"
                      for p in search["plans"])
    counts: dict[str, int] = {}
    for type_name in search["types"].values():
        counts[type_name] = counts.get(type_name, 0) + 1
    lines = [
        f"`recover-lora search` chose every tensor's type and the padding under {reference}'s bytes "
        f"({search['max_bytes'] / 2**20:.1f} MiB) and predicted decode rate: **pad {search['pad']}**, "
        + ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda item: -item[1]))
        + f" ({search['file_bytes'] / 2**20:.1f} MiB, {search['seconds'] / 60:.1f} min). Best plan per padding choice: {plans}.",
        "",
        f"- Predicted KL (½ Σ F ΔW², the teacher's Fisher diagonal) {search['predicted_kl']:.4f}; held-out KL "
        f"{heldout_rows['searched']['kl_to_teacher']:.4f} ({reference}: {heldout_rows[reference]['kl_to_teacher']:.4f}).",
        f"- Predicted decode {search['predicted_decode_ratio']:.2f} × {reference} (llama.cpp's measured rate of each type on this "
        f"machine); the search's own timing of the winner against it {_ratio(search.get('measured_decode_ratio'))}; "
        f"the bench step's {_ratio(measured_ratio)} at depth {depth}.",
    ]
    return lines


def reconstruct_section(reconstruct: dict, heldout_rows: dict) -> list[str]:
    """What block-wise reconstruction did to the searched file: its block errors and the held-out KL, same bytes."""
    before, after = heldout_rows["searched"]["kl_to_teacher"], heldout_rows["reconstructed"]["kl_to_teacher"]
    if "refused" in reconstruct:
        return [f"Not reconstructed: {reconstruct['refused']}; `reconstructed.gguf` is the searched file as it is."]
    types = ", ".join(f"{t['rewritten']}/{t['tuned']} {name}" for name, t in reconstruct["tensor_types"].items())
    untouched = reconstruct["untouched"]
    reverted = reconstruct["blocks_reverted"]
    change = f"{after / before - 1:+.0%}" if before else "—"
    return [
        f"`recover-lora reconstruct` tuned the searched file's codes and scales one transformer block at a time on the "
        f"teacher's own text ({reconstruct['settings']['iters']} signed-gradient steps per block, "
        f"{reconstruct['seconds'] / 60:.1f} min): the same tensor types and bytes, so the same decode speed.",
        "",
        f"- Tensors rewritten / tuned per type: {types}"
        + (f"; {len(untouched)} block linears of types without a block format left as they are" if untouched else "") + ".",
        f"- Block output error (MSE to the teacher's block on the calibration windows) ×{reconstruct['error_ratio']:.3f} of "
        f"llama.cpp's rounding, summed over blocks"
        + (f"; blocks {reverted} were no better and kept llama.cpp's rounding" if reverted else "") + ".",
        *head_lines(reconstruct.get("head")),
        f"- Held-out KL to the teacher: searched {before:.4f} → reconstructed **{after:.4f}** ({change}).",
    ]


def head_lines(head: dict | None) -> list[str]:
    """The output head's stage of reconstruct (recovery/output_head.py), if it ran."""
    if head is None:
        return []
    what = "the tied token embedding" if head["tied"] else "the output matrix"
    verdict = ("kept" if head["kept"] else "no better, so it kept llama.cpp's rounding")
    return [f"- Output head ({what}, `{head['tensor']}`, {head['ggml_type']}) tuned on the next-token KL: "
            f"{head['kl_before']:.4f} → {head['tuned_kl']:.4f} on {head['held_out_windows']} held-out calibration windows, {verdict}."]


def kltune_section(kltune: dict, heldout_rows: dict) -> list[str]:
    """What end-to-end KL tuning did to the reconstructed file: its held-out KL on unseen text, same bytes."""
    if "refused" in kltune:
        return [f"Not tuned: {kltune['refused']}." + (" `kl-tuned.gguf` is the reconstructed file as it is." if "kl-tuned" in heldout_rows else "")]
    before, after = heldout_rows["reconstructed"]["kl_to_teacher"], heldout_rows["kl-tuned"]["kl_to_teacher"]
    settings = kltune["settings"]
    change = f"{after / before - 1:+.0%}" if before else "—"
    untouched = kltune["untouched"]
    kept = ("" if kltune["kept"] else
            " No snapshot beat the reconstructed file on the held-out windows, so `kl-tuned.gguf` keeps its bytes.")
    groups = kltune.get("groups") or []
    if len(groups) > 1:
        kept += (f" The tensors were tuned in {len(groups)} groups, one after another; "
                 f"{sum(g['kept'] for g in groups)} of them beat the model before them and kept their tuning.")
    return [
        f"`recover-lora kl-tune` tuned the rounding of {len(kltune['tensors'])} tensors of the reconstructed file (the token "
        f"embedding and output head included) end to end on the teacher's next-token distributions: {kltune['steps']} "
        f"signed-gradient steps of {settings['lr']} code units (decayed to 0) over {settings['epochs']} passes of the "
        f"calibration windows, {kltune['seconds'] / 60:.1f} min; the same tensor types and bytes, so the same decode speed."
        + kept,
        "",
        f"- KL on the {settings['held_out']} calibration windows it never trained on (they choose its best snapshot): "
        f"{kltune['held_out_kl_before']:.4f} → {kltune['held_out_kl_after']:.4f}"
        + (f"; {len(untouched)} tensors of types without a block format left as they are" if untouched else "") + ".",
        f"- Held-out KL to the teacher (the table above): reconstructed {before:.4f} → kl-tuned **{after:.4f}** ({change}).",
    ]


def speed_rows(records: list[dict], roofline: dict, baseline_label: str) -> list[dict]:
    """One row per (variant, depth): measured decode/prefill tokens/s, ratio to the baseline, roofline prediction."""
    predictions = {
        label: {row["ctx"]: row["decode_tokens_per_s"] for row in rows} for label, rows in roofline["predictions"].items()
    }
    rows = []
    for record in records:
        label, depth = record["pipeline_label"], record["depth"]
        tg, pp = record["tg_tokens_per_s"], record["pp_tokens_per_s"]
        ratio = record["ratio_vs_baseline"]["tg"] if record.get("ratio_vs_baseline") else None
        predicted = predictions.get(label, {}).get(depth)
        baseline = predictions.get(baseline_label, {}).get(depth)
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


def speed_section(rows: list[dict], records: list[dict], roofline: dict, baseline_label: str) -> list[str]:
    first = records[0]
    settings = first["settings"]
    lines = [
        f"Measured with `recover-lora bench` semantics: {settings['repeats']} interleaved repeats, {first['n_gen']} generated "
        f"tokens and {first['n_prompt']}-token prompts, {settings['threads']} threads, at each KV-cache depth. "
        f"Ratios are per-repeat decode ratios to {baseline_label} (median, min–max). Predicted: the roofline model (`devices/roofline.py`) "
        f"on this machine's profile as probed by the same run ({profile_text(roofline['profile'])}).",
        "",
        f"| variant | depth | decode tok/s (median, min–max) | prefill tok/s | decode vs {baseline_label} | roofline decode tok/s | "
        f"roofline vs {baseline_label} | measured / predicted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = "—" if row["ratio"] is None else f"{row['ratio']['median']:.3f} ({row['ratio']['min']:.2f}–{row['ratio']['max']:.2f})"
        predicted = "—" if row["predicted"] is None else f"{row['predicted']:.1f}"
        fraction = "—" if row["predicted"] is None else f"{row['tg_median'] / row['predicted']:.2f}"
        predicted_ratio = "—" if row["predicted_ratio"] is None or row["label"] == baseline_label else f"{row['predicted_ratio']:.3f}"
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


def read_run(out_dir: Path) -> dict:
    """DIR/pipeline.json of a run whose steps up to the report have finished; else a one-line error."""
    path = out_dir / MANIFEST_FILE
    if not path.is_file():
        raise RecoverLoraError(f"{out_dir} holds no {MANIFEST_FILE}; give the folder of a `recover-lora pipeline` run")
    try:
        run = json.loads(path.read_text())
        meta, steps = run["meta"], run["steps"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RecoverLoraError(f"{path} is corrupt ({e}); rerun `recover-lora pipeline --out {out_dir} --force all`") from None
    if not all(key in meta for key in ("variants", "roles", "files", "commands")):
        raise RecoverLoraError(f"{path} predates `recover-lora report`; rerun `recover-lora pipeline --out {out_dir}` "
                               "(finished steps are skipped)")
    unfinished = [step for step in STEPS if step != "report" and step not in steps]
    if unfinished:
        raise RecoverLoraError(f"step {unfinished[0]} of {out_dir} has not finished; run `recover-lora pipeline --out {out_dir}` "
                               "to finish it")
    return run


def write_report(out_dir: str | os.PathLike) -> Path:
    """Write report.md, report.html and the plots of a pipeline run from its pipeline.json and step outputs.

    Runs nothing: `recover-lora report DIR` redraws a finished run's report with it.

    Example:
        write_report("runs/demo")  # -> runs/demo/report.md
    """
    import markdown

    from recover_lora.runtime.records import read_records
    from recover_lora.runtime.compare import compare_results, format_markdown

    out = Path(out_dir)
    run = read_run(out)
    meta, steps = run["meta"], run["steps"]
    files, variants, roles = meta["files"], meta["variants"], meta["roles"]
    compare_roles = {role: roles[role] for role in ("teacher", "quantized", "recovered")}
    comparison = compare_results([out / variant["eval"] for variant in variants.values()], roles=compare_roles)
    records = read_records(out / files["bench"])
    roofline = json.loads((out / files["roofline"]).read_text())
    rows = speed_rows(records, roofline, roles["baseline"])
    plot_accuracy(comparison, out / ACCURACY_PLOT)
    plot_speed(rows, roofline, out / SPEED_PLOT)
    heldout = json.loads((out / files["heldout"]).read_text())
    baselines = {label: {"model": path, "lora": None} for label, path in meta.get("baselines", {}).items()}
    pareto = pareto_rows({**variants, **baselines}, heldout["rows"], comparison, rows, out)
    search = json.loads((out / files["search"]).read_text())
    reconstruct = json.loads((out / files["reconstruct"]).read_text())
    kltune = json.loads((out / files["kltune"]).read_text()) if "kltune" in files else None  # runs from before the step had none
    plot_pareto(pareto, out / PARETO_PLOT)
    device = records[0]["device"]
    eval_any = json.loads((out / variants[roles["quantized"]]["eval"]).read_text())
    limit = eval_any["settings"].get("limit")
    # The steps before the report: its own record (there on a redraw) would change the report it is about.
    timed = {name: record for name, record in steps.items() if name != "report"}
    total_seconds = sum(record["seconds"] for record in timed.values())
    step_times = ", ".join(f"{name} {record['seconds']:.0f} s" for name, record in timed.items())
    export_summary, train_summary = steps["export"]["summary"], steps["train"]["summary"]
    file_sizes = {f"{policy}.gguf": info for policy, info in export_summary["files"].items()}
    file_sizes[files["searched"]] = steps["search"]["summary"]["file"]
    file_sizes[files["reconstructed"]] = steps["reconstruct"]["summary"]["file"]
    if kltune is not None and "refused" not in kltune:
        file_sizes[files["kl-tuned"]] = steps["kltune"]["summary"]["file"]
    file_sizes |= {f"{files['baselines']}/{preset}.gguf": info for preset, info in steps["baselines"]["summary"]["files"].items()}
    autoround = steps.get("autoround", {}).get("summary", {})
    file_sizes |= {meta["baselines"][label]: info for label, info in autoround.get("files", {}).items()}
    autoround_text = (f"AutoRound's files (`recover-lora autoround`, {', '.join(f'{k} {v / 60:.1f} min' for k, v in autoround['seconds'].items()) or 'times in its step'}) "
                      "are its own GGUF writer's, calibrated on the importance matrix's windows." if autoround.get("files")
                      else f"No AutoRound file: {autoround['refused']}." if autoround.get("refused") else "")
    adapter = out / variants[roles["adapter"]]["lora"]
    recover_summary = steps.get("recover", {}).get("summary", {})
    lines = [
        f"# Recover-LoRA report: {meta.get('model', 'default')} ({meta.get('preset')})",
        "",
        f"Machine: {device.get('cpu_model')}, {device.get('cpu_cores_logical')} logical cores, "
        f"{(device.get('ram_bytes') or 0) / 2**30:.0f} GiB RAM, {device.get('os')} {device.get('os_release', '')}, "
        f"llama.cpp back end {device.get('backend')}. Steps took {total_seconds / 60:.1f} min in all ({step_times}).",
        "",
        "The teacher is the full-precision model (for the default model: SmolLM2-135M-Instruct's Q4_1 weights dequantized "
        "to float32, run in torch); every other variant runs in llama.cpp from its GGUF, the adapter as a llama.cpp LoRA GGUF.",
        "",
        "## Accuracy",
        "",
        f"lm-evaluation-harness tasks, {limit if limit else 'all'} documents per task (the same documents for every "
        f"variant); 95 % bootstrap CIs. Recovery = ({roles['recovered']} − {roles['quantized']}) / "
        f"({roles['teacher']} − {roles['quantized']}), marked "
        f"*not significant* where the {roles['teacher']}–{roles['quantized']} gap is inside the noise.",
        "",
        format_markdown(comparison),
        "",
        f"![accuracy per task]({ACCURACY_PLOT})",
        "",
        "## Closeness to the teacher on held-out text",
        "",
        *heldout_section(heldout, roles),
        "",
        "## Speed on this machine",
        "",
        *speed_section(rows, records, roofline, roles["baseline"]),
        "",
        f"![tokens/s vs context]({SPEED_PLOT})",
        "",
        "## Type search",
        "",
        *search_section(search, heldout["rows"], rows, meta["search_reference"]),
        "",
        "## Block-wise reconstruction",
        "",
        *reconstruct_section(reconstruct, heldout["rows"]),
        "",
        *(["## End-to-end KL tuning", "", *kltune_section(kltune, heldout["rows"]), ""] if kltune is not None else []),
        "## Which variant to deploy",
        "",
        "The stock presets are llama.cpp's own (`recover-lora export --llama-preset P`: the model's own widths, llama.cpp's "
        "per-tensor mix and fallbacks, this run's importance matrix): what a user makes without us. " + autoround_text,
        "",
        *pareto_section(pareto),
        "",
        f"![bytes vs KL]({PARETO_PLOT})",
        "",
        "## Files",
        "",
        *files_section(file_sizes),
        "",
        f"Adapter: `{adapter.relative_to(out)}`, {adapter.stat().st_size / 2**20:.2f} MiB, "
        f"LoRA on {len(train_summary.get('targets', []))} tensors, {train_summary.get('steps')} training steps.",
        "",
        f"Recovered (one file, `{files.get('recovered')}`): {len(recover_summary.get('block_scale_tensors', []))} Q2_K tensors "
        f"with distilled block scales and {len(recover_summary.get('lora_tensors', []))} 4-bit tensors re-quantized with a "
        f"LoRA merged in, after {recover_summary.get('steps')} training steps; the same tensor types and bytes as gateup.gguf.",
        "",
        "## How this was made",
        "",
        "```sh",
        *meta["commands"],
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
