"""`inspect`: per-tensor types, counts per type, bytes and bits per weight of any GGUF."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf

from recover_lora.export.policy import is_block_linear


@dataclass
class TensorSummary:
    name: str
    ggml_type: str
    shape: list[int]  # numpy order: (out, in) for a linear weight
    n_elements: int  # as stored, padding included
    n_bytes: int
    # The model's own parameters in this tensor: `n_elements` less the zeros a padded export added.
    model_elements: int


@dataclass
class GGUFSummary:
    path: str
    file_bytes: int
    architecture: str | None
    model_name: str | None
    general_type: str | None
    tensors: list[TensorSummary]
    unpadded: dict[str, int]

    @property
    def n_weights(self) -> int:
        """Weights stored, padding included."""
        return sum(t.n_elements for t in self.tensors)

    @property
    def model_parameters(self) -> int:
        """The model's own parameter count (what bits per weight are over; equal to n_weights unless padded)."""
        return sum(t.model_elements for t in self.tensors)

    def count_by_type(self) -> dict[str, int]:
        return dict(Counter(t.ggml_type for t in self.tensors))

    def bytes_by_type(self) -> dict[str, int]:
        totals: Counter = Counter()
        for t in self.tensors:
            totals[t.ggml_type] += t.n_bytes
        return dict(totals)

    @staticmethod
    def _bits_per_weight(tensors: list[TensorSummary], n_bytes: int | None = None, padded: bool = False) -> float | None:
        # Over the model's own parameters: a padded file's zeros cost bytes but are not weights of the model.
        elements = sum(t.n_elements if padded else t.model_elements for t in tensors)
        n_bytes = sum(t.n_bytes for t in tensors) if n_bytes is None else n_bytes
        return 8 * n_bytes / elements if elements else None

    @property
    def linear_bits_per_weight(self) -> float | None:
        """Bits per weight of the block linear layers (attention and MLP projections), over their own parameters."""
        return self._bits_per_weight([t for t in self.tensors if is_block_linear(t.name)])

    @property
    def tensor_bits_per_weight(self) -> float | None:
        """Bits per weight of all tensor data, over the model's own parameters."""
        return self._bits_per_weight(self.tensors)

    @property
    def file_bits_per_weight(self) -> float | None:
        """The whole file (metadata and vocabulary included) over the model's own parameters."""
        return self._bits_per_weight(self.tensors, n_bytes=self.file_bytes)

    @property
    def padded_file_bits_per_weight(self) -> float | None:
        """The whole file over the weights it stores, padding zeros included (None if nothing is padded)."""
        return self._bits_per_weight(self.tensors, n_bytes=self.file_bytes, padded=True) if self.unpadded else None

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(
            count_by_type=self.count_by_type(),
            bytes_by_type=self.bytes_by_type(),
            linear_bits_per_weight=self.linear_bits_per_weight,
            tensor_bits_per_weight=self.tensor_bits_per_weight,
            file_bits_per_weight=self.file_bits_per_weight,
            model_parameters=self.model_parameters,
            n_weights_stored=self.n_weights,
            padded_file_bits_per_weight=self.padded_file_bits_per_weight,
        )
        return data


def summarize_gguf(path: str | Path) -> GGUFSummary:
    """Read a GGUF's metadata and tensor table (no tensor data is read).

    Example:
        summarize_gguf("smollm2.gateup.gguf").count_by_type()   # {'Q2_K': 60, 'Q4_K': 150, ...}
    """
    from recover_lora.export.gguf_io import open_gguf

    return summary_from_reader(open_gguf(path), path)


def summary_from_reader(reader: gguf.GGUFReader, path: str | Path) -> GGUFSummary:
    """The summary of an already opened GGUF (for callers that check the file their own way first)."""
    from recover_lora.export.gguf_io import UNPADDED_KEY_PREFIX, field_value

    unpadded = {
        key[len(UNPADDED_KEY_PREFIX):]: int(field_value(reader, key)) for key in reader.fields if key.startswith(UNPADDED_KEY_PREFIX)
    }
    own_shapes = unpadded_shapes(reader, unpadded) if unpadded else {}
    tensors = [
        TensorSummary(
            name=t.name,
            ggml_type=gguf.GGMLQuantizationType(t.tensor_type).name,
            shape=[int(d) for d in reversed(t.shape.tolist())],
            n_elements=int(t.n_elements),
            n_bytes=int(t.n_bytes),
            model_elements=math.prod(own_shapes[t.name]) if t.name in own_shapes else int(t.n_elements),
        )
        for t in reader.tensors
    ]
    return GGUFSummary(
        path=str(path),
        file_bytes=Path(path).stat().st_size,
        architecture=field_value(reader, gguf.Keys.General.ARCHITECTURE),
        model_name=field_value(reader, gguf.Keys.General.NAME),
        general_type=field_value(reader, gguf.Keys.General.TYPE),
        tensors=tensors,
        unpadded=unpadded,
    )


def unpadded_shapes(reader: gguf.GGUFReader, unpadded: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> its shape before `export.pad` padded it, from the widths a padded export records."""
    from recover_lora.export.gguf_io import config_from_gguf

    padded = config_from_gguf(reader)
    own = dataclasses.replace(padded, **unpadded)
    return own.arch.gguf_tensor_shapes(own)


def format_summary(summary: GGUFSummary, per_tensor: bool = True) -> str:
    lines = [f"{summary.path}: {summary.architecture} '{summary.model_name}', {summary.file_bytes / 2**20:.2f} MiB"]
    if summary.unpadded:
        lines.append("padded from: " + ", ".join(f"{k}={v}" for k, v in summary.unpadded.items()))
    if per_tensor:
        width = max((len(t.name) for t in summary.tensors), default=10)
        lines.append(f"{'tensor':<{width}}  {'type':<7} {'shape':<18} {'bytes':>12}")
        for t in summary.tensors:
            lines.append(f"{t.name:<{width}}  {t.ggml_type:<7} {'x'.join(map(str, t.shape)):<18} {t.n_bytes:>12,}")
    counts, sizes = summary.count_by_type(), summary.bytes_by_type()
    lines.append("type     tensors          bytes")
    for ggml_type in sorted(counts, key=lambda k: -sizes[k]):
        lines.append(f"{ggml_type:<8} {counts[ggml_type]:>7} {sizes[ggml_type]:>14,}")

    def bits(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines.append(
        f"bits/weight over the model's {summary.model_parameters:,} parameters: linear layers {bits(summary.linear_bits_per_weight)}, "
        f"all tensors {bits(summary.tensor_bits_per_weight)}, whole file {bits(summary.file_bits_per_weight)}"
    )
    if summary.unpadded:
        lines.append(f"padded: {summary.n_weights:,} weights stored ({summary.n_weights / summary.model_parameters - 1:+.1%}), "
                     f"whole file {bits(summary.padded_file_bits_per_weight)} bits per stored weight")
    return "\n".join(lines)


def write_summary_json(summary: GGUFSummary, path: str | Path, force: bool = True) -> None:
    from recover_lora.fileio import atomic_output

    with atomic_output(path, force=force) as tmp:
        tmp.write_text(json.dumps(summary.to_dict(), indent=2))
