"""Distil a Q2_K tensor's own scales: its 2-bit codes stay, its block scales and mins learn.

mlx-lm's DWQ trains the scales and biases of its quantized groups by KL to the full-precision
model; this is the same idea on llama.cpp's Q2_K blocks. Per 256-weight block the trainable
numbers are the fp16 super-block scales `d` and `dmin` (as log-multipliers of their exported
values, so one learning rate fits every tensor's magnitude) and the sixteen 4-bit scale and min
codes (as real numbers in code units). The forward pass rounds each to its storage format — fp16,
integers 0..15 — with a straight-through gradient, so the weights the student trains against are
exactly the weights `to_blocks` writes: the GGUF after training is the model that was trained.

Tried by hand and left out: training the 2-bit codes too, as real numbers rounded in the forward
with a straight-through gradient (AdamW, 50x this rate). Adam moves every code at the same pace
whatever its gradient's size, so codes cross their rounding boundary together: on the default
model the training KL matched the scales-only run until step 14, then rose from 0.34 to 0.65 by
step 22 as codes began to flip; on stories260K it jumped from 0.55 to 5.5 at once. Rates above 1e-3
are not only a rounding problem: with the 4-bit scale codes frozen, d/dmin alone at 1e-2 (with the
recover step's LoRA) trained to a KL of 0.42 over steps 17-24 where the 1e-3 run was at 0.35.

Example:
    replaced = replace_with_block_scales(student, info, ["blk.0.ffn_gate.weight", ...])
    ...train...
    save_block_scales(replaced, run_dir / BLOCK_SCALES_FILE, info)
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from recover_lora.errors import RecoverLoraError
from recover_lora.export.ggml_blocks import Q2KBlocks

BLOCK_SCALES_FILE = "block_scales.safetensors"
# Adam moves every parameter by about its learning rate per step. The codes live on a 0..15 grid, the
# log-multipliers of d/dmin near 0: one code step is ~1/15 of a sub-block's range, so the codes take
# a larger rate than the multipliers to move by a comparable fraction of the weights' range.
CODE_LR_MULTIPLIER = 20.0


def _straight_through(value: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """`rounded` forward, identity backward."""
    return value + (rounded - value).detach()


def _stored(codes: torch.Tensor, field) -> torch.Tensor:
    """Real-valued codes as the field's bits hold them: clamped to its range, rounded."""
    return codes.clamp(field.low, field.high).round()


class Q2KWeight(nn.Module):
    """A Q2_K tensor in torch whose scales train; `forward()` is the dequantized weight [out, in]."""

    def __init__(self, blocks: Q2KBlocks, shape: tuple[int, int]):
        super().__init__()
        self.shape = shape
        self.register_buffer("codes", torch.from_numpy(blocks.codes.astype(np.uint8)), persistent=False)
        self.register_buffer("d0", torch.from_numpy(blocks.d.astype(np.float32)), persistent=False)
        self.register_buffer("dmin0", torch.from_numpy(blocks.dmin.astype(np.float32)), persistent=False)
        self.log_d = nn.Parameter(torch.zeros(blocks.n_blocks))
        self.log_dmin = nn.Parameter(torch.zeros(blocks.n_blocks))
        self.scale_codes = nn.Parameter(torch.from_numpy(blocks.scale_codes.astype(np.float32)))
        self.min_codes = nn.Parameter(torch.from_numpy(blocks.min_codes.astype(np.float32)))

    def rounded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(d, dmin, scale codes, min codes) exactly as they will be stored, with straight-through gradients."""
        d = self.d0 * torch.exp(self.log_d)
        dmin = self.dmin0 * torch.exp(self.log_dmin)
        d = _straight_through(d, d.detach().half().float())
        dmin = _straight_through(dmin, dmin.detach().half().float())
        scale_codes = _straight_through(self.scale_codes, _stored(self.scale_codes.detach(), Q2KBlocks.FIELDS["scale_codes"]))
        min_codes = _straight_through(self.min_codes, _stored(self.min_codes.detach(), Q2KBlocks.FIELDS["min_codes"]))
        return d, dmin, scale_codes, min_codes

    def forward(self) -> torch.Tensor:
        d, dmin, scale_codes, min_codes = self.rounded()
        # ggml's dequantize_row_q2_K, operation for operation: bit-identical to what the GGUF will hold.
        weight = Q2KBlocks.torch_dequantize(codes=self.codes.to(d.dtype), scale_codes=scale_codes, min_codes=min_codes, d=d, dmin=dmin)
        return weight.reshape(self.shape)

    def to_blocks(self) -> Q2KBlocks:
        with torch.no_grad():
            d, dmin, scale_codes, min_codes = self.rounded()
        return Q2KBlocks(
            codes=self.codes.cpu().numpy(),
            scale_codes=scale_codes.cpu().numpy().astype(np.uint8),
            min_codes=min_codes.cpu().numpy().astype(np.uint8),
            d=d.cpu().numpy(),
            dmin=dmin.cpu().numpy(),
        )

    def code_parameters(self) -> list[nn.Parameter]:
        return [self.scale_codes, self.min_codes]

    def multiplier_parameters(self) -> list[nn.Parameter]:
        return [self.log_d, self.log_dmin]


class BlockScaledLinear(nn.Module):
    """Drop-in for the nn.Linear of a Q2_K tensor: the same forward, with trainable block scales."""

    def __init__(self, q2k: Q2KWeight, bias: torch.Tensor | None):
        super().__init__()
        self.q2k = q2k
        self.in_features, self.out_features = q2k.shape[1], q2k.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.q2k()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.q2k().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def q2k_tensor(tensors: dict, name: str, gguf_path: Path) -> tuple[Q2KBlocks, tuple[int, int]]:
    """(blocks, (rows, columns)) of one Q2_K tensor, from a GGUF header's tensors by name."""
    tensor = tensors.get(name)
    if tensor is None:
        raise RecoverLoraError(f"{gguf_path.name} has no tensor {name}")
    ggml_type = gguf.GGMLQuantizationType(int(tensor.tensor_type))
    if ggml_type != gguf.GGMLQuantizationType.Q2_K:
        raise RecoverLoraError(
            f"block-scale training needs Q2_K tensors; {name} in {gguf_path.name} is {ggml_type.name} "
            f"(export with --low-bit-type Q2_K, or train a LoRA instead)"
        )
    columns, rows = (int(d) for d in tensor.shape[:2])
    return Q2KBlocks.from_bytes(np.asarray(tensor.data)), (rows, columns)


def read_q2k_tensor(gguf_path: str | Path, name: str) -> tuple[Q2KBlocks, tuple[int, int]]:
    """(blocks, (rows, columns)) of one Q2_K tensor of a GGUF."""
    from recover_lora.export.gguf_header import read_gguf_header

    return q2k_tensor({t.name: t for t in read_gguf_header(gguf_path).tensors}, name, Path(gguf_path))


def replace_with_block_scales(student: nn.Module, info, tensor_names: list[str]) -> dict[str, Q2KWeight]:
    """Swap each named Q2_K linear of the student for a BlockScaledLinear; returns GGUF name -> Q2KWeight.

    The swap must not change the model: the torch weight has to be exactly the dequantized blocks
    (true for every linear llama.cpp stores unpermuted, e.g. gate/up/down); anything else is refused.
    """
    from recover_lora.export.gguf_header import read_gguf_header
    from recover_lora.export.model import hf_module_name

    tensors = {t.name: t for t in read_gguf_header(info.gguf_path).tensors}  # one header read for every tensor
    replaced = {}
    for name in tensor_names:
        module_name = hf_module_name(name, info.config)
        parent_name, _, child = module_name.rpartition(".")
        parent = student.get_submodule(parent_name)
        linear = getattr(parent, child)
        blocks, shape = q2k_tensor(tensors, name, info.gguf_path)
        q2k = Q2KWeight(blocks, shape)
        with torch.no_grad():
            same = tuple(linear.weight.shape) == shape and torch.equal(q2k().to(linear.weight.dtype), linear.weight)
        if not same:
            raise RecoverLoraError(f"{name} is not stored as the plain rows of {module_name} (permuted or fused); "
                                   f"block-scale training supports the MLP linears, e.g. ffn_gate/ffn_up")
        setattr(parent, child, BlockScaledLinear(q2k, linear.bias))
        replaced[name] = q2k
    return replaced


def q2k_with_parameters(q2k: Q2KWeight, parameters: dict[str, torch.Tensor]) -> Q2KWeight:
    """A plain Q2KWeight with q2k's codes and these trained values (e.g. gathered from an FSDP-sharded run)."""
    blocks = Q2KBlocks(codes=q2k.codes.cpu().numpy(), scale_codes=np.zeros(q2k.scale_codes.shape, np.float32),
                       min_codes=np.zeros(q2k.min_codes.shape, np.float32), d=q2k.d0.cpu().numpy(), dmin=q2k.dmin0.cpu().numpy())
    plain = Q2KWeight(blocks, q2k.shape)
    plain.load_state_dict(parameters)  # every parameter; the buffers came from q2k
    return plain


def block_scale_parameter_groups(replaced: dict[str, Q2KWeight], lr: float) -> list[dict]:
    return [
        {"params": [p for q in replaced.values() for p in q.multiplier_parameters()], "lr": lr},
        {"params": [p for q in replaced.values() for p in q.code_parameters()], "lr": lr * CODE_LR_MULTIPLIER},
    ]


def save_block_scales(replaced: dict[str, Q2KWeight], path: Path, base_gguf: Path) -> Path:
    """The trained tensors as ggml Q2_K bytes (uint8 [blocks, 84] per GGUF name), written atomically."""
    from safetensors.numpy import save_file

    from recover_lora.fileio import atomic_output

    tensors = {name: q2k.to_blocks().to_bytes() for name, q2k in replaced.items()}
    with atomic_output(path, force=True) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "ggml-q2_k-blocks", "base": Path(base_gguf).name})
    return path


def load_block_scales(path: Path) -> dict[str, np.ndarray]:
    """GGUF name -> Q2_K bytes [blocks, 84] from a run's block_scales.safetensors."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RecoverLoraError(f"{path} cannot be read as trained block scales ({e}); train again with --block-scales") from None


def check_same_codes(trained: dict[str, np.ndarray], base_gguf: Path) -> None:
    """Trained blocks must keep the base's 2-bit codes: anything else came from another export."""
    from recover_lora.export.gguf_header import read_gguf_header

    tensors = {t.name: t for t in read_gguf_header(base_gguf).tensors}
    for name, raw in trained.items():
        tensor = tensors.get(name)
        if tensor is None or gguf.GGMLQuantizationType(int(tensor.tensor_type)) != gguf.GGMLQuantizationType.Q2_K:
            raise RecoverLoraError(f"the trained block scales hold {name}, which is not a Q2_K tensor of {base_gguf.name}; "
                                   f"merge with the GGUF the run was trained on")
        base = np.asarray(tensor.data).reshape(-1)
        if base.size != raw.size or not np.array_equal(Q2KBlocks.from_bytes(raw).codes, Q2KBlocks.from_bytes(base).codes):
            raise RecoverLoraError(f"the trained block scales of {name} do not share {base_gguf.name}'s 2-bit codes; "
                                   f"merge with the GGUF the run was trained on")

