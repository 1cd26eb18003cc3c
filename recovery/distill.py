"""Recover-LoRA training: LoRA on the quantized student, distilled towards the full-precision teacher.

wrap -> train -> export: peft puts LoRA on the target linears of the student (B = 0, so step 0 is
exactly the quantized model), AdamW with warmup + cosine trains it on the KL between teacher and
student next-token distributions (and optionally cross-entropy on labeled data), and the result
is saved as a peft folder and a llama.cpp LoRA GGUF. Checkpoints make a killed run resume
bit-identically; a NaN/inf loss stops the run and keeps the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from recover_lora.errors import RecoverLoraError
from recover_lora.recovery import checkpoint as ckpt
from recover_lora.recovery import distributed
from recover_lora.recovery.block_scales import BLOCK_SCALES_FILE
from recover_lora.recovery.step_loss import TeacherSignal, step_loss  # noqa: F401  (callers import them from here)
# TrainConfig lives in train_config.py (torch-free, so the CLI can show its defaults); callers may import it from here.
from recover_lora.recovery.train_config import TrainConfig

ADAPTER_DIR = "adapter"
ADAPTER_GGUF = "adapter.gguf"
LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class TrainHooks:
    """Test seams: change the loss of a step (inject NaN), or act after a step (simulate a kill)."""

    loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    after_step: Callable[[int], None] | None = None


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path | None  # None when the run trained block scales only (--targets none)
    adapter_gguf: Path | None
    steps: int
    resumed_from: int
    metrics: dict = field(default_factory=dict)  # last step's loss, kl, ce, lr, tokens_per_s
    target_tensors: list[str] = field(default_factory=list)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecoverLoraError("--device cuda: no CUDA GPU is visible to torch; use --device auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RecoverLoraError("--device mps: Metal is not available; use --device auto")
    return torch.device(name)


def autocast_for(device: torch.device, dtype: torch.dtype | None = None):
    """bf16 autocast when the frozen weights are bf16 (`--dtype`, None = auto), else none.

    It follows the weights' dtype so that --dtype float32 is float32 math throughout, and bf16
    weights meet the float32 LoRA / block-scale parameters in bf16 matmuls (MPS autocast is partial).
    """
    from recover_lora.recovery.student import resolve_dtype

    dtype = dtype or resolve_dtype("auto", device)
    if dtype == torch.bfloat16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def batch_rows(step: int, n_samples: int, batch_size: int, seed: int) -> torch.Tensor:
    """The sample rows of a step: epoch e is a permutation seeded by (seed, e), cut in order."""
    steps_per_epoch = n_samples // batch_size
    epoch, position = divmod(step, steps_per_epoch)
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[position * batch_size : (position + 1) * batch_size]


def load_training_samples(config: TrainConfig):
    """SyntheticSamples from a synth folder or a labeled JSONL, cut to seq_len/max_samples."""
    from recover_lora.recovery.samples import SyntheticSamples, load_samples

    if config.samples is not None:
        samples = load_samples(config.samples)
        if config.seq_len is not None and config.seq_len < samples.seq_len:
            samples = SyntheticSamples(
                samples.input_ids[:, : config.seq_len], samples.loss_mask[:, : config.seq_len], samples.manifest
            )
    else:
        from recover_lora.recovery.text_data import labeled_samples

        samples = labeled_samples(config.data, config.base, config.seq_len or 256, config.max_samples)
    if config.max_samples is not None:
        samples = samples.subset(torch.arange(min(config.max_samples, len(samples))))
    useful = samples.loss_mask.any(dim=1)
    if not useful.all():  # rows with no target position would give an empty (nan) batch loss
        samples = samples.subset(useful.nonzero().squeeze(1))
    if len(samples) < config.batch_size:
        raise RecoverLoraError(f"{len(samples)} usable samples is fewer than --batch-size={config.batch_size}")
    return samples


def samples_fingerprint(samples) -> str:
    import hashlib

    digest = hashlib.sha256(samples.input_ids.numpy().tobytes())
    digest.update(samples.loss_mask.numpy().tobytes())
    return digest.hexdigest()[:16]


def wrap_with_lora(student, config: TrainConfig, modules: list[str]):
    """peft LoRA on exactly these modules; B starts at 0, so the output equals the base model."""
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft (0.21) still asks transformers 5 for `is_gradient_checkpointing`, which warns on every run.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(student, lora_config)


def _prepare_run_dir(config: TrainConfig, writer: bool = True) -> None:
    run_dir = config.output
    if run_dir.exists() and not run_dir.is_dir():
        raise RecoverLoraError(f"--output {run_dir} is a file; give a folder for the run")
    existing = (run_dir / ckpt.CHECKPOINT_FILE).exists() or (run_dir / SUMMARY_FILE).exists()
    if config.resume:
        ckpt.checkpoint_to_resume(run_dir)  # refused here, before the models load and a top-k cache is built
        return
    if existing and not config.force:
        raise RecoverLoraError(f"{run_dir} already holds a run; pass --resume to continue it or --force to start over")
    if not writer:  # another process (rank 0) clears and makes the folder
        return
    if existing:
        for name in (ckpt.CHECKPOINT_FILE, LOG_FILE, SUMMARY_FILE, ADAPTER_GGUF, "teacher_topk.safetensors", BLOCK_SCALES_FILE):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / ADAPTER_DIR, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def _truncate_log(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def save_adapter(model, run_dir: Path, state_dict: dict | None = None) -> Path:
    """peft's save_pretrained into run_dir/adapter, via a temporary folder and a rename.

    state_dict: the gathered whole tensors of a sharded model (None: the model's own parameters).
    """
    final, tmp = run_dir / ADAPTER_DIR, run_dir / f".{ADAPTER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def train(config: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    """Train a Recover-LoRA adapter and export it; resumable, stops on a non-finite loss.

    Example:
        result = train(TrainConfig(base="smollm2.gateup.gguf", samples="runs/synth", output="runs/demo"))
        result.adapter_gguf  # runs/demo/adapter.gguf, for llama.cpp's --lora
    """
    from tqdm.auto import tqdm

    from recover_lora.recovery.adapter_gguf import write_adapter_gguf
    from recover_lora.export.model import hf_module_name
    from recover_lora.recovery.block_scales import block_scale_parameter_groups, replace_with_block_scales, save_block_scales
    from recover_lora.recovery.student import (
        build_student,
        build_teacher,
        check_teacher_matches,
        enable_gradient_checkpointing,
        resolve_dtype,
        target_module_names,
        target_tensor_names,
    )
    from recover_lora.recovery.teacher_cache import load_or_build_topk

    hooks = hooks or TrainHooks()
    device = pick_device(config.device)
    # Several processes (accelerate launch / torchrun): see distributed.py. One process starts nothing.
    processes = distributed.start(config.batch_size, device)
    writer = processes is None or processes.is_main_process  # only rank 0 writes files
    _prepare_run_dir(config, writer)
    if processes is not None:
        processes.wait_for_everyone()  # the run folder is ready
        device = processes.device if device.type == "cuda" else device  # this process's GPU
    run_dir = config.output
    dtype = resolve_dtype(config.dtype, device)  # of the frozen weights; LoRA and block scales stay float32
    autocast = autocast_for(device, dtype)
    loss_config = config.loss_config()

    samples = load_training_samples(config)
    student, info = build_student(config.base, dtype=dtype)
    modules = [] if config.targets == "none" else target_module_names(info, config.targets)  # fails before the teacher is loaded
    block_tensors = target_tensor_names(info, "low-bit") if config.block_scales else []
    both = sorted(set(modules) & {hf_module_name(n, info.config) for n in block_tensors})
    if both:
        raise RecoverLoraError(f"--block-scales already trains {both[0]}; give --targets the other linears "
                               f"(e.g. attn_q,attn_k,attn_v,attn_output,ffn_down) or none")
    teacher = None
    if loss_config.kl_weight > 0:
        teacher, teacher_config = build_teacher(config.teacher, dtype=dtype)
        check_teacher_matches(teacher_config, info)
        teacher.to(device)
    vocab = info.config.vocab_size
    if int(samples.input_ids.max()) >= vocab:
        raise RecoverLoraError(f"the training tokens reach id {int(samples.input_ids.max())} but the model's vocabulary has {vocab}")
    # The resolved dtype, not "auto": the same flag means bf16 on a GPU and float32 on a CPU.
    trajectory = config.trajectory() | {"samples_fingerprint": samples_fingerprint(samples), "dtype": str(dtype).removeprefix("torch.")}

    factors = {}
    if modules and config.init != "zero" and not config.resume:  # a resumed run takes its LoRA weights from the checkpoint
        from recover_lora.recovery.lora_init import compute_lora_init

        factors = compute_lora_init(config.init, student, modules, config.teacher, config.rank,
                                    samples.input_ids[: config.init_samples], samples.loss_mask[: config.init_samples],
                                    batch_size=config.batch_size, device=device)
    replaced = replace_with_block_scales(student, info, block_tensors) if block_tensors else {}
    torch.manual_seed(config.seed)  # LoRA A's initialisation
    student.config._name_or_path = str(config.base)
    if modules:
        model = wrap_with_lora(student, config, modules)
    else:
        model = student.requires_grad_(False)
    model = model.to(device)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if factors:
        from recover_lora.recovery.lora_init import apply_lora_init

        apply_lora_init(model, factors)
    for q2k in replaced.values():  # peft froze every non-LoRA parameter
        q2k.requires_grad_(True)
    if processes is not None:  # before the optimizer: sharding replaces the parameters
        distributed.shard_student(model)
    block_parameters = {id(p) for q2k in replaced.values() for p in q2k.parameters()}
    lora_parameters = [p for p in model.parameters() if p.requires_grad and id(p) not in block_parameters]
    groups = ([{"params": lora_parameters, "lr": config.lr}] if lora_parameters else [])
    groups += block_scale_parameter_groups(replaced, config.block_scales_lr) if replaced else []
    trainable = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(samples) // config.batch_size
    total_steps = config.max_steps if config.max_steps is not None else max(1, math.ceil(config.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, config.warmup_steps, config.min_lr_ratio)
    )

    signal = None
    if teacher is not None:
        topk = None
        if config.top_k is not None:
            # Several processes: rank 0 computes the cache while the others wait, then they read it.
            with contextlib.nullcontext() if processes is None else processes.main_process_first():
                topk = load_or_build_topk(run_dir, teacher, samples, config, device, autocast, trajectory["samples_fingerprint"])
            teacher = None  # free it: the cache replaces it
        signal = TeacherSignal(teacher, topk)

    start_step, metrics = 0, {}
    log_path = run_dir / LOG_FILE
    if config.resume:
        state = ckpt.load_checkpoint(run_dir, trajectory)
        if processes is None:
            start_step = ckpt.restore(state, model, optimizer, scheduler)
        else:
            start_step = distributed.restore(state, model, optimizer, scheduler, processes)
        metrics = state["metrics"]
        if writer:
            _truncate_log(log_path, start_step)
    else:
        # Dropout's stream, identical whether or not we resume later; one per process, rank 0's the one-process stream.
        torch.manual_seed(config.seed + 1 + (0 if processes is None else processes.process_index))
    if writer:
        (run_dir / "run_config.json").write_text(json.dumps(trajectory | {
            "total_steps": total_steps, "device": str(device), "target_modules": modules,
            "processes": 1 if processes is None else processes.num_processes}, indent=2) + "\n")

    model.train()
    tokens_per_step = config.batch_size * samples.seq_len
    last_checkpoint = start_step if config.resume else None
    bar = tqdm(total=total_steps, initial=start_step, disable=not (config.progress and writer), desc="train", unit="step")
    started, log = time.perf_counter(), open(log_path if writer else os.devnull, "a")
    try:
        for step in range(start_step, total_steps):
            step_started = time.perf_counter()
            index = batch_rows(step, len(samples), config.batch_size, config.seed)
            rows = index if processes is None else distributed.local_rows(index, processes)
            ids, mask = samples.input_ids[rows].to(device), samples.loss_mask[rows].to(device)
            loss, parts = step_loss(model, signal, ids, mask, rows, loss_config, autocast, config.loss_chunk)
            if processes is not None:
                loss, parts = distributed.share_of_global_mean(parts, loss_config, mask, samples.loss_mask[index])
            if hooks.loss_hook is not None:
                loss = hooks.loss_hook(step, loss)
            reported, parts = (loss, parts) if processes is None else distributed.sum_over_processes(loss, parts)
            if not torch.isfinite(reported):  # the global value: every process stops at the same step
                _stop_non_finite("loss", reported.item(), step, run_dir, last_checkpoint)
            # FSDP averages the gradients over processes; the shares sum to the global mean.
            (loss if processes is None else loss * processes.num_processes).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            if processes is not None:
                grad_norm = distributed.local_value(grad_norm)
            if not torch.isfinite(grad_norm):
                _stop_non_finite("gradient norm", float(grad_norm), step, run_dir, last_checkpoint)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - step_started
            metrics = {
                "step": step + 1,
                "loss": reported.item(),
                **{name: value.item() for name, value in parts.items()},
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_step / elapsed,
            }
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "kl", "ce", "tokens_per_s") if k in metrics}, refresh=False)
            bar.update(1)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == total_steps:
                if processes is None:
                    ckpt.save_checkpoint(run_dir, step + 1, model, optimizer, scheduler, trajectory, metrics)
                else:
                    distributed.save_checkpoint(run_dir, step + 1, model, optimizer, scheduler, trajectory, metrics, processes)
                last_checkpoint = step + 1
            if hooks.after_step is not None:
                hooks.after_step(step + 1)
    finally:
        bar.close()
        log.close()

    gathered = None if processes is None else distributed.full_trainable_state(model)[0]  # every process gathers
    adapter_dir = adapter_gguf = None
    if modules:
        adapter_dir, adapter_gguf = run_dir / ADAPTER_DIR, run_dir / ADAPTER_GGUF
        if writer:
            save_adapter(model, run_dir, gathered)
            write_adapter_gguf(adapter_dir, config.base, adapter_gguf, dtype=config.adapter_dtype, force=True)
    if replaced and writer:
        scales = replaced if processes is None else distributed.unsharded_block_scales(model, replaced, gathered)
        save_block_scales(scales, run_dir / BLOCK_SCALES_FILE, config.base)
    summary = {
        "steps": total_steps,
        "resumed_from": start_step,
        "train_seconds_this_session": time.perf_counter() - started,
        "tokens_per_step": tokens_per_step,
        "samples": len(samples),
        "final": metrics,
        "target_modules": modules,
        "block_scale_tensors": block_tensors,
        "adapter_dir": None if adapter_dir is None else str(adapter_dir),
        "adapter_gguf": None if adapter_gguf is None else str(adapter_gguf),
    }
    if writer:
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    if processes is not None:
        processes.wait_for_everyone()  # every process returns once rank 0 has written the outputs
    return TrainResult(
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        adapter_gguf=adapter_gguf,
        steps=total_steps,
        resumed_from=start_step,
        metrics=metrics,
        target_tensors=modules,
    )


def _stop_non_finite(what: str, value: float, step: int, run_dir: Path, last_checkpoint: int | None) -> None:
    kept = (
        f"the last good checkpoint (step {last_checkpoint}) is kept in {run_dir / ckpt.CHECKPOINT_FILE}"
        if last_checkpoint
        else "no checkpoint had been written yet"
    )
    raise RecoverLoraError(
        f"training stopped: {what} is {value} at step {step + 1}; {kept}; lower --lr (or --grad-clip) and "
        f"start over with --force"
    )
