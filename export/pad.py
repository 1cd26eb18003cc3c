"""Exact width padding so every linear row is a multiple of llama.cpp's K-quant block (256).

llama.cpp's K-quants need each row (a linear layer's input width) to be a multiple of 256
and silently fall back to Q4_0/Q5_0/Q8_0 otherwise; SmolLM2-135M (hidden 576) gets not one
K-quant tensor without this. Padding adds zeros so the padded model computes the same logits:
- hidden h -> h_pad: zero columns in every input projection and the embeddings, zero rows in
  every output projection, so the extra residual channels stay exactly zero;
- RMSNorm sees a mean over h_pad values, h/h_pad of the true mean: weights x sqrt(h/h_pad) and
  epsilon x h/h_pad restore the same output;
- intermediate f -> f_pad: zero gate/up rows give act(0) * 0 = 0 into zero down columns;
- attention: o_proj's input width is heads x head_dim. Zero query heads are added inside each
  KV group (a zero query attends uniformly, and its zero o_proj columns drop the result), and
  whole zero KV groups where that is cheaper; the head dimension never changes.
Which axis of which tensor is what, and how a norm is scaled, comes from the architecture
(`export/archs/`), so fused tensors (Phi-3's qkv and gate_up) pad segment by segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from recover_lora.errors import RecoverLoraError
from recover_lora.export.archs.base import FF, HEAD_DIM, HIDDEN, KV_HEADS, Q_HEADS, VOCAB
from recover_lora.export.imatrix_file import ImportanceMatrix
from recover_lora.export.model import LazyTensors, ModelConfig, ModelWeights, hf_name

K_QUANT_BLOCK = 256  # QK_K in ggml-common.h
# llama.cpp normalises q/k per head with the same epsilon as the hidden-width norms, so rescaling
# epsilon for padding moves the q/k norms' epsilon too: off by at most |d eps| / (2 (E[x^2] + eps))
# relative, below float32 resolution for the epsilons real checkpoints use (1e-6). Above this, refuse.
MAX_SHARED_NORM_EPS = 1e-5


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class HeadLayout:
    """Padded attention heads: `kv_heads` KV heads of `group` query heads each; original query head
    i of KV head j sits at j * group + i, the rest are zero."""

    kv_heads: int
    group: int


def head_layout(config: ModelConfig, hidden_padded: int, multiple: int = K_QUANT_BLOCK) -> HeadLayout:
    """The cheapest exact head layout whose query width is a multiple of `multiple` (and equals the
    padded hidden width where llama.cpp's loader demands it); refuses if none exists."""
    kv, group, hd = config.num_kv_heads, config.heads_per_kv_head, config.head_dim
    width = config.num_heads * hd
    if width % multiple == 0 and (not config.arch.query_width_is_hidden or width == hidden_padded):
        return HeadLayout(kv, group)
    best = None
    for new_kv in range(kv, kv * multiple + 1):
        if best is not None and new_kv * (group + 1) >= best[0][0]:
            break  # every later layout has at least this many heads
        for new_group in range(group, group * multiple + 1):
            q_width = new_kv * new_group * hd
            if config.arch.query_width_is_hidden and q_width > hidden_padded:
                break
            if q_width % multiple or (config.arch.query_width_is_hidden and q_width != hidden_padded):
                continue
            # Bytes: attn_q + attn_output grow with query heads, attn_k/v and the KV cache with KV heads.
            cost = (new_kv * new_group + new_kv, new_kv)
            if best is None or cost < best[0]:
                best = (cost, HeadLayout(new_kv, new_group))
            break
    if best is None:
        raise RecoverLoraError(
            f"cannot pad {config.model_type} exactly: llama.cpp's {config.arch.gguf_arch} loader needs query heads x "
            f"head_dim ({hd}) = the padded hidden width {hidden_padded} with whole groups of at least {group} query heads "
            f"per KV head ({kv} KV heads); export with --pad none and types whose blocks divide the widths (e.g. Q8_0)"
        )
    return best[1]


def padded_config(config: ModelConfig, multiple: int = K_QUANT_BLOCK) -> ModelConfig:
    """The config after padding every linear input width to a multiple of `multiple`."""
    hidden = _round_up(config.hidden_size, multiple)
    intermediate = _round_up(config.intermediate_size, multiple)
    layout = head_layout(config, hidden, multiple)
    if hidden != config.hidden_size and config.arch.qk_norm and config.rms_norm_eps > MAX_SHARED_NORM_EPS:
        raise RecoverLoraError(
            f"cannot pad {config.model_type} hidden {config.hidden_size} -> {hidden} exactly: its per-head q/k RMSNorm "
            f"shares epsilon {config.rms_norm_eps:g} (> {MAX_SHARED_NORM_EPS:g}) that padding must rescale; "
            "export with --pad none and non-K-quant types"
        )
    return replace(
        config,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_heads=layout.kv_heads * layout.group,
        num_kv_heads=layout.kv_heads,
        rms_norm_eps=config.rms_norm_eps if hidden == config.hidden_size else config.rms_norm_eps * config.hidden_size / hidden,
    )


def needs_padding(config: ModelConfig, multiple: int = K_QUANT_BLOCK) -> bool:
    return padded_config(config, multiple) != config


def misaligned_tensors(types: dict, config: ModelConfig) -> list[str]:
    """Tensors whose requested ggml type's block does not divide their row width (llama.cpp would
    fall back to another type), as 'name (TYPE needs rows of a multiple of B, has W)'."""
    import gguf

    shapes = config.arch.gguf_tensor_shapes(config)
    bad = []
    for name, ggml_type in types.items():
        block, _ = gguf.GGML_QUANT_SIZES[ggml_type]
        width = shapes[name][-1]
        if width % block:
            bad.append(f"{name} ({ggml_type.name} needs rows of a multiple of {block}, has {width})")
    return bad


def _segment_positions(kind: str, old: ModelConfig, new: ModelConfig) -> tuple[np.ndarray, int]:
    """Where each index of an axis segment goes after padding, and the padded segment length."""
    if kind == HIDDEN:
        return np.arange(old.hidden_size), new.hidden_size
    if kind == FF:
        return np.arange(old.intermediate_size), new.intermediate_size
    if kind == VOCAB:
        return np.arange(old.vocab_size), new.vocab_size
    if kind == HEAD_DIM:
        return np.arange(old.head_dim), new.head_dim
    hd = old.head_dim
    if kind == KV_HEADS:
        return np.arange(old.num_kv_heads * hd), new.num_kv_heads * hd
    if kind == Q_HEADS:
        group, new_group = old.heads_per_kv_head, new.heads_per_kv_head
        heads = np.arange(old.num_heads)
        new_heads = (heads // group) * new_group + heads % group
        return (new_heads[:, None] * hd + np.arange(hd)).reshape(-1), new.num_heads * hd
    raise RecoverLoraError(f"internal error: unknown axis kind {kind!r}")


def _axis_positions(kinds: tuple[str, ...], old: ModelConfig, new: ModelConfig) -> tuple[np.ndarray, int]:
    """A (possibly fused) axis: its segments padded one by one and laid end to end."""
    positions, offset = [], 0
    for kind in kinds:
        segment, length = _segment_positions(kind, old, new)
        positions.append(segment + offset)
        offset += length
    return np.concatenate(positions), offset


def pad_tensor(name: str, array: np.ndarray, old: ModelConfig, new: ModelConfig) -> np.ndarray:
    """One Hugging Face tensor of a model of config `old`, padded to config `new`."""
    arch = old.arch
    axes = arch.tensor_axes(name)
    if len(axes) != array.ndim:
        raise RecoverLoraError(f"internal error: {name} has {array.ndim} axes, its padding rule {len(axes)}")
    index, shape = [], []
    for kinds in axes:
        positions, length = _axis_positions(kinds, old, new)
        index.append(positions)
        shape.append(length)
    if arch.is_hidden_norm(name) and new.hidden_size != old.hidden_size:
        array = arch.scale_norm(array, np.float32(math.sqrt(old.hidden_size / new.hidden_size)))
    if tuple(shape) != array.shape:
        padded = np.zeros(shape, dtype=array.dtype)
        padded[np.ix_(*index)] = array
        array = padded
    return arch.adjust_padded(name, array, old, new)


def pad_model(weights: ModelWeights, multiple: int = K_QUANT_BLOCK) -> ModelWeights:
    """Pad hidden, intermediate and attention widths to multiples of `multiple`, exactly.

    Example:
        padded = pad_model(load_model())   # SmolLM2-135M: hidden 576 -> 768, heads 9/3 -> 12/3
    """
    old = weights.config
    new = padded_config(old, multiple)
    if new == old:
        return weights
    unpadded = {
        "hidden_size": old.hidden_size,
        "intermediate_size": old.intermediate_size,
        "num_heads": old.num_heads,
        "num_kv_heads": old.num_kv_heads,
    }

    checkpoint_names = set(old.arch.hf_tensor_shapes(old)) | {"lm_head.weight"}

    def pad(name: str, array: np.ndarray) -> np.ndarray:
        if name not in checkpoint_names:
            return array  # tensors the checkpoint layout does not name (rope factors) keep their shape
        return pad_tensor(name, array, old, new)

    tensors = weights.tensors if isinstance(weights.tensors, LazyTensors) else LazyTensors.from_arrays(weights.tensors)
    return replace(weights, config=new, tensors=tensors.map(pad), unpadded=unpadded)


def pad_imatrix(matrix: ImportanceMatrix, old: ModelConfig, new: ModelConfig) -> ImportanceMatrix:
    """An importance matrix of the unpadded model, as the padded one sees it: every column where padding
    put it, zeros in the padded columns (they only ever see zero activations; the export exactness above)."""
    sums = {}
    for name, values in matrix.sums.items():
        positions, length = _axis_positions(old.arch.tensor_axes(hf_name(name, old))[-1], old, new)
        if values.shape[0] != positions.shape[0]:
            raise RecoverLoraError(
                f"the importance matrix gives {name} {values.shape[0]} columns but the unpadded model has {positions.shape[0]}: "
                "it was made for another model"
            )
        padded = np.zeros(length, dtype=np.float32)
        padded[positions] = values
        sums[name] = padded
    return replace(matrix, sums=sums, counts=dict(matrix.counts))
