"""`recover-lora synth`: the teacher writes the synthetic training set (see synth.py).

Only typer is imported here; torch and transformers load inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from recover_lora.errors import RecoverLoraError


def register(app: typer.Typer) -> None:
    """Add the `synth` command to the recover-lora app."""

    @app.command("synth")
    def synth(
        model: Optional[str] = typer.Argument(
            None, help="Teacher: a Hugging Face folder or a .gguf file (default: SmolLM2-135M-Instruct)."
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for samples.safetensors, preview.jsonl, manifest.json."),
        n_samples: int = typer.Option(10000, "--n-samples", help="Number of samples."),
        seq_len: int = typer.Option(256, "--seq-len", help="Tokens per sample (start included)."),
        seed: int = typer.Option(0, "--seed", help="Same seed, same settings, same machine: same samples."),
        batch_size: int = typer.Option(32, "--batch-size", help="Samples generated together; also the shard size."),
        mode: str = typer.Option(
            "random", "--mode", help="random: LLM-QAT random first token; chat: a generic user prompt in the chat template."
        ),
        temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature after the greedy tokens."),
        top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass."),
        greedy_tokens: int = typer.Option(3, "--greedy-tokens", help="Tokens after the start taken greedily."),
        eos: str = typer.Option(
            "mask", "--eos", help="mask: end a sample at EOS and mask the rest; suppress: never sample EOS."
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
        manifest = synthesize(model, out, device, resume=resume, force=force, n_samples=n_samples, seq_len=seq_len, seed=seed,
                        batch_size=batch_size, first_token=mode, temperature=temperature, top_p=top_p,
                        greedy_tokens=greedy_tokens, eos=eos)
        counts, timing = manifest["counts"], manifest["timing"]
        typer.echo(
            f"wrote {counts['n_samples']} x {counts['seq_len']} tokens to {out} "
            f"({counts['loss_token_fraction']:.1%} trained, {manifest['early_eos']['fraction']:.1%} ended early at EOS, "
            f"duplicate rate {manifest['duplicate_rate']:.2%}, {timing['samples_per_s']} samples/s on {timing['device']})"
        )


def pick_device(name: str):
    """'auto' -> cuda, else mps, else cpu; with the dtype used there (bf16 on CUDA, fp32 elsewhere)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name not in available:
        raise RecoverLoraError(f"device {name!r} is unknown; use auto, cuda, mps or cpu")
    if not available[name]:
        raise RecoverLoraError(f"device {name!r} is not available on this machine; use --device auto")
    # MPS stays fp32: bf16 matmuls there are slow or missing on older macOS versions.
    return torch.device(name), torch.bfloat16 if name == "cuda" else torch.float32


def teacher_source_identity(source: Path) -> dict:
    """Name and SHA-256 of the teacher's weight file(s): a GGUF's own hash, or for a Hugging Face
    folder the hash of its sorted ``name sha256`` lines over every *.safetensors file."""
    import hashlib

    from recover_lora.fileio import sha256_file

    if source.is_file():
        return {"name": source.name, "sha256": sha256_file(source)}
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in sorted(source.glob("*.safetensors")))
    return {"name": source.resolve().name, "sha256": hashlib.sha256(lines.encode()).hexdigest()}


def load_hf_tokenizer(source: Path):
    """The transformers tokenizer of a Hugging Face folder, or of a GGUF (read by transformers' GGUF support)."""
    from transformers import AutoTokenizer

    try:
        if source.is_file():
            return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, KeyError) as e:
        raise RecoverLoraError(
            f"cannot load the tokenizer of {source} with transformers ({e}); give the model's Hugging Face folder"
        ) from None


def synthesize(model: str | None, out: Path, device_name: str, resume: bool, force: bool, **settings) -> dict:
    """Build the teacher from `model` (None: the default model) and let it write the synthetic set into `out`.

    `settings` are `generate_synthetic` keywords (n_samples, seq_len, seed, batch_size, ...).

    Example:
        synthesize(None, Path("runs/synth"), "auto", resume=True, force=False, n_samples=512, seq_len=128)
    """
    from recover_lora.export.sources import DEFAULT_MODEL_NAME, default_model_path, load_model
    from recover_lora.export.torch_model import to_hf_model
    from recover_lora.recovery.synth import SynthConfig, check_tokenizer, generate_synthetic
    from recover_lora.recovery.synth_tokenizer import TokenizerInfo

    config = SynthConfig(**{k: settings[k] for k in SynthConfig.__dataclass_fields__})  # bad flags fail before loading
    device, dtype = pick_device(device_name)
    source = Path(model) if model is not None else default_model_path()
    if not source.exists():
        raise RecoverLoraError(f"model source {source} does not exist; give a Hugging Face folder, a .gguf file, or nothing")
    weights = load_model(model)  # reads the config and checks the tensors; the weights load lazily
    name = DEFAULT_MODEL_NAME if model is None else weights.config.name
    extra_eos = [weights.config.eos_token_id] if weights.config.eos_token_id is not None else []
    tokenizer = TokenizerInfo.from_hf(load_hf_tokenizer(source), name=name, extra_eos_ids=extra_eos)
    check_tokenizer(config, tokenizer)  # before building the teacher in torch
    teacher = to_hf_model(weights, dtype=dtype, device=str(device))
    identity = {**teacher_source_identity(source), "name": name}
    return generate_synthetic(teacher, out, tokenizer, teacher_id=identity, resume=resume, force=force, **settings)
