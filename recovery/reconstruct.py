"""`recover-lora reconstruct`: block-wise reconstruction of a quantized GGUF's codes and scales (SignRound on ggml's blocks).

llama.cpp rounds every weight to its nearest code under scales chosen per block of weights, blind to
what the layer's inputs are. AutoRound/SignRound (arXiv 2309.05516) instead tune, one transformer block
at a time, each weight's rounding direction and the quantization scales so the block's *output* on
calibration text matches the full-precision model's. Here that runs on the GGUF's own formats
(recovery/quantized_weight.py): the types, byte sizes and decode speed stay as they are, and stock
llama.cpp reads the result.

For block i, on the calibration windows:
- the input is the student's own (the GGUF, dequantized, its earlier blocks already reconstructed);
- the target (--target) is the teacher's block i applied to that same input ("local", the default: the block's own
  quantization error, as GPTQ measures it), or to the teacher's own input ("chain": AutoRound's and OmniQuant's
  target, where the block also makes up for what its predecessors left);
- the loss is the mean squared error over the counted positions, each output element alike ("mse") or weighted by
  the teacher's Fisher diagonal of that block's output ("fisher", BRECQ's weighting: ½ Σ F Δ² is the KL the
  output error costs to second order);
- signed-gradient steps tune the rounding offsets (--tune codes, the default), the scale multipliers (scales) or
  both; the whole-set error is measured at SNAPSHOTS evenly spaced steps and the best is kept;
- the learned values become valid fields (ggml_blocks encode), and the block's error is measured again
  with exactly those weights: unless it is lower than the input GGUF's own weights give on the same
  inputs, the block keeps its original bytes (recorded as reverted);
- the student's input to block i + 1 is block i's output with the weights written.
Then (--head, the default) the output head, lm_head or the tied token embedding, learns the same way on the
next-token KL from the student's final hidden states (recovery/output_head.py), judged on held-out windows.
Block linears of a type with no block format (F16, the IQ grid types but IQ3_S and IQ3_XXS), or of a type named by
--keep-type (by default IQ3_S and IQ3_XXS: GRID_TYPES_KEPT), are left as they are and listed in the report; an untied
token embedding and every 1-D tensor are never touched.

What it buys on the default model (README "Block-wise reconstruction"): 11-17 % of a searched file's held-out KL at
the same bytes, the output head's stage included; the blocks' own errors fall by 30-70 % on the calibration windows
but by 20-25 % on unseen text (`heldout --block-errors`), whatever the step, weighting or amount of text, and about
half of what is left sits in the tied token embedding / output head. The "chain" target lowered the calibration
windows' KL by 13 % but unseen text's by 1.6 % (it fits the calibration text).

Checkpointed per block (reconstruct_checkpoint.py): a killed run resumes after its last finished block,
re-running the finished blocks forward (cheap) to rebuild the caches; same settings give the same bytes.

Example:
    reconstruct("out/Q4_K_M.gguf", "out/Q4_K_M.rec.gguf", samples="out/synth", max_samples=128)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import gguf

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output, check_output
from recover_lora.recovery.output_head import HeadRecord

if TYPE_CHECKING:
    import torch

DEFAULT_ITERS = 100  # signed-gradient steps per block (AutoRound's default is 200 on 2048-token windows)
DEFAULT_BATCH_SIZE = 8  # windows per step, AutoRound's
DEFAULT_SAMPLES = 128  # calibration windows, AutoRound's nsamples
# Whole-set evaluations of a block's error while it tunes; it keeps the best (a forward pass over every window each:
# on 128 windows and batch 8, about a fifth more time at 100 iters).
SNAPSHOTS = 4
# Kept at llama.cpp's bytes unless asked (--keep-type none): held-out KL with them tuned / kept, IQ3_XXS 0.1434 /
# 0.1323, IQ3_S 0.1271 / 0.1143 on the default model.
GRID_TYPES_KEPT = ("IQ3_S", "IQ3_XXS")
TUNE_CHOICES = ("codes", "scales", "both")
TARGET_CHOICES = ("local", "chain")
WEIGHTING_CHOICES = ("mse", "fisher")
# torch is imported inside the functions: the CLI reads the defaults above without loading it.


@dataclass(frozen=True)
class ReconstructSettings:
    """What the result depends on besides the files: recorded in the checkpoint, so a resume uses the same."""

    iters: int = DEFAULT_ITERS
    lr: float | None = None  # None: 1 / iters (SignRound's default), decayed linearly to 0
    # What learns: "codes" (each weight's rounding offset), "scales" (the scale multipliers), or "both".
    tune: str = "codes"
    # Step of the scale multipliers as a share of `lr` when both learn: one step of a multiplier moves every weight of
    # its (sub-)block at once, where an offset moves one weight's rounding.
    scale_lr_share: float = 0.1
    # The target of block i: "chain" is the teacher's block i on the teacher's own input (AutoRound, OmniQuant: the
    # block also makes up for what earlier blocks left); "local" is the teacher's block i on the student's input (the
    # block's own quantization error, as GPTQ measures it).
    target: str = "local"
    # "mse": every hidden unit and counted token alike; "fisher": each output element weighted by the teacher's Fisher
    # diagonal of that block output (decoder_blocks.block_output_fisher, BRECQ's weighting).
    weighting: str = "mse"
    # Then the output head (lm_head, or the tied token embedding) on the next-token KL (recovery/output_head.py).
    head: bool = True
    # ggml types (names) whose tensors keep their bytes: the others learn around llama.cpp's choice. By default the IQ
    # grid types: choosing a grid point by a straight-through step lost to llama.cpp's point on both files measured
    # (README "Block-wise reconstruction"); () tunes every type with a block format.
    keep_types: tuple[str, ...] = GRID_TYPES_KEPT
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise RecoverLoraError(f"--{name.replace('_', '-')}={value!r} must be a positive integer")
        if self.lr is not None and not self.lr > 0:
            raise RecoverLoraError(f"--lr={self.lr} must be > 0 (or omitted for 1 / iters)")
        for name, choices in (("tune", TUNE_CHOICES), ("target", TARGET_CHOICES), ("weighting", WEIGHTING_CHOICES)):
            if getattr(self, name) not in choices:
                raise RecoverLoraError(f"--{name}={getattr(self, name)!r}: choose one of {', '.join(choices)}")
        if not 0 <= self.scale_lr_share <= 1:
            raise RecoverLoraError(f"--scale-lr-share={self.scale_lr_share} must be within [0, 1] (0 leaves the scales as they are)")
        unknown = [name for name in self.keep_types if name not in gguf.GGMLQuantizationType.__members__]
        if unknown:
            raise RecoverLoraError(f"--keep-type {unknown[0]}: not a ggml type; give names such as IQ3_XXS, IQ3_S or Q2_K")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / self.iters


@dataclass
class BlockRecord:
    block: int
    tensors: dict[str, str]  # GGUF name -> type of the block's tensors that were tuned
    error_before: float  # MSE to the teacher's block output with the input GGUF's weights, on the same inputs
    error_after: float  # with the weights written (the input's, when reverted)
    tuned_error: float  # with the tuned weights, whether kept or not
    kept: bool  # False: the tuned weights were no better, the block keeps its original bytes
    seconds: float


@dataclass
class ReconstructResult:
    path: Path
    report_path: Path
    blocks: list[BlockRecord] = field(default_factory=list)
    untouched: dict[str, str] = field(default_factory=dict)  # block linears (and the head) of types with no block format
    resumed_blocks: int = 0  # blocks taken from the checkpoint
    head: HeadRecord | None = None  # the output head's stage (None: not run)

    @property
    def rewritten(self) -> list[str]:
        head = [self.head.tensor] if self.head is not None and self.head.kept else []
        return sorted([name for record in self.blocks if record.kept for name in record.tensors] + head)


@dataclass
class TensorToTune:
    """A block linear to tune: where it lives in the GGUF and in the layer, its teacher weight in GGUF rows."""

    name: str  # GGUF
    ggml_type: gguf.GGMLQuantizationType
    parameter: str  # in the decoder layer, e.g. "self_attn.q_proj.weight"
    hf_name: str
    shape: tuple[int, int]


def teacher_path(teacher: str | Path | None) -> Path:
    from recover_lora.export.sources import default_model_path, resolve_named

    return default_model_path() if teacher is None else resolve_named(teacher)


def windows_digest(ids, counted) -> str:
    digest = hashlib.sha256(ids.numpy().tobytes())
    digest.update(counted.numpy().tobytes())
    return digest.hexdigest()


def read_base(base_gguf: str | Path, what: str):
    """(path, StudentInfo) of a quantized GGUF a tuner rewrites: it exists and holds the model's own widths."""
    from recover_lora.recovery.student import read_student_info

    base_gguf = Path(base_gguf)
    if not base_gguf.is_file():
        raise RecoverLoraError(f"base GGUF {base_gguf} does not exist; export one first (recover-lora export --pad none ...)")
    info = read_student_info(base_gguf)
    if info.unpadded:
        raise RecoverLoraError(f"{base_gguf.name} was exported with padded widths (recover_lora.unpadded.* keys); "
                               f"{what} needs the model's own widths: export it with --pad none")
    return base_gguf, info


def counted_windows(teacher, samples, text, max_samples, seq_len):
    """The calibration windows (ids, counted positions) that count at least one position."""
    from recover_lora.recovery.imatrix import calibration_windows

    ids, counted, _ = calibration_windows(teacher, samples, text, max_samples, seq_len)
    useful = counted.any(dim=1)
    ids, counted = ids[useful], counted[useful]
    if ids.shape[0] == 0:
        raise RecoverLoraError("the calibration windows have no counted position; give other --samples or --text")
    return ids, counted


def run_identity(base_gguf: Path, teacher, ids, counted, settings) -> dict:
    """Everything a tuner's bytes depend on, checked against its checkpoint before any model is loaded."""
    from recover_lora.fileio import sha256_file
    from recover_lora.recovery.teacher_source import teacher_source_identity

    recorded = asdict(settings)
    # Every type tuned (--keep-type none) is what runs from before the setting existed did: their checkpoints resume.
    if recorded.get("keep_types") == ():
        del recorded["keep_types"]
    return {
        "base": {"name": base_gguf.name, "sha256": sha256_file(base_gguf)},
        "teacher": teacher_source_identity(teacher_path(teacher)),
        "calibration": {"windows": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "sha256": windows_digest(ids, counted)},
        **recorded,
    }


def load_matching_teacher(teacher, info, base_name: str, ids, tensors):
    """The teacher model, checked against the GGUF: architecture, vocabulary of the windows, every tuned tensor's shape."""
    from recover_lora.recovery.student import build_teacher, check_teacher_matches

    teacher_model, teacher_config = build_teacher(teacher)
    check_teacher_matches(teacher_config, info)
    if int(ids.max()) >= teacher_config.vocab_size:
        raise RecoverLoraError(f"the calibration tokens reach id {int(ids.max())} but the teacher's vocabulary has "
                               f"{teacher_config.vocab_size}: they come from another model")
    for t in tensors:
        found = tuple(teacher_model.get_parameter(t.hf_name).shape)
        if found != t.shape:
            raise RecoverLoraError(f"{t.name}: the teacher's weight is {found} but {base_name} holds {t.shape}; "
                                   f"give the --teacher the GGUF was exported from")
    return teacher_model


def tuned_type(ggml_type, keep_types: tuple[str, ...]) -> bool:
    """Whether reconstruct tunes tensors of this type: it has a block format and --keep-type does not name it."""
    from recover_lora.export.ggml_blocks import BLOCK_TYPES

    return ggml_type in BLOCK_TYPES and ggml_type.name not in keep_types


def plan_tensors(info, n_layers: int, keep_types: tuple[str, ...] = ()) -> tuple[list[list[TensorToTune]], dict[str, str]]:
    """Per block, the linears with a block format; and every block linear without one, or of a type in `keep_types`
    (name -> type)."""
    from recover_lora.export.model import hf_name

    per_block, untouched = [[] for _ in range(n_layers)], {}
    for name in info.block_linears():
        ggml_type = info.tensor_types[name]
        if not tuned_type(ggml_type, keep_types):
            untouched[name] = ggml_type.name
            continue
        block = int(name.split(".")[1])
        full = hf_name(name, info.config)
        prefix = f"model.layers.{block}."
        if not full.startswith(prefix):
            raise RecoverLoraError(f"{name} maps to {full}, not a parameter of model.layers.{block}; this architecture is not supported here")
        per_block[block].append(TensorToTune(name, ggml_type, full[len(prefix):], full, info.tensor_shapes[name]))
    return per_block, untouched


def hf_row_order(tensor: TensorToTune, config):
    """Index of each Hugging Face row in GGUF row order (llama.cpp permutes q/k rows), or None if the same."""
    import numpy as np
    import torch

    rows = tensor.shape[0]
    order = np.asarray(config.arch.from_gguf(tensor.hf_name, np.arange(rows)[:, None], config))[:, 0]
    if not np.array_equal(np.sort(order), np.arange(rows)):
        raise RecoverLoraError(f"{tensor.name} is stored transformed, not only row-permuted; reconstruction cannot tune it")
    return None if np.array_equal(order, np.arange(rows)) else torch.from_numpy(order.astype(np.int64))


def tuned_weight(teacher, tensor: TensorToTune, raw, config, device: str):
    """A QuantizedWeight of the GGUF bytes `raw`, its codes rounding from the teacher's weight of `tensor` (GGUF rows)."""
    import numpy as np
    import torch

    from recover_lora.export.ggml_blocks import from_bytes
    from recover_lora.recovery.quantized_weight import QuantizedWeight

    teacher_weight = teacher.get_parameter(tensor.hf_name).detach().float().cpu().numpy()
    target = torch.from_numpy(np.ascontiguousarray(config.arch.to_gguf(tensor.hf_name, teacher_weight, config)))
    return QuantizedWeight(from_bytes(np.asarray(raw), tensor.ggml_type), target).to(device)


def sign_round_step(weights, lr: float, settings: ReconstructSettings) -> None:
    """One signed step of the QuantizedWeights' offsets and scale multipliers as --tune says, then back in range."""
    from recover_lora.recovery.quantized_weight import signed_step

    signed_step([w.offsets for w in weights], lr if settings.tune != "scales" else 0.0)
    signed_step([m for w in weights for m in w.multipliers.values()],
                {"codes": 0.0, "scales": lr, "both": lr * settings.scale_lr_share}[settings.tune])
    for weight in weights:
        weight.clamp_()


def _block_weights(weights: dict, row_orders: dict) -> dict:
    """Layer parameter name -> the weight each QuantizedWeight computes, in Hugging Face row order."""
    values = {}
    for parameter, weight in weights.items():
        value = weight()
        values[parameter] = value if row_orders[parameter] is None else value[row_orders[parameter]]
    return values


def _whole_set_error(layer, kwargs: dict, weights: dict, row_orders: dict, inputs, targets, error_weights, device: str) -> float:
    """The block's output error over every window with the weights as they would be written (no gradient)."""
    import torch

    from recover_lora.recovery.decoder_blocks import FORWARD_BATCH, output_error_sums, run_layer

    with torch.no_grad():
        overrides = _block_weights(weights, row_orders)
        squared, total = 0.0, 0.0
        for start in range(0, inputs.shape[0], FORWARD_BATCH):
            chunk = slice(start, start + FORWARD_BATCH)
            out = run_layer(layer, inputs[chunk].to(device), kwargs, overrides)
            parts = output_error_sums(out, targets[chunk].to(device), error_weights[chunk].to(device))
            squared, total = squared + float(parts[0]), total + float(parts[1])
    return squared / total if total else 0.0


def tune_block(layer, kwargs: dict, weights: dict, row_orders: dict, inputs, targets, error_weights,
               settings: ReconstructSettings, generator) -> None:
    """SignRound on one block: `weights` (layer parameter name -> QuantizedWeight) learn in place.

    Signed steps move every offset and multiplier by the full step size whatever its gradient, so the last step is
    not always the best one (AutoRound keeps its best step too): the whole-set error is measured at SNAPSHOTS evenly
    spaced steps, and `weights` end at the best of those. `error_weights`: the loss's weights (decoder_blocks.output_error).
    """
    import torch

    from recover_lora.recovery.decoder_blocks import output_error, run_layer

    n, batch, order = inputs.shape[0], min(settings.batch_size, inputs.shape[0]), []
    every = max(1, settings.iters // SNAPSHOTS)
    best_error, best_state, device = float("inf"), None, settings.device
    for step in range(settings.iters):
        if len(order) < batch:  # a new pass over the windows, in a seeded random order
            order = torch.randperm(n, generator=generator).tolist()
        chosen, order = order[:batch], order[batch:]
        out = run_layer(layer, inputs[chosen].to(device), kwargs, _block_weights(weights, row_orders))
        output_error(out, targets[chosen].to(device), error_weights[chosen].to(device)).backward()
        sign_round_step(list(weights.values()), settings.learning_rate * (1 - step / settings.iters), settings)  # AutoRound's linear decay
        if (step + 1) % every == 0 or step + 1 == settings.iters:
            error = _whole_set_error(layer, kwargs, weights, row_orders, inputs, targets, error_weights, device)
            if error < best_error:
                best_error = error
                best_state = {parameter: {name: value.detach().clone() for name, value in weight.named_parameters()}
                              for parameter, weight in weights.items()}
    with torch.no_grad():
        for parameter, weight in weights.items():
            for name, value in best_state[parameter].items():
                weight.get_parameter(name).copy_(value)


def _set_weights(layer, values: dict) -> None:
    import torch

    with torch.no_grad():
        for parameter, value in values.items():
            layer.get_parameter(parameter).copy_(value)


def written_weight(raw, tensor: TensorToTune, config):
    """Hugging Face-ordered float32 weight of these bytes: gguf.quants.dequantize's values."""
    import torch

    from recover_lora.export.ggml_blocks import from_bytes

    values = from_bytes(raw, tensor.ggml_type).dequantize().reshape(tensor.shape)
    return torch.from_numpy(config.arch.from_gguf(tensor.hf_name, values, config).copy())


def reconstruct_block(index: int, layer, kwargs: dict, tensors: list[TensorToTune], teacher, base_tensors: dict, config,
                      inputs, targets, error_weights, settings: ReconstructSettings) -> tuple[BlockRecord, dict, torch.Tensor]:
    """Tune block `index` of the student, leaving the layer with the weights to write.

    Returns (its record, GGUF name -> new bytes (none when reverted), the layer's outputs: the next block's inputs).
    """
    import torch

    from recover_lora.recovery.decoder_blocks import layer_outputs, output_error

    start = time.perf_counter()
    device = settings.device
    original = {t.parameter: layer.get_parameter(t.parameter).detach().clone() for t in tensors}
    outputs = layer_outputs(layer, inputs, kwargs, device)
    before = float(output_error(outputs, targets, error_weights))
    weights, row_orders = {}, {}
    for t in tensors:
        weights[t.parameter] = tuned_weight(teacher, t, base_tensors[t.name].data, config, device)
        row_orders[t.parameter] = hf_row_order(t, config)
    generator = torch.Generator().manual_seed((settings.seed << 16) + index)
    tune_block(layer, kwargs, weights, row_orders, inputs, targets, error_weights, settings, generator)
    new_bytes = {t.name: weights[t.parameter].to_blocks().to_bytes() for t in tensors}
    _set_weights(layer, {t.parameter: written_weight(new_bytes[t.name], t, config) for t in tensors})
    tuned_outputs = layer_outputs(layer, inputs, kwargs, device)
    tuned = float(output_error(tuned_outputs, targets, error_weights))
    kept = tuned < before
    if kept:
        outputs = tuned_outputs
    else:
        _set_weights(layer, original)
        new_bytes = {}
    record = BlockRecord(index, {t.name: t.ggml_type.name for t in tensors}, before, tuned if kept else before, tuned, kept,
                         round(time.perf_counter() - start, 2))
    return record, new_bytes, outputs


def drop_blocks(model) -> None:
    """Free a model's decoder blocks (reconstruct's own copy, past the last use of them)."""
    import gc

    import torch

    from recover_lora.recovery.student import causal_lm

    causal_lm(model).get_decoder().layers = torch.nn.ModuleList()
    gc.collect()


def reconstruct_head(teacher, student, info, base_tensors: dict, ids, counted, last_outputs, teacher_last_outputs,
                     teacher_kwargs: list, student_kwargs: list, settings: ReconstructSettings,
                     untouched: dict) -> tuple[HeadRecord | None, dict]:
    """The output head's stage (recovery/output_head.py), after every block: (its record, {name: new bytes}).

    `last_outputs`: the student's last block outputs (the blocks as written); `teacher_last_outputs`: the teacher's own,
    when the chain target computed them (else the teacher runs once more, streamed). No record when the head's type has
    no block format (it joins `untouched`) or a single window leaves none to judge on."""
    from recover_lora.export.model import hf_name
    from recover_lora.recovery.output_head import (final_hidden, head_kl, head_tensor_name, held_out_count, streamed_final_hidden,
                                                   tune_output_head)

    name = head_tensor_name(info)
    ggml_type, held = info.tensor_types[name], held_out_count(ids.shape[0])
    if not tuned_type(ggml_type, settings.keep_types):
        untouched[name] = ggml_type.name
        return None, {}
    if held == 0:
        return None, {}
    head = TensorToTune(name, ggml_type, hf_name(name, info.config), hf_name(name, info.config), info.tensor_shapes[name])
    device, tied = settings.device, name == "token_embd.weight"
    student_hidden = final_hidden(student, last_outputs, counted, device)
    teacher_hidden = (streamed_final_hidden(teacher, ids, counted, teacher_kwargs, device) if teacher_last_outputs is None
                      else final_hidden(teacher, teacher_last_outputs, counted, device))
    # From here the teacher is its head; so is the student unless the head is tied (its check runs every block): their
    # blocks go, so the head's tuning state fits where both models did (a 1.5B model on 24 GiB).
    for model in (teacher,) if tied else (teacher, student):
        drop_blocks(model)
    split = int(counted[:-held].to(bool).sum())
    check = None
    if tied:  # every block reads the new rows too, so the whole student judges

        def check(raw) -> float:
            value = written_weight(raw, head, info.config)
            _set_weights(student, {head.hf_name: value})
            hidden = streamed_final_hidden(student, ids[-held:], counted[-held:], student_kwargs, device)
            return head_kl(teacher, student, teacher_hidden[split:], hidden, value, device)

    return tune_output_head(teacher, student, head, base_tensors[name].data, info.config, teacher_hidden, student_hidden,
                            split, held, settings, check)


def reconstruct(
    base_gguf: str | Path,
    out_path: str | Path,
    teacher: str | Path | None = None,
    samples: str | Path | None = None,
    text: str | Path | None = None,
    max_samples: int | None = DEFAULT_SAMPLES,
    seq_len: int | None = None,
    settings: ReconstructSettings = ReconstructSettings(),
    report_path: str | Path | None = None,
    force: bool = False,
    on_block: Callable[[BlockRecord], None] | None = None,
) -> ReconstructResult:
    """A copy of an unpadded quantized GGUF whose block linears' codes and scales are tuned block by block.

    Args:
        base_gguf: the quantized GGUF (the model's own widths: `export --pad none`, or a llama.cpp preset).
        out_path: the GGUF to write (temporary file, checked, renamed); same types and bytes per tensor.
        teacher: the full-precision model it was exported from (HF folder or GGUF; None = the default model).
        samples / text: the calibration windows, a `recover-lora synth` folder or a .txt / .jsonl file.
        max_samples, seq_len: use the first N windows, cut to this many tokens (text: windows of 512 by default).
        settings: iters, lr, batch size, seed, device.
        report_path: the JSON report (default: beside the output, `<out>.reconstruct.json`).
        force: overwrite the output, and discard a checkpoint of other settings.
        on_block: called with each block's record as it finishes (progress).
    """
    from recover_lora.export.gguf_header import read_gguf_header
    from recover_lora.export.llama_load import llama_cpp_load_check
    from recover_lora.export.quantize import check_types
    from recover_lora.recovery.decoder_blocks import (block_output_fisher, decoder_layers, kwargs_to, layer_inputs, layer_kwargs,
                                                      layer_outputs)
    from recover_lora.recovery.merge import replace_tensor_bytes
    from recover_lora.recovery.reconstruct_checkpoint import check_work_folder, load_blocks, save_block, work_folder
    from recover_lora.recovery.student import build_student

    base_gguf, info = read_base(base_gguf, "reconstruction")
    out_path = check_output(out_path, force)
    report_path = check_output(report_path or out_path.with_suffix(".reconstruct.json"), force)
    per_block, untouched = plan_tensors(info, info.config.num_layers, settings.keep_types)
    if not any(per_block):
        kept = f" outside --keep-type {' '.join(settings.keep_types)}" if settings.keep_types else ""
        raise RecoverLoraError(f"{base_gguf.name} has no block linear of a type with a block format{kept} "
                               f"(found {', '.join(sorted(set(untouched.values()))) or 'none'}); nothing to reconstruct")
    ids, counted = counted_windows(teacher, samples, text, max_samples, seq_len)
    work = work_folder(out_path)
    run_settings = run_identity(base_gguf, teacher, ids, counted, settings)
    check_work_folder(work, run_settings, force)
    finished = load_blocks(work, info.config.num_layers)

    teacher_model = load_matching_teacher(teacher, info, base_gguf.name, ids, [t for tensors in per_block for t in tensors])
    student, _ = build_student(base_gguf)
    # Both models stay on the host; one block of each at a time goes to the device (a GPU holds two blocks, not two models).
    device = settings.device
    base_tensors = {t.name: t for t in read_gguf_header(base_gguf).tensors}
    teacher_kwargs = [kwargs_to(kwargs, device) for kwargs in layer_kwargs(teacher_model, ids.shape[1])]
    student_kwargs = [kwargs_to(kwargs, device) for kwargs in layer_kwargs(student, ids.shape[1])]
    student_inputs = layer_inputs(student, ids)
    teacher_inputs = layer_inputs(teacher_model, ids) if settings.target == "chain" else None

    result = ReconstructResult(path=out_path, report_path=report_path, untouched=untouched, resumed_blocks=len(finished))
    replacements = {}
    # BRECQ's weights need the teacher's gradients at every block output: one backward pass per window, before any block.
    fisher = block_output_fisher(teacher_model, ids, counted, seed=settings.seed) if settings.weighting == "fisher" else None
    for index, (teacher_layer, layer) in enumerate(zip(decoder_layers(teacher_model), decoder_layers(student))):
        # chain: the teacher's block on the teacher's input, which is the previous target; local: on the student's input.
        teacher_layer.to(device)
        layer.to(device)
        targets = layer_outputs(teacher_layer, student_inputs if teacher_inputs is None else teacher_inputs, teacher_kwargs[index], device)
        error_weights = counted if fisher is None else fisher[index] * counted[..., None]
        tensors, kwargs = per_block[index], student_kwargs[index]
        if index < len(finished) or not tensors:  # done before (rebuild its outputs), or nothing of a block format
            saved, new_bytes = finished[index] if index < len(finished) else (None, {})
            record = None if saved is None else BlockRecord(**saved)
            _set_weights(layer, {t.parameter: written_weight(new_bytes[t.name], t, info.config) for t in tensors if t.name in new_bytes})
            outputs = layer_outputs(layer, student_inputs, kwargs, device)
        else:
            record, new_bytes, outputs = reconstruct_block(index, layer, kwargs, tensors, teacher_model, base_tensors, info.config,
                                                           student_inputs, targets, error_weights, settings)
        if index >= len(finished):
            save_block(work, run_settings, index, None if record is None else asdict(record), new_bytes)
        if record is not None:
            result.blocks.append(record)
            if on_block is not None:
                on_block(record)
        replacements.update(new_bytes)
        teacher_layer.to("cpu")
        layer.to("cpu")
        student_inputs = outputs
        teacher_inputs = None if teacher_inputs is None else targets
    if settings.head:
        result.head, head_bytes = reconstruct_head(teacher_model, student, info, base_tensors, ids, counted, student_inputs,
                                                   teacher_inputs, teacher_kwargs, student_kwargs, settings, result.untouched)
        replacements.update(head_bytes)
    del teacher_model, student, teacher_inputs, student_inputs

    with atomic_output(out_path, force=force) as tmp:
        replace_tensor_bytes(base_gguf, tmp, replacements)
        check_types(tmp, info.tensor_types)
        llama_cpp_load_check(tmp, name=str(out_path))
    with atomic_output(report_path, force=True) as tmp:
        tmp.write_text(json.dumps(report(result, base_gguf, settings), indent=1) + "\n")
    shutil.rmtree(work)
    return result


def report(result: ReconstructResult, base_gguf: Path, settings: ReconstructSettings) -> dict:
    """The JSON report: per block errors, kept or reverted, seconds; per type how many tensors were rewritten."""
    types, kept = Counter(), Counter()
    for record in result.blocks:
        for ggml_type in record.tensors.values():
            types[ggml_type] += 1
            kept[ggml_type] += record.kept
    before = sum(r.error_before for r in result.blocks)
    return {
        "base": str(base_gguf),
        "output": str(result.path),
        "settings": {**asdict(settings), "learning_rate": settings.learning_rate},
        "blocks": [asdict(r) for r in result.blocks],
        "blocks_kept": sum(r.kept for r in result.blocks),
        "blocks_reverted": [r.block for r in result.blocks if not r.kept],
        "error_ratio": sum(r.error_after for r in result.blocks) / before if before else 1.0,
        "tensor_types": {name: {"tuned": types[name], "rewritten": kept[name]} for name in sorted(types)},
        "untouched": result.untouched,
        "head": None if result.head is None else asdict(result.head),
        "resumed_blocks": result.resumed_blocks,
        "seconds": round(sum(r.seconds for r in result.blocks) + (result.head.seconds if result.head else 0.0), 1),
    }
