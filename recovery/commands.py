"""CLI commands of the recovery stage: synth (synth_cli.py), train, export-adapter, check-adapter, heldout.

Only typer is imported here; torch, peft and llama_cpp load inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from recover_lora.errors import RecoverLoraError


def register(app: typer.Typer) -> None:
    try:
        from recover_lora.recovery import synth_cli
    except ModuleNotFoundError as e:
        if e.name != "recover_lora.recovery.synth_cli":
            raise
    else:
        synth_cli.register(app)
    app.command("train")(train_command)
    app.command("export-adapter")(export_adapter_command)
    app.command("check-adapter")(check_adapter_command)
    app.command("heldout")(heldout_command)
    app.command("imatrix")(imatrix_command)


def train_command(
    base: Path = typer.Option(..., "--base", help="The quantized GGUF to recover (from `recover-lora export`): the student"),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoint.pt, train_log.jsonl, adapter/, adapter.gguf, summary.json"),
    samples: Optional[Path] = typer.Option(None, "--samples", help="Synthetic set from `recover-lora synth`"),
    data: Optional[Path] = typer.Option(None, "--data", help="Labeled JSONL instead: {text} | {prompt,response} | {question,answer}"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Full-precision model (HF folder or GGUF); default: SmolLM2-135M-Instruct"),
    preset: Optional[str] = typer.Option(None, "--preset", help="cpu-demo | paper: defaults for the options below"),
    targets: Optional[str] = typer.Option(None, "--targets", help="low-bit (default: the linears below 3.5 bits/weight, i.e. gate/up of a gateup export) | all | e.g. ffn_gate,ffn_up"),
    rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank r (default 16)"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="LoRA alpha (default 2 r)"),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="LoRA dropout (default 0)"),
    init: Optional[str] = typer.Option(None, "--init", help="LoRA init: zero (default; step 0 = the quantized model) | svd | eora (rank-r SVD of W_teacher - W_student, eora weighted by the inputs' covariance)"),
    init_samples: Optional[int] = typer.Option(None, "--init-samples", help="eora: training samples for its activation statistics (default 64)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 1e-3)"),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warmup steps before the cosine decay"),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data (default 1)"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (overrides --epochs); 0 writes the initial adapter (see --init)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per step (default 8)"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Cut samples to this many tokens (labeled data: default 256)"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Use only the first N samples"),
    loss: Optional[str] = typer.Option(None, "--loss", help="forward (KL(teacher||student), default) | reverse | mix"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Distillation temperature (default 1)"),
    ce_weight: Optional[float] = typer.Option(None, "--ce-weight", help="Weight of cross-entropy on the data's tokens (default 0)"),
    kl_weight: Optional[float] = typer.Option(None, "--kl-weight", help="Weight of the KL term (default 1)"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Cache the teacher's top-k log-probs once instead of running it each step"),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Max gradient norm (default 1)"),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints (default 50)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of LoRA init, data order and dropout (default 0)"),
    device: Optional[str] = typer.Option(None, "--device", help="auto (CUDA > MPS > CPU) | cuda | mps | cpu"),
    adapter_dtype: Optional[str] = typer.Option(None, "--adapter-dtype", help="f16 (default) | f32 | q8_0 for adapter.gguf"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint (bit-identical)"),
    force: bool = typer.Option(False, "--force", help="Discard the run in --out and start over"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar"),
) -> None:
    """Train a Recover-LoRA adapter: LoRA on the quantized GGUF's linears, distilled towards the teacher.

    The cpu-demo preset expects `recover-lora synth --n-samples 512 --seq-len 128`; the paper preset
    `--n-samples 10000 --seq-len 256`.
    """
    if resume and force:
        raise RecoverLoraError("--resume and --force contradict each other; pass one of them")
    given = {
        "targets": targets, "rank": rank, "alpha": alpha, "dropout": dropout, "lr": lr, "warmup_steps": warmup_steps,
        "init": init, "init_samples": init_samples,
        "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "seq_len": seq_len,
        "max_samples": max_samples, "loss": loss, "temperature": temperature, "ce_weight": ce_weight,
        "kl_weight": kl_weight, "top_k": top_k, "grad_clip": grad_clip, "checkpoint_every": checkpoint_every,
        "seed": seed, "device": device, "adapter_dtype": adapter_dtype,
    }
    settings = {}
    if preset is not None:
        from recover_lora.recovery.presets import get_preset

        settings.update(get_preset(preset).train)
    settings.update({k: v for k, v in given.items() if v is not None})

    from recover_lora.recovery.distill import TrainConfig, train

    config = TrainConfig(base=base, output=out, samples=samples, data=data, teacher=teacher, resume=resume,
                         force=force, progress=progress, **settings)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    result = train(config)
    final = result.metrics
    done = (f"last loss {final['loss']:.4f}" if "loss" in final
            else f"no training step: the {config.init}-initialised adapter")
    typer.echo(
        f"trained {result.steps} steps (resumed from {result.resumed_from}) on {len(result.target_tensors)} modules; "
        f"{done}; adapter: {result.adapter_dir} and {result.adapter_gguf}"
    )


def export_adapter_command(
    adapter: Path = typer.Argument(..., help="peft adapter folder (a training run's adapter/)"),
    base: Path = typer.Option(..., "--base", help="The quantized GGUF the adapter was trained on"),
    out: Path = typer.Option(..., "--out", "-o", help="Adapter .gguf to write"),
    dtype: str = typer.Option("f16", "--dtype", help="f16 | f32 | q8_0"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output"),
) -> None:
    """Write a peft LoRA adapter as a llama.cpp LoRA GGUF, after checking it against the base."""
    from recover_lora.recovery.adapter_gguf import write_adapter_gguf

    summary = write_adapter_gguf(adapter, base, out, dtype=dtype, force=force)
    typer.echo(f"wrote {summary.path}: {len(summary.base_tensors)} tensors adapted, rank {summary.ranks}, alpha {summary.alpha}")


def check_adapter_command(
    adapter: Path = typer.Argument(..., help="LoRA adapter .gguf"),
    base: Path = typer.Option(..., "--base", help="The base GGUF it will be applied to"),
) -> None:
    """Check that llama.cpp can apply an adapter GGUF to a base GGUF (architecture, names, shapes, a real load)."""
    from recover_lora.export.llama_load import llama_cpp_load_check
    from recover_lora.recovery.adapter_gguf import check_adapter_against_base

    summary = check_adapter_against_base(adapter, base)
    # Our shape checks first (llama-cpp-python 0.3.36 crashes on a misfitting adapter), then llama.cpp's own.
    llama_cpp_load_check(base, adapter)
    typer.echo(
        f"ok: {summary.path.name} fits {base.name} ({summary.architecture}; {len(summary.base_tensors)} tensors, "
        f"rank {summary.ranks}, alpha {summary.alpha})"
    )


def heldout_command(
    base: Path = typer.Option(..., "--base", help="The quantized GGUF (student)"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="peft adapter folder (a run's adapter/); omit for before-only"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Full-precision model; default: SmolLM2-135M-Instruct"),
    text: Optional[Path] = typer.Option(None, "--text", help="Held-out JSONL or .txt (default: 150 GSM8K test problems)"),
    window: int = typer.Option(256, "--window", help="Tokens per window"),
    max_tokens: int = typer.Option(16384, "--max-tokens", help="Tokens of held-out text to use"),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass"),
    device: str = typer.Option("auto", "--device", help="auto | cuda | mps | cpu"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON"),
) -> None:
    """Measure KL to the teacher, top-1 agreement and perplexity on held-out text: teacher, student, student + adapter."""
    from recover_lora.fileio import atomic_output
    from recover_lora.recovery.heldout import format_report, heldout_report

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    report = heldout_report(base, adapter, teacher, text, window, max_tokens, batch_size, device)
    typer.echo(format_report(report))
    if json_out is not None:
        with atomic_output(json_out, force=True) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")


def imatrix_command(
    model: Optional[str] = typer.Argument(None, help="Full-precision model: HF folder or .gguf (default: SmolLM2-135M-Instruct)"),
    out: Path = typer.Option(..., "--out", "-o", help="Importance matrix .gguf to write (llama.cpp's imatrix format)"),
    samples: Optional[Path] = typer.Option(None, "--samples", help="Synthetic set from `recover-lora synth` (the training data)"),
    text: Optional[Path] = typer.Option(None, "--text", help="Or a .txt (documents split at blank lines) / .jsonl file"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Use only the first N samples / windows"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per sample (text windows: default 512)"),
    max_tokens: int = typer.Option(65536, "--max-tokens", help="--text only: tokens to read"),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass"),
    pad: str = typer.Option("auto", "--pad", help="auto: pad widths as `export --pad auto` does; none: the model's own widths"),
    device: str = typer.Option("auto", "--device", help="auto | cuda | mps | cpu"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output"),
) -> None:
    """Compute the teacher's importance matrix (Σ x² per input column of every linear) for `export --imatrix`."""
    import torch

    from recover_lora.recovery.distill import pick_device
    from recover_lora.recovery.imatrix import compute_imatrix

    if threads is not None:
        torch.set_num_threads(threads)
    matrix = compute_imatrix(model, out, samples=samples, text=text, max_samples=max_samples, seq_len=seq_len,
                             max_tokens=max_tokens, batch_size=batch_size, pad=pad, device=str(pick_device(device)), force=force)
    tokens = max(matrix.counts.values())
    typer.echo(f"wrote {out}: {len(matrix.sums)} tensors, {tokens} tokens from {matrix.chunk_count} sequences of {matrix.chunk_size}")
