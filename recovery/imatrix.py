"""`recover-lora imatrix`: llama.cpp's importance matrix, computed by the teacher in torch.

For every linear layer of the decoder blocks, the sum of squared input activations per column and
the token count, over the teacher's own synthetic samples (`recover-lora synth`) or a text/JSONL
file, written in llama.cpp's importance-matrix GGUF format (export/imatrix_file.py). The teacher
runs *padded* exactly as the exporter pads it, so the names and widths are those of the GGUF being
quantized, whatever the architecture: padded hidden/intermediate columns see exactly zero activation
(the quantizer gets a tiny positive weight there), and the inputs of zero-weight columns (added query
heads) are whatever the padded model computes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from recover_lora.errors import RecoverLoraError
from recover_lora.export.imatrix_file import ImportanceMatrix, write_imatrix
from recover_lora.export.model import ModelConfig, gguf_name
from recover_lora.fileio import check_output

PAD_MODES = ("auto", "none")


def gguf_tensor_name(module_name: str, config: ModelConfig) -> str:
    """'model.layers.0.mlp.gate_proj' -> 'blk.0.ffn_gate.weight': the one place module names become GGUF names here."""
    return gguf_name(f"{module_name}.weight", config)


def padded_teacher(source: str | Path | None, pad: str = "auto", dtype=None, device: str = "cpu"):
    """The teacher in torch with the exporter's width padding: (model, its ModelConfig)."""
    from recover_lora.export.pad import needs_padding, pad_model
    from recover_lora.export.sources import load_model
    from recover_lora.export.torch_model import to_hf_model

    if pad not in PAD_MODES:
        raise RecoverLoraError(f"--pad {pad!r} is not valid; use one of: {', '.join(PAD_MODES)}")
    weights = load_model(source)
    if pad == "auto" and needs_padding(weights.config):
        weights = pad_model(weights)
    return to_hf_model(weights, dtype=dtype or torch.float32, device=device), weights.config


def importance_matrix(stats: dict, config: ModelConfig, datasets: list[str], chunk_count: int, chunk_size: int) -> ImportanceMatrix:
    """Activation statistics by torch module name -> an ImportanceMatrix by GGUF tensor name."""
    sums = {gguf_tensor_name(name, config): s.sum_sq.astype("float32") for name, s in stats.items()}
    counts = {gguf_tensor_name(name, config): s.count for name, s in stats.items()}
    return ImportanceMatrix(sums, counts, datasets=datasets, chunk_count=chunk_count, chunk_size=chunk_size)


def calibration_windows(
    source: str | Path | None, samples: str | Path | None, text: str | Path | None, max_samples: int | None = None,
    seq_len: int | None = None, max_tokens: int = 65536, batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The calibration tokens of `imatrix` and `search`: (token ids [n, seq], counted positions, where they came from).

    From a `recover-lora synth` folder (positions after a sample's end are not counted) or a text / JSONL file
    (tokenized with the teacher's tokenizer, cut into windows of `seq_len`, default 512).
    """
    from recover_lora.recovery.activations import counted_positions

    if (samples is None) == (text is None):
        raise RecoverLoraError("give exactly one input: --samples DIR (from `recover-lora synth`) or --text FILE (.txt or .jsonl)")
    for name, value in (("max-samples", max_samples), ("seq-len", seq_len), ("max-tokens", max_tokens), ("batch-size", batch_size)):
        if value is not None and value <= 0:
            raise RecoverLoraError(f"--{name}={value} must be > 0")
    if samples is not None:
        from recover_lora.recovery.samples import load_samples

        loaded = load_samples(samples)
        ids, counted = loaded.input_ids, counted_positions(loaded.loss_mask)
        dataset = str(samples)
    else:
        from recover_lora.export.sources import default_model_path, resolve_named
        from recover_lora.recovery.teacher_source import load_hf_tokenizer
        from recover_lora.recovery.text_data import text_windows

        tokenizer = load_hf_tokenizer(resolve_named(source) if source is not None else default_model_path())
        ids = text_windows(Path(text), lambda document: tokenizer(document)["input_ids"], seq_len or 512, max_tokens, knob="--seq-len")
        counted = torch.ones_like(ids, dtype=torch.bool)
        dataset = str(text)
    if seq_len is not None:
        ids, counted = ids[:, :seq_len], counted[:, :seq_len]
    if max_samples is not None:
        ids, counted = ids[:max_samples], counted[:max_samples]
    return ids, counted, dataset


def compute_imatrix(
    source: str | Path | None,
    out: str | Path,
    samples: str | Path | None = None,
    text: str | Path | None = None,
    max_samples: int | None = None,
    seq_len: int | None = None,
    max_tokens: int = 65536,
    batch_size: int = 8,
    pad: str = "auto",
    device: str = "cpu",
    force: bool = False,
) -> ImportanceMatrix:
    """Compute the teacher's importance matrix and write it as llama.cpp's imatrix GGUF.

    Args:
        source: the full-precision model (HF folder, GGUF, None = the default model).
        out: the .gguf to write (temporary file + rename).
        samples: a `recover-lora synth` folder (positions after a sample's end are not counted).
        text: or a text / JSONL file (tokenized with the teacher's tokenizer, cut into windows).
        max_samples: use only the first N samples or windows.
        seq_len: cut samples to this many tokens (text windows: default 512).
        max_tokens: text only: tokens to read.
        pad: "auto" pads widths as `export --pad auto` does; "none" keeps the model's own widths.

    Example:
        compute_imatrix(None, "imatrix.gguf", samples="runs/synth", max_samples=128)
    """
    from recover_lora.recovery.activations import collect_activation_stats, token_batches

    out = check_output(out, force)
    ids, counted, dataset = calibration_windows(source, samples, text, max_samples, seq_len, max_tokens, batch_size)
    model, config = padded_teacher(source, pad, device=device)
    if int(ids.max()) >= config.vocab_size:
        raise RecoverLoraError(f"the tokens reach id {int(ids.max())} but the teacher's vocabulary has {config.vocab_size}: they come from another model")
    stats = collect_activation_stats(model, token_batches(ids, counted, batch_size), device=device)
    matrix = importance_matrix(stats, config, [dataset], chunk_count=int(ids.shape[0]), chunk_size=int(ids.shape[1]))
    write_imatrix(matrix, out, force=force)
    return matrix
