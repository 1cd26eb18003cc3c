"""`recover-lora kl-tune`: a GGUF's codes and scales tuned end to end on the teacher's logits, bit-exact in its own types.

Block-wise reconstruction (reconstruct.py) makes each block's output match the teacher's; what a user meets is the
output distribution, and on the default model most of the quantized file's KL to the teacher is in the tied token
embedding / output head, which no block owns. Here every tensor of a type with a block format (ggml_blocks: the
K-quants, the block-32 types, IQ4_NL, IQ4_XS, IQ3_S, IQ3_XXS), the embedding and output head included, keeps its ggml type and learns its
rounding offsets (and, with --tune both, its scale multipliers) as recovery/quantized_weight.py lays them out, and the
loss is the KL from the teacher's next-token distribution to the student's at every counted position, through the
whole model: mlx-lm's DWQ (distilled weight quantization) objective on SignRound's parameters. The types, byte sizes
and decode speed stay the input's; stock llama.cpp reads the result.

- Windows: the calibration windows (a synth folder or text), the last `held_out` of them never trained on: the
  KL there picks the best of the snapshots (evaluated `evals_per_epoch` times per epoch), and unless the best is below
  the input file's own held-out KL, the output keeps the input's bytes (recorded as reverted).
- Steps: signed gradient steps (SignRound's), the step size decayed linearly to 0 over the run. End to end the step
  must be small: every offset moves by it at once, and a step of s flips about 2s of all codes (those within s of a
  rounding boundary). SignRound's 1 / steps (0.11 for 9 steps) raised stories260K's held-out KL 16-fold in one step;
  0.01 lowered it 44 % in 12 (the default model: README "kl-tune").
- Groups: with `groups` > 1 the tensors are split into that many runs of consecutive tensors (GGUF order) of about
  equal weight counts, tuned one group after another, each over the whole schedule, the others held at their bytes
  (the input's, or a finished group's best). Only one group's tuning state is held at a time: what lets a 4B model
  tune on one GPU. A group whose best snapshot does not beat the model before it keeps its input bytes.
- Checkpointed at every snapshot (the current and the best parameters, the position in the run, the bytes of the
  finished groups) in `<out>.kltune/`: a killed run resumes there with the same settings, and gives the same bytes.

Example:
    kl_tune("out/reconstructed.gguf", "out/kl-tuned.gguf", samples="out/synth", max_samples=128)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output, check_output

DEFAULT_EPOCHS = 2
DEFAULT_LR = 0.01  # code units per step at the start
DEFAULT_HELD_OUT = 16  # windows never trained on: the snapshots are judged there
DEFAULT_BATCH_SIZE = 8
DEFAULT_SAMPLES = 128
TUNE_CHOICES = ("codes", "both")
STATE_FILE = "state.safetensors"
# torch is imported inside the functions: the CLI reads the defaults above without loading it.


@dataclass(frozen=True)
class KLTuneSettings:
    """What the result depends on besides the files: recorded in the checkpoint, so a resume uses the same."""

    epochs: int = DEFAULT_EPOCHS
    lr: float = DEFAULT_LR  # decayed linearly to 0
    tune: str = "codes"  # "codes": each weight's rounding offset; "both": and the scale multipliers
    scale_lr_share: float = 0.1  # with "both": the multipliers' step as a share of lr (one moves a whole block)
    batch_size: int = DEFAULT_BATCH_SIZE
    held_out: int = DEFAULT_HELD_OUT
    evals_per_epoch: int = 2
    groups: int = 1  # tensor groups tuned one after another (the tuning state of one group in memory at a time)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "held_out", "evals_per_epoch", "groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise RecoverLoraError(f"--{name.replace('_', '-')}={value!r} must be a positive integer")
        if not 0 < self.lr <= 0.5:
            raise RecoverLoraError(f"--lr={self.lr} must be within (0, 0.5] (code units per step)")
        if self.tune not in TUNE_CHOICES:
            raise RecoverLoraError(f"--tune={self.tune!r}: choose one of {', '.join(TUNE_CHOICES)}")
        if not 0 <= self.scale_lr_share <= 1:
            raise RecoverLoraError(f"--scale-lr-share={self.scale_lr_share} must be within [0, 1]")


@dataclass
class Snapshot:
    step: int  # counted over the whole run, every group's steps
    held_out_kl: float
    train_kl: float  # mean KL of the training batches since the previous snapshot
    group: int = 0


@dataclass
class GroupRecord:
    tensors: list[str]  # GGUF names, in order
    weights: int
    held_out_kl_before: float  # the model's before this group tuned (earlier groups' results in it)
    held_out_kl_after: float  # its best snapshot's, or before's when kept is False
    kept: bool


@dataclass
class KLTuneResult:
    path: Path
    report_path: Path
    tensors: dict[str, str]  # GGUF name -> type of every tuned tensor
    untouched: dict[str, str]  # quantized tensors of types with no block format
    held_out_kl_before: float  # the input file's KL on the held-out windows
    held_out_kl_after: float  # the output's (the input's when reverted)
    kept: bool  # False: no snapshot beat the input on the held-out windows; the output is the input's bytes
    steps: int
    snapshots: list[Snapshot] = field(default_factory=list)
    groups: list[GroupRecord] = field(default_factory=list)
    resumed_at: int = 0  # the step a checkpoint resumed from
    seconds: float = 0.0


def tunable_tensors(info) -> tuple[list, dict[str, str]]:
    """Every 2-D tensor of a type with a block format (reconstruct.TensorToTune, `parameter` its full name), and the
    other 2-D tensors not stored F32 (name -> type: F16, the IQ grid types but IQ3_S and IQ3_XXS), which stay as they are."""
    from gguf import GGMLQuantizationType as T

    from recover_lora.export.ggml_blocks import BLOCK_TYPES
    from recover_lora.export.model import hf_name
    from recover_lora.recovery.reconstruct import TensorToTune

    tensors, untouched = [], {}
    for name, ggml_type in info.tensor_types.items():
        shape = info.tensor_shapes.get(name)
        if shape is None or len(shape) != 2 or ggml_type == T.F32:
            continue
        if ggml_type not in BLOCK_TYPES:
            untouched[name] = ggml_type.name
            continue
        full = hf_name(name, info.config)
        tensors.append(TensorToTune(name, ggml_type, full, full, tuple(shape)))
    return tensors, untouched


def tensor_groups(tensors: list, groups: int) -> list[list]:
    """`groups` runs of consecutive tensors of about equal weight counts (fewer where one tensor outweighs a share)."""
    sizes = [math.prod(t.shape) for t in tensors]
    total, chunks, done = sum(sizes), [[] for _ in range(groups)], 0
    for tensor, size in zip(tensors, sizes):
        chunks[min(groups - 1, done * groups // total)].append(tensor)  # the share its first weight falls in
        done += size
    return [chunk for chunk in chunks if chunk]


def kl_to_teacher(teacher_log_probs, student_logits, counted):
    """Mean over counted positions of KL(teacher || student), from the teacher's log-probabilities [B, L, V]."""
    import torch.nn.functional as F

    from recover_lora.recovery.losses import kl_from_log_probs

    per_position = kl_from_log_probs(teacher_log_probs, F.log_softmax(student_logits.float(), dim=-1))
    return (per_position * counted).sum() / counted.sum().clamp(min=1)


class _Tuner:
    """The student with every tunable tensor replaced by a QuantizedWeight: `loss(ids, counted)` is differentiable."""

    def __init__(self, teacher, student, tensors, base_tensors, config, device: str):
        from recover_lora.recovery.reconstruct import hf_row_order, tuned_weight

        self.teacher, self.student, self.device = teacher.to(device), student.to(device), device
        for parameter in self.student.parameters():
            parameter.requires_grad_(False)
        self.weights, self.row_orders = {}, {}
        for t in tensors:
            self.weights[t.name] = tuned_weight(teacher, t, base_tensors[t.name].data, config, device)
            self.row_orders[t.name] = hf_row_order(t, config)
        self.parameters = {t.name: t.parameter for t in tensors}

    def tuned_bytes(self) -> dict:
        """Every tensor's blocks as they would be written: uint8 [n_blocks, block bytes]."""
        return {name: weight.to_blocks().to_bytes() for name, weight in self.weights.items()}

    def overrides(self) -> dict:
        values = {}
        for name, weight in self.weights.items():
            value = weight()
            order = self.row_orders[name]
            values[self.parameters[name]] = value if order is None else value[order.to(value.device)]
        return values

    def teacher_log_probs(self, ids):
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            return F.log_softmax(self.teacher(input_ids=ids.to(self.device), use_cache=False).logits.float(), dim=-1)

    def loss(self, ids, counted, overrides=None):
        from torch.func import functional_call

        ids, counted = ids.to(self.device), counted.to(self.device)
        teacher = self.teacher_log_probs(ids)
        logits = functional_call(self.student, overrides if overrides is not None else self.overrides(), args=(),
                                 kwargs={"input_ids": ids, "use_cache": False}).logits
        return kl_to_teacher(teacher, logits, counted)

    def held_out_kl(self, ids, counted, batch_size: int) -> float:
        """KL over every counted position of these windows (weighted by their counts), the weights as they would be written."""
        import torch

        with torch.no_grad():
            overrides = self.overrides()
            total, positions = 0.0, 0
            for start in range(0, ids.shape[0], batch_size):
                chunk = slice(start, start + batch_size)
                n = int(counted[chunk].sum())
                total += float(self.loss(ids[chunk], counted[chunk], overrides)) * n
                positions += n
        return total / max(positions, 1)

    def state(self) -> dict:
        return {f"{name}/{key}": value.detach().cpu().clone() for name, weight in self.weights.items()
                for key, value in weight.named_parameters()}

    def load_state(self, state: dict) -> None:
        import torch

        with torch.no_grad():
            for name, weight in self.weights.items():
                for key, value in weight.named_parameters():
                    value.copy_(state[f"{name}/{key}"].to(value.device))


def hold_bytes(student, tensors: list, written: dict, config) -> None:
    """Set the student's weights of these tensors to what their bytes dequantize to (a finished group's, kept fixed)."""
    import numpy as np
    import torch

    from recover_lora.export.ggml_blocks import from_bytes
    from recover_lora.recovery.reconstruct import hf_row_order

    with torch.no_grad():
        for t in tensors:
            if t.name not in written:
                continue
            value = torch.from_numpy(from_bytes(np.asarray(written[t.name]), t.ggml_type).dequantize().reshape(t.shape))
            order = hf_row_order(t, config)
            parameter = student.get_parameter(t.parameter)
            parameter.copy_((value if order is None else value[order]).to(parameter.device))


def _save_state(work: Path, settings: dict, current: dict, best: dict | None, progress: dict, written: dict) -> None:
    import torch
    from safetensors.torch import save_file

    from recover_lora.recovery.reconstruct_checkpoint import write_settings

    write_settings(work, settings)
    tensors = {f"current/{k}": v.contiguous() for k, v in current.items()}
    tensors.update({f"best/{k}": v.contiguous() for k, v in (best or {}).items()})
    tensors.update({f"written/{k}": torch.from_numpy(v).contiguous() for k, v in written.items()})
    with atomic_output(work / STATE_FILE, force=True) as tmp:
        save_file(tensors, str(tmp), metadata={"progress": json.dumps(progress)})


def _load_state(work: Path) -> tuple[dict, dict | None, dict, dict] | None:
    from safetensors import safe_open

    path = work / STATE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            progress = json.loads(handle.metadata()["progress"])
            current = {k[len("current/"):]: handle.get_tensor(k) for k in handle.keys() if k.startswith("current/")}
            best = {k[len("best/"):]: handle.get_tensor(k) for k in handle.keys() if k.startswith("best/")}
            written = {k[len("written/"):]: handle.get_tensor(k).numpy() for k in handle.keys() if k.startswith("written/")}
    except Exception as e:  # whatever safetensors raises for a damaged file
        raise RecoverLoraError(f"{path} cannot be read ({e}); delete it, or pass --force to start over") from None
    return current, best or None, progress, written


def kl_tune(
    base_gguf: str | Path,
    out_path: str | Path,
    teacher: str | Path | None = None,
    samples: str | Path | None = None,
    text: str | Path | None = None,
    max_samples: int | None = DEFAULT_SAMPLES,
    seq_len: int | None = None,
    settings: KLTuneSettings = KLTuneSettings(),
    report_path: str | Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> KLTuneResult:
    """A copy of an unpadded quantized GGUF whose codes (and scales) are tuned on the teacher's logits, end to end.

    Args:
        base_gguf: the quantized GGUF (the model's own widths), e.g. a searched or reconstructed file.
        out_path: the GGUF to write (temporary file, checked, renamed); the same types and bytes per tensor.
        teacher: the full-precision model it was exported from (HF folder or GGUF; None = the default model).
        samples / text: the calibration windows, a `recover-lora synth` folder or a .txt / .jsonl file.
        max_samples, seq_len: use the first N windows (the last `settings.held_out` of them held out), cut to this length.
        settings: epochs, lr, what learns, batch size, held-out windows, evaluations, seed, device.
        report_path: the JSON report (default: beside the output, `<out>.kltune.json`).
        force: overwrite the output, and discard a checkpoint of other settings.
        progress: called with a line per snapshot.
    """
    import torch

    from recover_lora.export.gguf_header import read_gguf_header
    from recover_lora.export.llama_load import llama_cpp_load_check
    from recover_lora.export.quantize import check_types
    from recover_lora.recovery.merge import replace_tensor_bytes
    from recover_lora.recovery.quantized_weight import signed_step
    from recover_lora.recovery.reconstruct import counted_windows, load_matching_teacher, read_base, run_identity
    from recover_lora.recovery.reconstruct_checkpoint import check_work_folder
    from recover_lora.recovery.student import build_student

    start = time.perf_counter()
    say = progress or (lambda message: None)
    base_gguf, info = read_base(base_gguf, "kl-tune")
    out_path = check_output(out_path, force)
    report_path = check_output(report_path or out_path.with_suffix(".kltune.json"), force)
    tensors, untouched = tunable_tensors(info)
    if not tensors:
        raise RecoverLoraError(f"{base_gguf.name} has no quantized tensor of a type with a block format "
                               f"(found {', '.join(sorted(set(untouched.values()))) or 'none'}); nothing to tune")
    ids, counted = counted_windows(teacher, samples, text, max_samples, seq_len)
    if ids.shape[0] <= settings.held_out:
        raise RecoverLoraError(f"{ids.shape[0]} calibration windows with counted positions leave none to train on beside "
                               f"--held-out {settings.held_out}; give more windows (--max-samples) or a smaller --held-out")
    train_ids, train_counted = ids[: -settings.held_out], counted[: -settings.held_out]
    held_ids, held_counted = ids[-settings.held_out :], counted[-settings.held_out :]
    batch = min(settings.batch_size, train_ids.shape[0])
    steps_per_epoch = math.ceil(train_ids.shape[0] / batch)
    steps = settings.epochs * steps_per_epoch
    eval_every = max(1, steps_per_epoch // settings.evals_per_epoch)

    groups = tensor_groups(tensors, settings.groups)
    total_steps = steps * len(groups)

    work = out_path.with_name(out_path.name + ".kltune")
    run_settings = run_identity(base_gguf, teacher, ids, counted, settings)
    check_work_folder(work, run_settings, force)
    resumed = _load_state(work)

    teacher_model = load_matching_teacher(teacher, info, base_gguf.name, ids, tensors)
    student, _ = build_student(base_gguf)
    base_tensors = {t.name: t for t in read_gguf_header(base_gguf).tensors}
    generator = torch.Generator().manual_seed(settings.seed)
    # The windows' order of every epoch, drawn up front (every group takes the same): a resumed run continues it.
    orders = [torch.randperm(train_ids.shape[0], generator=generator).tolist() for _ in range(settings.epochs)]
    # written: the bytes of the finished groups' kept tensors; records: what each finished group did.
    if resumed is not None:
        current, best, state, written = resumed
        current = current or None  # saved between two groups: nothing of the next one has moved yet
        first_group, step, before, best_kl = state["group"], state["step"], state["held_out_kl_before"], state["best_kl"]
        snapshots = [Snapshot(**s) for s in state["snapshots"]]
        records = [GroupRecord(**r) for r in state["groups"]]
        hold_bytes(student, tensors, written, info.config)
        say(f"resumed at step {step}/{steps} of group {first_group + 1}/{len(groups)} from {work}")
    else:
        current, best, first_group, step, before, best_kl, snapshots, records, written = None, None, 0, 0, None, None, [], [], {}
    resumed_at = first_group * steps + step

    def checkpoint(group: int, group_step: int, group_before: float, current: dict, best: dict | None) -> None:
        _save_state(work, run_settings, current, best,
                    {"group": group, "step": group_step, "held_out_kl_before": before, "group_before": group_before,
                     "best_kl": best_kl, "snapshots": [asdict(s) for s in snapshots], "groups": [asdict(r) for r in records]},
                    written)

    for index in range(first_group, len(groups)):
        group = groups[index]
        tuner = _Tuner(teacher_model, student, group, base_tensors, info.config, settings.device)
        if before is None:  # the input file's own KL, before any step
            before = best_kl = tuner.held_out_kl(held_ids, held_counted, batch)
            say(f"held-out KL of {base_gguf.name}: {before:.4f} ({int(held_counted.sum())} positions in {settings.held_out} windows)")
        group_before = state["group_before"] if current is not None else best_kl
        if current is not None:
            tuner.load_state(current)
        elif len(groups) > 1:
            say(f"group {index + 1}/{len(groups)}: {len(group)} tensors, {group[0].name} .. {group[-1].name}")
        offsets = [w.offsets for w in tuner.weights.values()]
        multipliers = [m for w in tuner.weights.values() for m in w.multipliers.values()]
        for multiplier in multipliers:  # --tune codes: no gradient through the scales at all (a cheaper backward)
            multiplier.requires_grad_(settings.tune == "both")
        train_losses = []
        while step < steps:
            epoch, position = divmod(step, steps_per_epoch)
            chosen = orders[epoch][position * batch : (position + 1) * batch]
            loss = tuner.loss(train_ids[chosen], train_counted[chosen])
            loss.backward()
            train_losses.append(loss.item())
            step_lr = settings.lr * (1 - step / steps)
            signed_step(offsets, step_lr)
            signed_step(multipliers, step_lr * settings.scale_lr_share)  # (no gradient, no step, with --tune codes)
            for weight in tuner.weights.values():
                weight.clamp_()
            step += 1
            if step % eval_every == 0 or step == steps:
                held = tuner.held_out_kl(held_ids, held_counted, batch)
                train_kl = sum(train_losses) / len(train_losses) if train_losses else float("nan")
                snapshots.append(Snapshot(index * steps + step, held, train_kl, index))
                train_losses = []
                if held < best_kl:
                    best_kl, best = held, tuner.state()
                say(f"step {index * steps + step}/{total_steps}: training KL {train_kl:.4f}, held-out KL {held:.4f} "
                    f"(input {before:.4f}, best {best_kl:.4f}), {time.perf_counter() - start:.0f} s")
                checkpoint(index, step, group_before, tuner.state(), best)
        if best is not None:  # the group's best snapshot is written, and held fixed while the next groups tune
            tuner.load_state(best)
            group_bytes = tuner.tuned_bytes()
            written.update(group_bytes)
            hold_bytes(student, group, group_bytes, info.config)
        records.append(GroupRecord([t.name for t in group], sum(math.prod(t.shape) for t in group), group_before,
                                   best_kl, best is not None))
        del tuner
        current, best, step = None, None, 0
        if index + 1 < len(groups):  # between two groups: the next one starts from the model this one left
            checkpoint(index + 1, 0, best_kl, {}, None)

    kept, replacements = bool(written), written
    del teacher_model, student
    with atomic_output(out_path, force=force) as tmp:
        replace_tensor_bytes(base_gguf, tmp, replacements)
        check_types(tmp, info.tensor_types)
        llama_cpp_load_check(tmp, name=str(out_path))
    result = KLTuneResult(path=out_path, report_path=report_path, tensors={t.name: t.ggml_type.name for t in tensors},
                          untouched=untouched, held_out_kl_before=before, held_out_kl_after=best_kl, kept=kept, steps=total_steps,
                          snapshots=snapshots, groups=records, resumed_at=resumed_at, seconds=round(time.perf_counter() - start, 1))
    with atomic_output(report_path, force=True) as tmp:
        tmp.write_text(json.dumps(report(result, base_gguf, settings), indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return result


def report(result: KLTuneResult, base_gguf: Path, settings: KLTuneSettings) -> dict:
    """The JSON report: the result (held-out KL before and after, every snapshot, the tensors tuned) and the settings."""
    data = asdict(result)
    data.update(path=str(result.path), report_path=str(result.report_path), base=str(base_gguf), settings=asdict(settings))
    return data
