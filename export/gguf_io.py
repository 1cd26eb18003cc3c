"""GGUF <-> ModelWeights: write a full-precision llama-family GGUF, read any GGUF back to float32.

`write_gguf` streams tensors one at a time (GGUFWriter's info-then-data protocol), so a
multi-GB model is never held in memory as float32. `read_gguf` dequantizes lazily with
`gguf.quants.dequantize`, the values llama.cpp itself computes with, and undoes llama.cpp's
rotary permutation of q/k, so the torch model built from it is the deployed model.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from recover_lora.errors import RecoverLoraError
from recover_lora.export.archs import for_gguf_arch
from recover_lora.export.archs.base import ROPE_FREQS
from recover_lora.export.gguf_header import GGUFHeader, read_gguf_header
from recover_lora.export.model import LazyTensors, ModelConfig, ModelWeights, gguf_name
from recover_lora.export.tokenizer import TokenizerSpec
from recover_lora.fileio import atomic_output

# Our own metadata (llama.cpp keeps unknown keys through quantization): the widths before padding,
# so the teacher/student tooling and `inspect` know what the padded file corresponds to.
UNPADDED_KEY_PREFIX = "recover_lora.unpadded."
SOURCE_KEY = "recover_lora.source"
WRITE_DTYPES = {"f32": np.float32, "f16": np.float16}


def _add_hyperparameters(writer: gguf.GGUFWriter, config: ModelConfig, file_type: int) -> None:
    writer.add_name(config.name)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    # Explicit head dimension: after width padding, hidden / heads no longer gives it.
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.arch.rope_dimension_count(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    config.arch.write_hparams(writer, config)


def _gguf_array(hf_tensor_name: str, array: np.ndarray, config: ModelConfig, dtype: type) -> np.ndarray:
    array = config.arch.to_gguf(hf_tensor_name, array, config)
    # llama.cpp keeps 1-D tensors (norms, biases) in F32 whatever the file type.
    return np.ascontiguousarray(array, dtype=np.float32 if array.ndim == 1 else dtype)


def write_gguf(weights: ModelWeights, path: str | Path, dtype: str = "f32", force: bool = False) -> Path:
    """Write a full-precision GGUF that llama.cpp loads (and quantizes).

    Args:
        weights: the model (tensors by Hugging Face name; lazily loaded ones stream).
        path: output .gguf; written to a temporary file and renamed.
        dtype: "f32" or "f16" for 2-D tensors.
        force: overwrite an existing file.

    Example:
        write_gguf(load_model("tests/fixtures/stories260K"), "stories.f32.gguf")
    """
    if dtype not in WRITE_DTYPES:
        raise RecoverLoraError(f"unknown GGUF dtype {dtype!r}; use one of: {', '.join(WRITE_DTYPES)}")
    if weights.tokenizer is None:
        raise RecoverLoraError("the model has no tokenizer; llama.cpp cannot load a GGUF without one")
    config = weights.config
    np_dtype = WRITE_DTYPES[dtype]
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    # Tensors computed from the config (rope factors) are written from it, not from `weights`.
    extra = config.arch.extra_gguf_tensors(config)
    names = [n for n in weights.tensors if n not in extra]
    if config.tie_word_embeddings:
        names = [n for n in names if n != "lm_head.weight"]
    if ROPE_FREQS in weights.tensors and ROPE_FREQS not in extra:  # read from a GGUF: pass the factors through
        extra[ROPE_FREQS] = np.asarray(weights.tensors[ROPE_FREQS], dtype=np.float32)
        names.remove(ROPE_FREQS)

    with atomic_output(path, force) as tmp:
        writer = gguf.GGUFWriter(tmp, config.arch.gguf_arch)
        gguf_names = {name: gguf_name(name, config) for name in names}
        _add_hyperparameters(writer, config, int(file_type))
        weights.tokenizer.write_to(writer)
        if weights.source:
            writer.add_string(SOURCE_KEY, weights.source)
        for key, value in (weights.unpadded or {}).items():
            writer.add_uint32(UNPADDED_KEY_PREFIX + key, value)
        # Pass 1: shapes (GGUF stores every tensor's info before any data).
        for name, array in extra.items():
            writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes)
        for name in names:
            array = _gguf_array(name, weights.tensors[name], config, np_dtype)
            writer.add_tensor_info(gguf_names[name], array.shape, array.dtype, array.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # Pass 2: data, one tensor in memory at a time.
        for array in extra.values():
            writer.write_tensor_data(array)
        for name in names:
            writer.write_tensor_data(_gguf_array(name, weights.tensors[name], config, np_dtype))
        writer.close()
    return Path(path)


def open_gguf(path: str | Path) -> GGUFHeader:
    """Metadata and tensor table of a GGUF in milliseconds (`export.gguf_header`: arrays such as the
    vocabulary are decoded only when asked for); a missing, truncated or non-GGUF file is one line.
    It answers like a GGUFReader: `fields`, `get_field(key).contents()`, `tensors[i].data`."""
    return read_gguf_header(path)


def field_value(reader: gguf.GGUFReader | GGUFHeader, key: str, default=None):
    """A metadata value (GGUFReader or GGUFHeader), or `default` if the key is absent."""
    field = reader.get_field(key)
    return default if field is None else field.contents()


def config_from_gguf(reader: gguf.GGUFReader, name: str | None = None) -> ModelConfig:
    """The ModelConfig a GGUF's metadata describes (no tensor data is read, but for small tensors an
    architecture takes hyper-parameters from: Phi-3's rope factors)."""
    gguf_arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    if gguf_arch is None:
        raise RecoverLoraError("the GGUF has no general.architecture; is it a model file?")
    arch = for_gguf_arch(gguf_arch)

    def key(template: str, default=None):
        value = field_value(reader, template.format(arch=gguf_arch), default)
        if value is None:
            raise RecoverLoraError(f"the GGUF lacks {template.format(arch=gguf_arch)}; it cannot be read as {gguf_arch}")
        return value

    hidden = int(key(gguf.Keys.LLM.EMBEDDING_LENGTH))
    num_heads = int(key(gguf.Keys.Attention.HEAD_COUNT))
    tensor_names = {t.name for t in reader.tensors}
    # The embedding's rows, not the token list: decoding a 262k-token vocabulary takes a second.
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = field_value(reader, gguf.Keys.LLM.VOCAB_SIZE.format(arch=gguf_arch)) or (int(embedding.shape[-1]) if embedding is not None else None)
    if vocab is None:
        raise RecoverLoraError("the GGUF has neither a vocab_size key nor token_embd.weight; is it a model file?")
    bos = field_value(reader, gguf.Keys.Tokenizer.BOS_ID)
    eos = field_value(reader, gguf.Keys.Tokenizer.EOS_ID)
    return ModelConfig(
        model_type=arch.model_type,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key(gguf.Keys.LLM.FEED_FORWARD_LENGTH)),
        num_layers=int(key(gguf.Keys.LLM.BLOCK_COUNT)),
        num_heads=num_heads,
        num_kv_heads=int(key(gguf.Keys.Attention.HEAD_COUNT_KV, num_heads)),
        head_dim=int(key(gguf.Keys.Attention.KEY_LENGTH, hidden // num_heads)),
        rms_norm_eps=float(key(gguf.Keys.Attention.LAYERNORM_RMS_EPS)),
        rope_theta=float(key(gguf.Keys.Rope.FREQ_BASE, 10000.0)),
        context_length=int(key(gguf.Keys.LLM.CONTEXT_LENGTH, 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=None if eos is None else int(eos),
        name=name or field_value(reader, gguf.Keys.General.NAME, "model"),
        **arch.read_hparams(
            lambda template, default=None: field_value(reader, template.format(arch=gguf_arch), default),
            LazyTensors({t.name: (lambda t=t: dequantized(t)) for t in reader.tensors}),
        ),
    )


def dequantized(tensor) -> np.ndarray:
    """A GGUFReader tensor as float32 in numpy (row-major, ggml shape reversed) order."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(shape)


def read_gguf(path: str | Path) -> ModelWeights:
    """Read a llama-family GGUF of any type llama.cpp reads; tensors dequantize on access.

    Example:
        student = read_gguf("smollm2.gateup.gguf")   # exactly the weights llama.cpp will use
        student.tensors["model.layers.0.mlp.gate_proj.weight"].shape  # (1536, 768)
    """
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    hf_names = config.arch.gguf_names(config)
    derived = config.arch.extra_gguf_tensors(config)  # rebuilt from the config on write (rope factors): not weights
    loaders = {}
    for tensor in reader.tensors:
        if tensor.name in derived:
            continue
        if tensor.name not in hf_names:
            raise RecoverLoraError(f"{path} holds tensor {tensor.name!r} that a {config.arch.describe()} model of this shape has not")
        name = hf_names[tensor.name]

        def load(tensor=tensor, name=name):
            return config.arch.from_gguf(name, dequantized(tensor), config)

        loaders[name] = load
    unpadded = {}
    for key in reader.fields:
        if key.startswith(UNPADDED_KEY_PREFIX):
            unpadded[key[len(UNPADDED_KEY_PREFIX):]] = int(field_value(reader, key))
    return ModelWeights(
        config=config,
        tensors=LazyTensors(loaders),
        tokenizer=TokenizerSpec.from_gguf(reader),
        source=str(path),
        unpadded=unpadded or None,
    )
