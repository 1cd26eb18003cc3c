"""A GGUF tensor in torch whose rounding and block scales learn, in its own ggml format (SignRound on ggml's blocks).

SignRound (Cheng et al., arXiv 2309.05516; Intel's AutoRound) keeps a format's integer structure and
learns (a) an offset V in [-0.5, 0.5] per weight that decides which way it rounds, and (b) the
quantization scales, by signed gradient descent on a block's output error. Here the format is the
tensor's ggml type (export/ggml_blocks), so every value the forward pass uses is one its bits can hold:

    codes        clamp(round(code_float(W) + V)), code_float from the current scales: (W - w0) / step,
                 where w0 and step are the sub-block's weight at code 0 and its increment per code
                 (every supported type but IQ4_NL / IQ4_XS is affine in the code: weight = step · code + w0)
    scale codes  clamp(round((code0 - offset) · β) + offset), β per sub-block (and min codes alike)
    d, dmin, m   fp16(value0 · α), α per super-block

each with a straight-through gradient. IQ4_NL's and IQ4_XS's codes index a 16-level codebook: code_float is the
fractional index of W / s (s the sub-block's level scale: IQ4_NL's d, IQ4_XS's d · (sc - 32)) between the two
nearest levels (round(index) is the nearest level, as ggml's best_index_int8), V moves it in index units and
the gradient is the codebook's local slope. IQ3_S's and IQ3_XXS's codes name a grid point per group of 4 weights: V
(one per weight, in level steps) moves W / s, each group takes the grid point nearest its moved magnitudes and each
weight the moved value's sign (IQ3_XXS: where 8 weights have an odd number of negatives, the smallest flips, as its
format needs), and the gradient is the moved value's (straight through the choice).

Every straight-through value is `rounded + (x - x.detach())`: the forward adds an exact 0, so the weight
trained against is bit for bit `type(blocks).torch_dequantize` of the fields `to_blocks` writes, which is
`gguf.quants.dequantize` of their bytes (tests check every type).

V starts at 0 wherever the GGUF's code is the nearest one under its scales (llama.cpp rounds to nearest
under the scales it chose, so almost everywhere), and elsewhere at the smallest offset that gives back the
GGUF's code (within [-0.5, 0.5]), with every multiplier at 1: before the first step the module is the input
GGUF. V must not start at `code - code_float` everywhere, though that also gives back the codes: it puts every
weight at the middle of its rounding interval, half a code from any flip, where SignRound's steps (Σ lr ≈ 0.5
over a whole run) can hardly flip one; from 0, a weight near a rounding boundary flips with a small step, as in
SignRound.

Example:
    weight = QuantizedWeight(from_bytes(tensor.data, tensor.tensor_type), teacher_weight_in_gguf_rows)
    loss(weight()).backward(); signed_step(weight.parameters(), lr=1 / 200)
    raw = weight.to_blocks().to_bytes()
"""

from __future__ import annotations

import torch
from torch import nn

from recover_lora.errors import RecoverLoraError
from recover_lora.export.ggml_blocks import IQ4_NL_VALUES, CodebookBlocks, GGMLBlocks, GridBlocks, HalfField
from recover_lora.export.ggml_blocks.iq_grid import GROUP, even_sign_parity, nearest_grid_points

OFFSET_RANGE = (-0.5, 0.5)  # SignRound's V: at most half a code either way from round-to-nearest
# An IQ grid type's V, in level steps: its grid holds some 4-tuples of levels only, and llama.cpp chooses a group's point
# under the sub-block's scale before that scale is rounded to 4 bits, so its point can lie several levels from the
# weights under the stored scale; V must reach it for the module to start as the file. Training moves V by Σ lr anyway.
GRID_OFFSET_RANGE = (-16.0, 16.0)
MULTIPLIER_RANGE = (0.5, 1.5)  # scale multipliers; SignRound moves them by at most Σ lr (= iters · lr / 2 decayed)


def straight_through(value: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """`rounded` exactly in the forward (it adds value - value = 0), the gradient of `value` backward."""
    return rounded + (value - value.detach())


class QuantizedWeight(nn.Module):
    """One quantized tensor [rows, cols] in GGUF row order; `forward()` is its dequantized weight, differentiable.

    Args:
        blocks: the tensor's blocks as the GGUF holds them (`ggml_blocks.from_bytes`).
        target: float32 [rows, cols], the full-precision weight in the same (GGUF) row order; the codes
            are rounded from it under the current scales.
    """

    def __init__(self, blocks: GGMLBlocks, target: torch.Tensor):
        super().__init__()
        self.blocks_type = type(blocks)
        self.shape = tuple(target.shape)
        self.grid = issubclass(self.blocks_type, GridBlocks)
        n, sub_blocks, per_sub_block = blocks.n_blocks, self.blocks_type.SUB_BLOCKS, self.blocks_type.WEIGHTS_PER_SUB_BLOCK
        if target.numel() != n * sub_blocks * per_sub_block:
            raise RecoverLoraError(f"a {tuple(target.shape)} weight does not fit {n} {self.blocks_type.GGML_TYPE.name} blocks")
        fields = blocks.to_torch()
        self.register_buffer("target", target.detach().to(torch.float32).reshape(n, sub_blocks, per_sub_block).clone(), persistent=False)
        # The scale fields (a grid type's signs are chosen with its codes, from the weights).
        self.others = [name for name in self.blocks_type.FIELDS if name not in ("codes", "signs")]
        for name in self.others:
            self.register_buffer(f"{name}0", fields[name], persistent=False)
        # Multipliers on every scale field: one per super-block for fp16 fields, one per sub-block for integer codes.
        self.multipliers = nn.ParameterDict({name: nn.Parameter(torch.ones_like(fields[name])) for name in self.others})
        self.offset_range = GRID_OFFSET_RANGE if self.grid else OFFSET_RANGE
        self.offsets = nn.Parameter(torch.zeros_like(self.target if self.grid else fields["codes"]))
        if self.grid:
            self._start_at_the_files_grid_points(fields)
            return
        with torch.no_grad():  # V = 0 where the GGUF's code is the nearest, else the offset that gives it back
            code_float = self.code_float(self.scale_fields())
            nearest = code_float.clamp(self.blocks_type.FIELDS["codes"].low, self.blocks_type.FIELDS["codes"].high).round()
            needed = (fields["codes"] - code_float).clamp(*OFFSET_RANGE)
            self.offsets.copy_(torch.where(nearest == fields["codes"], torch.zeros_like(needed), needed))

    # -- the fields, as they will be stored, with straight-through gradients ---------------------
    def scale_fields(self) -> dict[str, torch.Tensor]:
        fields = {}
        for name in self.others:
            spec, start, multiplier = self.blocks_type.FIELDS[name], getattr(self, f"{name}0"), self.multipliers[name]
            if isinstance(spec, HalfField):
                value = start * multiplier
                fields[name] = straight_through(value, value.detach().half().float())
            else:  # integer codes: scaled around the value ggml subtracts (Q3_K's scales are code - 32)
                offset = getattr(self.blocks_type, "SCALE_OFFSET", 0) if name == "scale_codes" else 0
                value = ((start - offset) * multiplier + offset).clamp(spec.low, spec.high)
                fields[name] = straight_through(value, value.detach().round())
        return fields

    def sub_block_grid(self, scales: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Per sub-block [n, S, 1]: the weight at code 0 (w0), its increment per code (step), 1 / step, and the fill code.

        ggml's formula broadcasts over the code axis, so it gives w0 and w0 + step at a sub-block's cost.
        A sub-block of step 0 holds w0 whatever its codes: inverse 0 and the fill code (that of value 0, as
        ggml_blocks' encode chooses) give it that code.
        """
        n, sub_blocks, _ = self.target.shape
        at = lambda code: self.blocks_type.torch_dequantize(codes=torch.full((n, sub_blocks, 1), float(code), device=self.target.device),
                                                            **scales).reshape(n, sub_blocks, 1)
        w0 = at(0)
        step = at(1) - w0
        usable = step != 0
        inverse = usable / torch.where(usable, step, torch.ones_like(step))
        fill = torch.where(usable, torch.zeros_like(step), torch.full_like(step, float(self.blocks_type.CODE_OFFSET)))
        return w0, step, inverse, fill

    def code_float(self, scales: dict[str, torch.Tensor]) -> torch.Tensor:
        """Real-valued codes of the target under these scales (before V and rounding)."""
        if issubclass(self.blocks_type, CodebookBlocks):
            return codebook_index(self.target, self.blocks_type.level_scale(**scales))
        w0, _, inverse, fill = self.sub_block_grid(scales)
        return (self.target - w0) * inverse + fill

    # -- IQ grid types: V moves the weights (in level steps) whose nearest grid point the codes and signs are --------
    def grid_target(self, scales: dict[str, torch.Tensor]) -> torch.Tensor:
        """The target in the grid's level units under these scales, V added: [n, S, W] (0 where a sub-block's scale is 0)."""
        scale = self.blocks_type.level_scale(**scales)
        scaled = torch.where(scale == 0, torch.zeros_like(self.target), self.target / torch.where(scale == 0, torch.ones_like(scale), scale))
        return scaled + self.blocks_type.LEVEL_STEP * self.offsets

    def grid_fields(self, scales: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the moved target in level units, its codes and signs): each group's nearest grid point, the weights' signs."""
        moved = self.grid_target(scales)
        n, sub_blocks, per_sub_block = moved.shape
        with torch.no_grad():
            codes = nearest_grid_points(moved.abs().reshape(n, sub_blocks, per_sub_block // GROUP, GROUP), self.blocks_type)
            signs = (moved < 0).float()
            if self.blocks_type.SIGN_PARITY_GROUP:  # IQ3_XXS stores 7 signs of 8: flip the smallest where the count is odd
                signs = even_sign_parity(signs, moved.abs(), self.blocks_type.SIGN_PARITY_GROUP)
        return moved, {"codes": codes.float(), "signs": signs}

    def signed_grid_points(self, chosen: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each weight's grid magnitude times its sign, in level units, [n, S, W], from a grid type's codes and signs."""
        points = torch.as_tensor(self.blocks_type.GRID, device=self.target.device)[chosen["codes"].long()]
        return points.reshape(self.target.shape) * (1 - 2 * chosen["signs"])

    def _start_at_the_files_grid_points(self, fields: dict) -> None:
        """V = 0 for a group whose nearest grid point (and signs) are the GGUF's, else the V that puts the group on the
        GGUF's point (within GRID_OFFSET_RANGE): before any step the module is the input file wherever reachable."""
        with torch.no_grad():
            scales = self.scale_fields()
            _, nearest = self.grid_fields(scales)
            stored = self.signed_grid_points(fields)
            n, sub_blocks, _ = stored.shape
            # Whole groups of a grid point, or of a sign parity where that spans more (IQ3_XXS's 8): moving one group of 4
            # onto the file's signs could change which weight a parity flip takes in the other.
            unit = max(GROUP, self.blocks_type.SIGN_PARITY_GROUP or 0)
            same = (self.signed_grid_points(nearest) == stored).reshape(n, sub_blocks, -1, unit).all(-1).repeat_interleave(unit, dim=-1)
            needed = ((stored - self.grid_target(scales)) / self.blocks_type.LEVEL_STEP).clamp(*GRID_OFFSET_RANGE)
            self.offsets.copy_(torch.where(same, torch.zeros_like(needed), needed))

    def fields(self) -> dict[str, torch.Tensor]:
        """Every field of the blocks type, each exactly a value its bits hold (forward), differentiable (backward)."""
        scales = self.scale_fields()
        if self.grid:
            return {**self.grid_fields(scales)[1], **scales}
        spec = self.blocks_type.FIELDS["codes"]
        codes = (self.code_float(scales) + self.offsets).clamp(spec.low, spec.high)
        return {"codes": straight_through(codes, codes.detach().round()), **scales}

    def forward(self) -> torch.Tensor:
        if self.grid:  # weight = scale · (grid point · sign), with the moved target's gradient through the choice
            scales = self.scale_fields()
            moved, chosen = self.grid_fields(scales)
            weight = self.blocks_type.level_scale(**scales) * straight_through(moved, self.signed_grid_points(chosen))
        elif issubclass(self.blocks_type, CodebookBlocks):  # a codebook lookup has no gradient: the levels' local slope instead
            fields = self.fields()
            codes = fields.pop("codes")
            weight = self.blocks_type.level_scale(**fields) * codebook_values(codes)
        else:
            scales = self.scale_fields()
            spec = self.blocks_type.FIELDS["codes"]
            dequantize = lambda codes: self.blocks_type.torch_dequantize(codes=codes, **scales).reshape(codes.shape)
            weight = _RoundedCodes.apply(self.offsets, *self.sub_block_grid(scales), self.target, spec.low, spec.high, dequantize)
        return weight.reshape(self.shape)

    def to_blocks(self) -> GGMLBlocks:
        """The blocks the forward pass computes with: `to_blocks().to_bytes()` dequantizes to `forward()`."""
        with torch.no_grad():
            fields = {name: value.cpu().numpy() for name, value in self.fields().items()}
        return self.blocks_type.encode(**fields)

    def clamp_(self) -> None:
        """Keep V and the multipliers in their ranges (after each step)."""
        with torch.no_grad():
            self.offsets.clamp_(*self.offset_range)
            for multiplier in self.multipliers.values():
                multiplier.clamp_(*MULTIPLIER_RANGE)


class _RoundedCodes(torch.autograd.Function):
    """weight = ggml's formula at codes = clamp(round((target - w0) · inverse + fill + V)), with SignRound's gradient.

    The same values as `fields()` followed by `torch_dequantize` (the codes are computed by the same
    operations in the same order), but backward in a handful of passes over the weights instead of
    autograd's dozens: with weight = step · code + w0 per sub-block and a straight-through round,
        dV      = g · step           where the code is inside its range (0 where clamped)
        dstep   = Σ g · code         dw0 = Σ g - inverse · Σ dV      dinverse = Σ dV · (target - w0)
    sums over each sub-block's weights; autograd takes w0, step and inverse back to the scale fields.
    This is what makes a block's step affordable on a CPU (measured on SmolLM2-135M: 3-4x less time per step).
    """

    @staticmethod
    def forward(ctx, offsets, w0, step, inverse, fill, target, low, high, dequantize):
        rounded = (target - w0) * inverse + fill + offsets
        in_range = (rounded >= low) & (rounded <= high)
        codes = rounded.clamp_(low, high).round_()
        ctx.save_for_backward(codes, in_range, target, w0, step, inverse)
        return dequantize(codes)

    @staticmethod
    def backward(ctx, grad):
        codes, in_range, target, w0, step, inverse = ctx.saved_tensors
        per_sub_block = lambda values: values.sum(dim=-1, keepdim=True)
        grad_offsets = grad * step * in_range
        grad_w0 = per_sub_block(grad) - inverse * per_sub_block(grad_offsets)
        return (grad_offsets, grad_w0, per_sub_block(grad * codes), per_sub_block(grad_offsets * (target - w0)),
                None, None, None, None, None)


def codebook_index(target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """IQ4_NL / IQ4_XS: W / scale (the level scale, [n, S, 1]) as a fractional index into the sorted levels,
    linear between neighbours (0..15)."""
    levels = torch.as_tensor(IQ4_NL_VALUES, device=target.device)
    scaled = torch.where(scale == 0, torch.zeros_like(target), target / torch.where(scale == 0, torch.ones_like(scale), scale))
    low = (torch.searchsorted(levels, scaled.detach().contiguous(), right=True) - 1).clamp(0, len(levels) - 2)
    below, above = levels[low], levels[low + 1]
    return (low + (scaled - below) / (above - below)).clamp(0, len(levels) - 1)


def codebook_values(codes: torch.Tensor) -> torch.Tensor:
    """IQ4_NL's levels of (straight-through) integer codes: the level exactly, its local step (central difference) backward."""
    levels = torch.as_tensor(IQ4_NL_VALUES, device=codes.device)
    local_step = torch.gradient(levels)[0]
    index = codes.detach().round().long()
    return levels[index] + (codes - codes.detach()) * local_step[index]


def signed_step(parameters, lr: float) -> None:
    """SignRound's update: every parameter moves by lr against the sign of its gradient."""
    with torch.no_grad():
        for parameter in parameters:
            if parameter.grad is not None:
                parameter -= lr * torch.sign(parameter.grad)
                parameter.grad = None
