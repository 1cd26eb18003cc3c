"""`recover-lora synth`: the teacher writes the synthetic training set (synth.py: `synthesize`).

Only the command lives here; its defaults are SynthConfig's (synth_config.py). Only typer is
imported at import time; torch and transformers load inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from recover_lora.errors import RecoverLoraError
from recover_lora.recovery.synth_config import SynthConfig

DEFAULTS = SynthConfig()  # the one place the defaults are declared


def register(app: typer.Typer) -> None:
    """Add the `synth` command to the recover-lora app."""

    @app.command("synth")
    def synth(
        model: Optional[str] = typer.Argument(
            None, help="Teacher: a Hugging Face folder or a .gguf file (default: SmolLM2-135M-Instruct)."
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for samples.safetensors, preview.jsonl, manifest.json."),
        n_samples: int = typer.Option(DEFAULTS.n_samples, "--n-samples", help="Number of samples."),
        seq_len: int = typer.Option(DEFAULTS.seq_len, "--seq-len", help="Tokens per sample (start included)."),
        seed: int = typer.Option(DEFAULTS.seed, "--seed", help="Same seed, same settings, same machine: same samples."),
        batch_size: int = typer.Option(DEFAULTS.batch_size, "--batch-size", help="Samples generated together; also the shard size."),
        mode: str = typer.Option(
            DEFAULTS.first_token, "--mode", help="random: LLM-QAT random first token; chat: a generic user prompt in the chat template."
        ),
        temperature: float = typer.Option(DEFAULTS.temperature, "--temperature", help="Sampling temperature after the greedy tokens."),
        top_p: float = typer.Option(DEFAULTS.top_p, "--top-p", help="Nucleus sampling mass."),
        greedy_tokens: int = typer.Option(DEFAULTS.greedy_tokens, "--greedy-tokens", help="Tokens after the start taken greedily."),
        eos: str = typer.Option(
            DEFAULTS.eos, "--eos", help="mask: end a sample at EOS and mask the rest; suppress: never sample EOS."
        ),
        device: str = typer.Option("auto", "--device", help="auto (CUDA > MPS > CPU), cuda, mps or cpu."),
        threads: Optional[int] = typer.Option(
            None, "--threads", help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy shared CPU)."
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
        force: bool = typer.Option(False, "--force", help="Discard what --out holds and start over."),
    ) -> None:
        """Generate synthetic training text with the teacher (LLM-QAT hybrid sampling)."""
        if resume and force:
            raise RecoverLoraError("--resume and --force contradict each other; pass one of them")
        if threads is not None:
            if threads < 1:
                raise RecoverLoraError(f"--threads {threads} must be at least 1")
            import torch

            torch.set_num_threads(threads)
        from recover_lora.recovery.synth import synthesize

        manifest = synthesize(model, out, device, resume=resume, force=force, n_samples=n_samples, seq_len=seq_len, seed=seed,
                              batch_size=batch_size, first_token=mode, temperature=temperature, top_p=top_p,
                              greedy_tokens=greedy_tokens, eos=eos)
        counts, timing = manifest["counts"], manifest["timing"]
        typer.echo(
            f"wrote {counts['n_samples']} x {counts['seq_len']} tokens to {out} "
            f"({counts['loss_token_fraction']:.1%} trained, {manifest['early_eos']['fraction']:.1%} ended early at EOS, "
            f"duplicate rate {manifest['duplicate_rate']:.2%}, {timing['samples_per_s']} samples/s on {timing['device']})"
        )

