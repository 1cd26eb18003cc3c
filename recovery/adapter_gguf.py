"""LoRA adapters: peft folder -> llama.cpp LoRA GGUF, and the check of an adapter against its base.

llama.cpp's adapter format (src/llama-adapter.cpp): `general.type = "adapter"`,
`general.architecture` = the base's, `adapter.type = "lora"`, `adapter.lora.alpha` (float32), and
for each adapted base tensor W a pair `<W name>.lora_a` / `<W name>.lora_b`. With ggml shapes
(ne[0] first) W is (in, out), lora_a (in, r) and lora_b (r, out); in numpy order those are peft's
`lora_A.weight` (r, in) and `lora_B.weight` (out, r), written as they are. llama.cpp computes
W x + scale · B (A x) with scale = user_scale · alpha / r, r read from lora_b — peft's alpha / r.

The student is the padded model, so its LoRA shapes already match the padded base. Where the base
architecture stores q/k rows in llama.cpp's rotary order, lora_b's rows (the output dimension) get
the same permutation as the base weight; lora_a is unchanged.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from recover_lora.errors import RecoverLoraError
from recover_lora.export.model import gguf_name
from recover_lora.fileio import atomic_output

T = gguf.GGMLQuantizationType
ADAPTER_DTYPES = {"f16": T.F16, "f32": T.F32, "q8_0": T.Q8_0}
LORA_SUFFIXES = (".lora_a", ".lora_b")
# peft's saved keys: "base_model.model.<module>.lora_A.weight" (the adapter name is stripped on save).
_PEFT_KEY_RE = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")


@dataclass
class AdapterSummary:
    """What an adapter GGUF holds, as checked against its base."""

    path: Path
    architecture: str
    alpha: float | None
    ranks: list[int]
    base_tensors: list[str]  # adapted base tensor names, sorted
    tensor_types: dict[str, str] = field(default_factory=dict)  # adapter tensor name -> ggml type name

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "architecture": self.architecture,
            "alpha": self.alpha,
            "ranks": self.ranks,
            "base_tensors": self.base_tensors,
            "tensor_types": self.tensor_types,
        }


# --------------------------------------------------------------------------------------------
# The one shape check, used before writing and when reading an adapter back.


def _base_shapes(base_reader: gguf.GGUFReader) -> dict[str, tuple[int, ...]]:
    """Base tensor name -> numpy-order shape ((out, in) for a linear)."""
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in base_reader.tensors}


def check_pairs(
    adapter_arch: str,
    pair_shapes: dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]],
    base_reader: gguf.GGUFReader,
    base_path: Path,
) -> None:
    """Raise naming the first tensor llama.cpp would refuse: arch, missing half, unknown base, shape."""
    from recover_lora.export.gguf_io import field_value

    base_arch = field_value(base_reader, gguf.Keys.General.ARCHITECTURE)
    if adapter_arch != base_arch:
        raise RecoverLoraError(
            f"adapter architecture {adapter_arch!r} does not match base {base_path.name} ({base_arch!r}); "
            f"use the base GGUF the adapter was trained on"
        )
    base = _base_shapes(base_reader)
    if not pair_shapes:
        raise RecoverLoraError(f"the adapter has no LoRA tensor pairs; nothing to apply to {base_path.name}")
    for name, (a_shape, b_shape) in sorted(pair_shapes.items()):
        if a_shape is None or b_shape is None:
            missing = "lora_a" if a_shape is None else "lora_b"
            raise RecoverLoraError(f"adapter tensor pair for {name!r} lacks its {missing}; the adapter file is incomplete")
        if name not in base:
            raise RecoverLoraError(
                f"adapter tensor {name}.lora_a targets {name!r}, which base {base_path.name} does not have; wrong base model?"
            )
        if len(a_shape) != 2 or len(b_shape) != 2 or len(base[name]) != 2:
            raise RecoverLoraError(f"adapter tensors for {name!r} must be 2-D matrices, got {a_shape} and {b_shape}")
        out_features, in_features = base[name]
        if name.endswith("token_embd.weight"):
            # llama.cpp applies an embedding LoRA with A and B swapped (llm_build_inp_embd).
            expected = f"lora_a ({in_features}, r) and lora_b ({out_features}, r)"
            ok = a_shape[0] == in_features and b_shape[0] == out_features and a_shape[1] == b_shape[1]
        else:
            expected = f"lora_a (r, {in_features}) and lora_b ({out_features}, r)"
            ok = a_shape[1] == in_features and b_shape[0] == out_features and a_shape[0] == b_shape[1]
        if not ok:
            raise RecoverLoraError(
                f"adapter tensor pair for {name!r} has lora_a {a_shape} and lora_b {b_shape} but base "
                f"{base_path.name} holds {name} as {base[name]} (out, in), which needs {expected}; "
                f"was the adapter trained on another (e.g. unpadded) export?"
            )


# --------------------------------------------------------------------------------------------
# peft folder -> LoRA pairs in llama.cpp layout


def read_peft_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(adapter_config dict, {torch module name: (A (r, in), B (out, r))}) from a peft folder."""
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise RecoverLoraError(f"{path} does not exist; give the folder peft's save_pretrained wrote (the run's adapter/)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise RecoverLoraError(f"{config_path} is a {config.get('peft_type')!r} adapter; only LoRA can become a llama.cpp adapter")
    for key in ("use_dora", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise RecoverLoraError(f"{config_path} sets {key}; llama.cpp adapters support plain LoRA with one alpha only")
    if config.get("bias", "none") != "none":
        raise RecoverLoraError(f"{config_path} trains biases (bias={config['bias']!r}); llama.cpp LoRA adapters cannot hold them")
    tensors = load_file(weights_path)
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        match = _PEFT_KEY_RE.fullmatch(key)
        if match is None:
            raise RecoverLoraError(f"{weights_path.name} holds {key!r}, which is not a LoRA A/B weight of a linear layer")
        halves.setdefault(match["module"], {})[match["ab"]] = array.astype(np.float32)
    pairs = {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise RecoverLoraError(f"{weights_path.name} has only lora_{''.join(ab)} for {module}; the adapter is incomplete")
        pairs[module] = (ab["A"], ab["B"])
    return config, pairs


def gguf_alpha(peft_config: dict) -> float:
    """The adapter.lora.alpha that makes llama.cpp's alpha / r equal peft's scaling."""
    alpha, rank = float(peft_config["lora_alpha"]), int(peft_config["r"])
    # rsLoRA scales by alpha / sqrt(r); llama.cpp always divides by r.
    return alpha * math.sqrt(rank) if peft_config.get("use_rslora") else alpha


def llama_cpp_pairs(
    module_pairs: dict[str, tuple[np.ndarray, np.ndarray]], base_config
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module: (A, B)} in Hugging Face layout -> {GGUF base tensor name: (A, B)} in llama.cpp layout."""
    out = {}
    for module, (a, b) in module_pairs.items():
        out[gguf_name(f"{module}.weight", base_config)] = (a, base_config.arch.lora_delta_to_gguf(module, b, base_config))
    return out


def check_peft_adapter_against_base(adapter_dir: str | Path, base_gguf: str | Path):
    """Check a peft folder against the base GGUF before loading or exporting it.

    Returns (adapter_config, {GGUF base tensor: (A, B)} in llama.cpp layout, base GGUFReader).
    """
    from recover_lora.export.gguf_io import config_from_gguf, field_value, open_gguf

    base_path = Path(base_gguf)
    reader = open_gguf(base_path)
    peft_config, module_pairs = read_peft_adapter(adapter_dir)
    pairs = llama_cpp_pairs(module_pairs, config_from_gguf(reader))
    arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    check_pairs(arch, {n: (a.shape, b.shape) for n, (a, b) in pairs.items()}, reader, base_path)
    return peft_config, pairs, reader


def _encode(array: np.ndarray, ggml_type: T) -> tuple[np.ndarray, T]:
    """Array in the requested type; Q8_0 needs rows that are a multiple of 32 (else F16)."""
    if ggml_type == T.F32:
        return np.ascontiguousarray(array, dtype=np.float32), T.F32
    if ggml_type == T.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), T.Q8_0), T.Q8_0
    return np.ascontiguousarray(array, dtype=np.float16), T.F16


def write_adapter_gguf(
    adapter_dir: str | Path, base_gguf: str | Path, out_path: str | Path, dtype: str = "f16", force: bool = False
) -> AdapterSummary:
    """Write a peft LoRA folder as a llama.cpp LoRA GGUF for `base_gguf`, after checking every shape.

    Args:
        adapter_dir: folder with adapter_config.json and adapter_model.safetensors.
        base_gguf: the quantized model the adapter was trained on (the student).
        out_path: the adapter .gguf to write (atomically).
        dtype: "f16" (default), "f32" or "q8_0" (Q8_0 rows must be multiples of 32; lora_b with a
            smaller rank stays F16).

    Example:
        write_adapter_gguf("runs/demo/adapter", "smollm2.gateup.gguf", "runs/demo/adapter.gguf")
    """
    from recover_lora.export.gguf_io import field_value

    if dtype not in ADAPTER_DTYPES:
        raise RecoverLoraError(f"adapter dtype {dtype!r} is unknown; use one of: {', '.join(ADAPTER_DTYPES)}")
    peft_config, pairs, reader = check_peft_adapter_against_base(adapter_dir, base_gguf)
    arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    alpha = gguf_alpha(peft_config)
    types = {}
    with atomic_output(out_path, force) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type("adapter")
        writer.add_name(f"{field_value(reader, gguf.Keys.General.NAME, 'model')} Recover-LoRA")
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name in sorted(pairs):
            for suffix, array in zip(LORA_SUFFIXES, pairs[name]):
                data, ggml_type = _encode(array, ADAPTER_DTYPES[dtype])
                writer.add_tensor(name + suffix, data, raw_dtype=ggml_type)
                types[name + suffix] = ggml_type.name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return AdapterSummary(
        path=Path(out_path),
        architecture=arch,
        alpha=alpha,
        ranks=sorted({a.shape[0] for a, _ in pairs.values()}),
        base_tensors=sorted(pairs),
        tensor_types=types,
    )


def check_adapter_against_base(adapter_gguf: str | Path, base_gguf: str | Path) -> AdapterSummary:
    """Refuse an adapter GGUF that llama.cpp would reject (or misapply) on this base, naming the tensor.

    Checks general.type, adapter.type, the architecture, that every tensor is half of a complete
    lora_a/lora_b pair for a tensor the base has, and llama.cpp's shape rules.

    Example:
        check_adapter_against_base("runs/demo/adapter.gguf", "smollm2.gateup.gguf").ranks  # [16]
    """
    from recover_lora.export.gguf_io import field_value, open_gguf

    adapter_path, base_path = Path(adapter_gguf), Path(base_gguf)
    adapter = open_gguf(adapter_path)
    general_type = field_value(adapter, gguf.Keys.General.TYPE)
    if general_type != "adapter":
        raise RecoverLoraError(f"{adapter_path.name} has general.type={general_type!r}, not 'adapter'; is it a model file?")
    adapter_type = field_value(adapter, gguf.Keys.Adapter.TYPE)
    if adapter_type != "lora":
        raise RecoverLoraError(f"{adapter_path.name} has adapter.type={adapter_type!r}; only 'lora' adapters are supported")
    shapes: dict[str, list] = {}
    types = {}
    for tensor in adapter.tensors:
        suffix = next((s for s in LORA_SUFFIXES if tensor.name.endswith(s)), None)
        if suffix is None:
            if tensor.name.endswith("_norm.weight"):  # llama.cpp skips these
                continue
            raise RecoverLoraError(f"adapter tensor {tensor.name!r} ends in neither .lora_a nor .lora_b; llama.cpp refuses it")
        base_name = tensor.name[: -len(suffix)]
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        shapes.setdefault(base_name, [None, None])[LORA_SUFFIXES.index(suffix)] = shape
        types[tensor.name] = gguf.GGMLQuantizationType(int(tensor.tensor_type)).name
    base = open_gguf(base_path)
    arch = field_value(adapter, gguf.Keys.General.ARCHITECTURE)
    check_pairs(arch, {n: tuple(s) for n, s in shapes.items()}, base, base_path)
    alpha = field_value(adapter, gguf.Keys.Adapter.LORA_ALPHA)
    return AdapterSummary(
        path=adapter_path,
        architecture=arch,
        alpha=None if alpha is None else float(alpha),
        ranks=sorted({b[1] for _, b in shapes.values()}),
        base_tensors=sorted(shapes),
        tensor_types=types,
    )
