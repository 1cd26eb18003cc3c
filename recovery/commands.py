"""CLI commands of the recovery stage: synth (synth_cli.py), train, export-adapter, check-adapter, heldout, imatrix, merge, gptq, reconstruct,
kl-tune.

Only typer is imported here; torch, peft and llama_cpp load inside the commands.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import typer

from recover_lora.errors import RecoverLoraError
from recover_lora.presets import PRESETS
from recover_lora.recovery import gptq as gptq_defaults  # torch-free at import: its defaults only
from recover_lora.recovery import kl_tune as kl_tune_defaults  # likewise
from recover_lora.recovery import reconstruct as reconstruct_defaults  # likewise
from recover_lora.recovery.train_config import TrainConfig

# The train command's defaults are TrainConfig's: its options default to None (a preset or the
# dataclass fills them in), and their help shows the dataclass default, declared there only.
TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def train_help(name: str, text: str) -> str:
    """`text` plus TrainConfig's default of the field `name` (nothing when that default is None)."""
    default = TRAIN_DEFAULTS[name]
    return text if default is None else f"{text} [default: {default}]"


def register(app: typer.Typer) -> None:
    try:
        from recover_lora.recovery import synth_cli
    except ModuleNotFoundError as e:
        if e.name != "recover_lora.recovery.synth_cli":
            raise
    else:
        synth_cli.register(app)
    presets = "; ".join(f"{p.name} expects `recover-lora synth --n-samples {p.synth_samples} --seq-len {p.synth_seq_len}`"
                        for p in PRESETS.values())
    app.command("train", help=f"{train_command.__doc__}\n\nPresets: {presets}.")(train_command)
    app.command("export-adapter")(export_adapter_command)
    app.command("check-adapter")(check_adapter_command)
    app.command("heldout")(heldout_command)
    app.command("imatrix")(imatrix_command)
    app.command("merge")(merge_command)
    app.command("gptq")(gptq_command)
    app.command("reconstruct")(reconstruct_command)
    app.command("kl-tune")(kl_tune_command)


def train_command(
    base: Path = typer.Option(..., "--base", help="The quantized GGUF to recover (from `recover-lora export`): the student"),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoint.pt, train_log.jsonl, adapter/, adapter.gguf, summary.json"),
    samples: Optional[Path] = typer.Option(None, "--samples", help="Synthetic set from `recover-lora synth`"),
    data: Optional[Path] = typer.Option(None, "--data", help="Labeled JSONL instead: {text} | {prompt,response} | {question,answer}"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Full-precision model (HF folder or GGUF); default: SmolLM2-135M-Instruct"),
    preset: Optional[str] = typer.Option(None, "--preset", help=f"{' | '.join(PRESETS)}: defaults for the options below"),
    targets: Optional[str] = typer.Option(None, "--targets", help=train_help("targets", "low-bit: the linears below 3.5 bits/weight, i.e. gate/up of a gateup export | high-bit: the other quantized linears | all | e.g. ffn_gate,ffn_up | none (with --block-scales)")),
    block_scales: Optional[bool] = typer.Option(None, "--block-scales/--no-block-scales", help=train_help("block_scales", "Also train the Q2_K block scales and mins of the low-bit linears (DWQ on llama.cpp's blocks; `recover-lora merge` writes them into one GGUF)")),
    block_scales_lr: Optional[float] = typer.Option(None, "--block-scales-lr", help=train_help("block_scales_lr", "Learning rate of the block scales (the 4-bit sub-block codes take 20x)")),
    rank: Optional[int] = typer.Option(None, "--rank", help=train_help("rank", "LoRA rank r")),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="LoRA alpha [default: 2 r]"),
    dropout: Optional[float] = typer.Option(None, "--dropout", help=train_help("dropout", "LoRA dropout")),
    init: Optional[str] = typer.Option(None, "--init", help=train_help("init", "LoRA init: zero (step 0 = the quantized model) | svd | eora (rank-r SVD of W_teacher - W_student, eora weighted by the inputs' covariance)")),
    init_samples: Optional[int] = typer.Option(None, "--init-samples", help=train_help("init_samples", "eora: training samples for its activation statistics")),
    lr: Optional[float] = typer.Option(None, "--lr", help=train_help("lr", "Peak learning rate")),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help=train_help("warmup_steps", "Linear warmup steps before the cosine decay")),
    epochs: Optional[float] = typer.Option(None, "--epochs", help=train_help("epochs", "Passes over the data")),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (overrides --epochs); 0 writes the initial adapter (see --init)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=train_help("batch_size", "Samples per step")),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Cut samples to this many tokens (labeled data: default 256)"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Use only the first N samples"),
    loss: Optional[str] = typer.Option(None, "--loss", help=train_help("loss", "forward: KL(teacher||student) | reverse | mix")),
    temperature: Optional[float] = typer.Option(None, "--temperature", help=train_help("temperature", "Distillation temperature")),
    ce_weight: Optional[float] = typer.Option(None, "--ce-weight", help=train_help("ce_weight", "Weight of cross-entropy on the data's tokens")),
    kl_weight: Optional[float] = typer.Option(None, "--kl-weight", help=train_help("kl_weight", "Weight of the KL term")),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Cache the teacher's top-k log-probs once instead of running it each step"),
    loss_chunk: Optional[int] = typer.Option(None, "--loss-chunk", help="lm_head and loss over at most N token positions at a time (student, teacher, top-k cache): the [batch, seq, vocab] logits never exist whole; same loss"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=train_help("dtype", "auto (bfloat16 on a GPU that supports it, else float32) | float32 | bfloat16: frozen teacher and student weights; bf16 rounds the student's GGUF values but fits 4-8B models (LoRA stays float32)")),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help=train_help("gradient_checkpointing", "Recompute layer activations in backward: less memory, same result (a run may resume with it changed)")),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help=train_help("grad_clip", "Max gradient norm")),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help=train_help("checkpoint_every", "Steps between checkpoints")),
    seed: Optional[int] = typer.Option(None, "--seed", help=train_help("seed", "Seed of LoRA init, data order and dropout")),
    device: Optional[str] = typer.Option(None, "--device", help=train_help("device", "auto (CUDA > MPS > CPU) | cuda | mps | cpu")),
    adapter_dtype: Optional[str] = typer.Option(None, "--adapter-dtype", help=train_help("adapter_dtype", "f16 | f32 | q8_0 for adapter.gguf")),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint (bit-identical)"),
    force: bool = typer.Option(False, "--force", help="Discard the run in --out and start over"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar"),
    plan_check: bool = typer.Option(True, "--plan-check/--no-plan-check", help="Refuse before loading anything when the memory plan (`recover-lora plan`) says the run does not fit this machine"),
) -> None:
    """Train a Recover-LoRA adapter: LoRA on the quantized GGUF's linears, distilled towards the teacher."""
    if resume and force:
        raise RecoverLoraError("--resume and --force contradict each other; pass one of them")
    given = {
        "targets": targets, "block_scales": block_scales, "block_scales_lr": block_scales_lr, "rank": rank, "alpha": alpha, "dropout": dropout, "lr": lr, "warmup_steps": warmup_steps,
        "init": init, "init_samples": init_samples,
        "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "seq_len": seq_len,
        "max_samples": max_samples, "loss": loss, "temperature": temperature, "ce_weight": ce_weight,
        "kl_weight": kl_weight, "top_k": top_k, "grad_clip": grad_clip, "checkpoint_every": checkpoint_every,
        "loss_chunk": loss_chunk, "dtype": dtype, "gradient_checkpointing": gradient_checkpointing,
        "seed": seed, "device": device, "adapter_dtype": adapter_dtype,
    }
    settings = {}
    if preset is not None:
        from recover_lora.presets import get_preset

        settings.update(get_preset(preset).train)
    settings.update({k: v for k, v in given.items() if v is not None})

    from recover_lora.recovery.distill import train

    config = TrainConfig(base=base, output=out, samples=samples, data=data, teacher=teacher, resume=resume,
                         force=force, progress=progress, **settings)
    if plan_check:  # from the GGUF headers and the samples' manifest: no weights are read
        from recover_lora.devices.memory_check import check_train_memory

        check_train_memory(config)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    result = train(config)
    if os.environ.get("RANK", "0") != "0":  # several processes (accelerate launch / torchrun): rank 0 reports
        return
    final = result.metrics
    done = (f"last loss {final['loss']:.4f}" if "loss" in final
            else f"no training step: the {config.init}-initialised adapter")
    wrote = [f"adapter: {result.adapter_dir} and {result.adapter_gguf}"] if result.adapter_gguf else []
    if config.block_scales:
        wrote.append(f"block scales: {result.run_dir / 'block_scales.safetensors'} (`recover-lora merge` writes the GGUF)")
    typer.echo(
        f"trained {result.steps} steps (resumed from {result.resumed_from}) on {len(result.target_tensors)} LoRA modules; "
        f"{done}; {'; '.join(wrote)}"
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


def keep_types_setting(names: list[str] | None) -> tuple[str, ...]:
    """--keep-type as given: omitted, the default (the IQ grid types); `none`, no type kept."""
    if names is None:
        return reconstruct_defaults.GRID_TYPES_KEPT
    return () if [name.lower() for name in names] == ["none"] else tuple(names)


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
    teacher_tensor: Optional[list[str]] = typer.Option(None, "--teacher-tensor",
                                                       help="A GGUF tensor whose teacher weights replace the student's (repeatable): what its quantization costs"),
    block_errors: bool = typer.Option(False, "--block-errors",
                                      help="Also each block's output error against the teacher's block on the same input (what reconstruct lowers)"),
) -> None:
    """Measure KL to the teacher, top-1 agreement and perplexity on held-out text: teacher, student, student + adapter."""
    from recover_lora.fileio import atomic_output
    from recover_lora.recovery.heldout import format_report, heldout_report

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    report = heldout_report(base, adapter, teacher, text, window, max_tokens, batch_size, device, tuple(teacher_tensor or ()),
                            block_errors)
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


def merge_command(
    run: Path = typer.Argument(..., help="A `recover-lora train` run folder (adapter/ and/or block_scales.safetensors)"),
    base: Path = typer.Option(..., "--base", help="The quantized GGUF the run trained on"),
    out: Path = typer.Option(..., "--out", "-o", help="The one-file GGUF to write"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Full-precision model the LoRA is merged into (default: the run's --teacher)"),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="The importance matrix the base was exported with (used to re-quantize merged tensors)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="Quantizer threads"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output"),
) -> None:
    """Fold a training run into one GGUF with the base's exact tensor types: no adapter at run time."""
    from recover_lora.recovery.merge import merge_run

    result = merge_run(base, run, out, teacher=teacher, imatrix=imatrix, threads=threads, force=force)
    typer.echo(f"wrote {result.path} ({result.file_bytes / 2**20:.1f} MiB, the base's types): "
               f"{len(result.lora_tensors)} tensors re-quantized with the LoRA merged in, "
               f"{len(result.block_scale_tensors)} with trained Q2_K block scales")


def gptq_command(
    base: Path = typer.Argument(..., help="A GGUF with Q2_K linears (e.g. `recover-lora export --policy gateup --imatrix ...`)"),
    out: Path = typer.Option(..., "--out", "-o", help="The GGUF to write: the base's types and bytes, new 2-bit codes"),
    samples: Path = typer.Option(..., "--samples", help="Synthetic set from `recover-lora synth` (the teacher's own text)"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Full-precision model the base was exported from (default: SmolLM2-135M-Instruct)"),
    max_samples: int = typer.Option(gptq_defaults.DEFAULT_SAMPLES, "--max-samples", help="Use only the first N samples"),
    damp: float = typer.Option(gptq_defaults.DEFAULT_DAMP, "--damp", help="GPTQ's damping: this fraction of the mean diagonal of XᵀX is added to it"),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass of the teacher"),
    device: str = typer.Option("auto", "--device", help="auto | cuda | mps | cpu (the teacher's forward passes)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output"),
) -> None:
    """Re-choose the Q2_K codes by GPTQ on the teacher's activations, keeping llama.cpp's scales: same bytes, closer outputs."""
    import torch

    from recover_lora.recovery.distill import pick_device
    from recover_lora.recovery.gptq import refine_codes

    if threads is not None:
        torch.set_num_threads(threads)
    result = refine_codes(base, out, samples, teacher=teacher, max_samples=max_samples, damp=damp, batch_size=batch_size,
                          device=str(pick_device(device)), force=force)
    typer.echo(f"wrote {result.path}: {len(result.tensors)} Q2_K tensors, {100 * result.codes_changed:.1f} % of codes changed, "
               f"output error on the samples x{result.error_ratio:.3f} of the base's")


def reconstruct_command(
    base: Path = typer.Argument(..., help="A quantized GGUF of the model's own widths (`recover-lora export --pad none ...` or a --llama-preset)"),
    out: Path = typer.Option(..., "--out", "-o", help="The GGUF to write: the base's types and bytes per tensor, tuned codes and scales"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Full-precision model the base was exported from (default: SmolLM2-135M-Instruct)"),
    samples: Optional[Path] = typer.Option(None, "--samples", help="Calibration windows: a `recover-lora synth` folder"),
    text: Optional[Path] = typer.Option(None, "--text", help="Or a .txt (documents split at blank lines) / .jsonl file"),
    max_samples: int = typer.Option(reconstruct_defaults.DEFAULT_SAMPLES, "--max-samples", help="Use only the first N windows"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per window (text: default 512)"),
    iters: int = typer.Option(reconstruct_defaults.DEFAULT_ITERS, "--iters", help="Signed-gradient steps per block"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Step size of the rounding offsets and scale multipliers, decayed linearly to 0 [default: 1 / iters]"),
    tune: str = typer.Option(reconstruct_defaults.ReconstructSettings.tune, "--tune",
                             help="What learns: codes (each weight's rounding), scales (the block scales), or both"),
    scale_lr_share: float = typer.Option(reconstruct_defaults.ReconstructSettings.scale_lr_share, "--scale-lr-share",
                                         help="With --tune both: the scales' step as a share of --lr"),
    target: str = typer.Option(reconstruct_defaults.ReconstructSettings.target, "--target",
                               help="local: the teacher's block on the student's own input; chain: on the teacher's (AutoRound)"),
    weighting: str = typer.Option(reconstruct_defaults.ReconstructSettings.weighting, "--weighting",
                                  help="mse: every output alike; fisher: by the teacher's Fisher diagonal of each block output (BRECQ)"),
    head: bool = typer.Option(reconstruct_defaults.ReconstructSettings.head, "--head/--no-head",
                              help="Then tune the output head (lm_head, or the tied token embedding) on the next-token KL"),
    keep_type: Optional[list[str]] = typer.Option(None, "--keep-type", help="A ggml type (e.g. Q4_K) whose tensors keep llama.cpp's bytes "
                                                  "while the others learn around them; repeatable; none: tune every type "
                                                  f"[default: {' '.join(reconstruct_defaults.GRID_TYPES_KEPT)}]"),
    batch_size: int = typer.Option(reconstruct_defaults.DEFAULT_BATCH_SIZE, "--batch-size", help="Windows per step"),
    seed: int = typer.Option(0, "--seed", help="Seed of the windows' order"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | mps"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    force: bool = typer.Option(False, "--force", help="Overwrite the output and discard a checkpoint of other settings"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="The JSON report [default: OUT with suffix .reconstruct.json]"),
) -> None:
    """Tune the base's codes and block scales block by block (SignRound) so each block's output matches the teacher's; same types, bytes and speed.

    A killed run resumes from its last finished block (the folder OUT.reconstruct/); run it again with the same settings.
    """
    from recover_lora.recovery.reconstruct import ReconstructSettings, reconstruct

    settings = ReconstructSettings(iters=iters, lr=lr, tune=tune, scale_lr_share=scale_lr_share, target=target, weighting=weighting,
                                   head=head, keep_types=keep_types_setting(keep_type), batch_size=batch_size, seed=seed,
                                   device=device)  # checked before any work
    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    def progress(record) -> None:
        state = "kept" if record.kept else "reverted (no better)"
        typer.echo(f"block {record.block}: error {record.error_before:.4g} -> {record.tuned_error:.4g} "
                   f"(x{record.tuned_error / record.error_before:.3f}), {state}, {record.seconds:.0f} s")

    result = reconstruct(base, out, teacher=teacher, samples=samples, text=text, max_samples=max_samples, seq_len=seq_len,
                         settings=settings, report_path=json_out, force=force, on_block=progress)
    if result.head is not None:
        h = result.head
        typer.echo(f"output head {h.tensor} ({h.ggml_type}): held-out KL {h.kl_before:.4g} -> {h.tuned_kl:.4g} on {h.held_out_windows} "
                   f"windows, {'kept' if h.kept else 'reverted (no better)'}, {h.seconds:.0f} s")
    kept = sum(r.kept for r in result.blocks)
    typer.echo(f"wrote {result.path}: {len(result.rewritten)} tensors rewritten in {kept} of {len(result.blocks)} blocks "
               f"({result.resumed_blocks} from the checkpoint), {len(result.untouched)} left as they are (no block format, or --keep-type); "
               f"report {result.report_path}")


def kl_tune_command(
    base: Path = typer.Argument(..., help="A quantized GGUF of the model's own widths (searched, reconstructed, exported --pad none, a --llama-preset)"),
    out: Path = typer.Option(..., "--out", "-o", help="The GGUF to write: the base's types and bytes per tensor, tuned codes (and scales)"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Full-precision model the base was exported from (default: SmolLM2-135M-Instruct)"),
    samples: Optional[Path] = typer.Option(None, "--samples", help="Calibration windows: a `recover-lora synth` folder"),
    text: Optional[Path] = typer.Option(None, "--text", help="Or a .txt (documents split at blank lines) / .jsonl file"),
    max_samples: int = typer.Option(kl_tune_defaults.DEFAULT_SAMPLES, "--max-samples", help="Use only the first N windows (the last --held-out of them held out)"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per window (text: default 512)"),
    epochs: int = typer.Option(kl_tune_defaults.DEFAULT_EPOCHS, "--epochs", help="Passes over the training windows"),
    lr: float = typer.Option(kl_tune_defaults.DEFAULT_LR, "--lr", help="Step of the rounding offsets in code units, decayed linearly to 0"),
    tune: str = typer.Option(kl_tune_defaults.KLTuneSettings.tune, "--tune", help="What learns: codes (each weight's rounding) or both (and the block scales)"),
    scale_lr_share: float = typer.Option(kl_tune_defaults.KLTuneSettings.scale_lr_share, "--scale-lr-share", help="With --tune both: the scales' step as a share of --lr"),
    batch_size: int = typer.Option(kl_tune_defaults.DEFAULT_BATCH_SIZE, "--batch-size", help="Windows per step"),
    held_out: int = typer.Option(kl_tune_defaults.DEFAULT_HELD_OUT, "--held-out", help="Windows never trained on, where the best snapshot is chosen"),
    evals_per_epoch: int = typer.Option(kl_tune_defaults.KLTuneSettings.evals_per_epoch, "--evals-per-epoch", help="Snapshots judged on the held-out windows per epoch"),
    groups: int = typer.Option(kl_tune_defaults.KLTuneSettings.groups, "--groups", help="Tune the tensors in this many groups, one after another (memory: one group's tuning state at a time)"),
    seed: int = typer.Option(0, "--seed", help="Seed of the windows' order"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | mps"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    force: bool = typer.Option(False, "--force", help="Overwrite the output and discard a checkpoint of other settings"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="The JSON report [default: OUT with suffix .kltune.json]"),
) -> None:
    """Tune the base's codes (and scales) end to end so its next-token distribution matches the teacher's (KL, as DWQ); same types, bytes and speed.

    Every tensor of a type with a block format learns, the token embedding and output head included. A killed run
    resumes from its last snapshot (the folder OUT.kltune/); run it again with the same settings.
    """
    from recover_lora.recovery.kl_tune import KLTuneSettings, kl_tune

    settings = KLTuneSettings(epochs=epochs, lr=lr, tune=tune, scale_lr_share=scale_lr_share, batch_size=batch_size,
                              held_out=held_out, evals_per_epoch=evals_per_epoch, groups=groups, seed=seed, device=device)  # checked before any work
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    result = kl_tune(base, out, teacher=teacher, samples=samples, text=text, max_samples=max_samples, seq_len=seq_len,
                     settings=settings, report_path=json_out, force=force, progress=typer.echo)
    state = "kept" if result.kept else "no snapshot beat the input: its bytes are kept"
    if len(result.groups) > 1:
        state += f"; {sum(g.kept for g in result.groups)} of {len(result.groups)} groups kept"
    typer.echo(f"wrote {result.path}: {len(result.tensors)} tensors tuned, held-out KL {result.held_out_kl_before:.4f} -> "
               f"{result.held_out_kl_after:.4f} ({state}), {len(result.untouched)} left as they are (no block format); "
               f"report {result.report_path}")
