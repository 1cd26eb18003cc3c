"""The teacher's source (a Hugging Face folder or a GGUF file): its identity, its tokenizer, where it runs.

Used by `synth` and `imatrix`, and by the pipeline to tell when a source has changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import sha256_file

# Every file of a Hugging Face folder that changes what the model computes or how text becomes tokens:
# weights (+ index), config.json, generation_config.json, tokenizer.json / tokenizer_config.json /
# special_tokens_map.json / added_tokens.json, a SentencePiece tokenizer.model, chat templates, BPE vocab files.
# (export/hf_tokenizer.py and transformers read these; a README or a licence changes nothing.)
MODEL_FILE_PATTERNS = ("*.safetensors", "*.json", "*.model", "*.jinja", "merges.txt", "vocab.txt")


def model_files(folder: Path) -> list[Path]:
    """The files of a Hugging Face folder that define the model (MODEL_FILE_PATTERNS), sorted by name."""
    return sorted({f for pattern in MODEL_FILE_PATTERNS for f in folder.glob(pattern) if f.is_file()})


def teacher_source_identity(source: Path) -> dict:
    """Name and SHA-256 of what defines the teacher: a GGUF's own hash, or for a Hugging Face folder
    the hash of the sorted ``name sha256`` lines of its `model_files` (weights, config, tokenizer files)."""
    if source.is_file():
        return {"name": source.name, "sha256": sha256_file(source)}
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in model_files(source))
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


def pick_device_and_dtype(name: str):
    """'auto' -> cuda, else mps, else cpu; with the dtype the teacher runs in there (bf16 on CUDA, fp32 elsewhere)."""
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
