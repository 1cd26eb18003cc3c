"""The memory plan against a machine: what it has, a one-line refusal per step that does not fit, and the
checks `recover-lora pipeline` and `recover-lora train` run before they load anything.

A refusal names the step, what it needs of which resource against what is there, the largest parts,
and the settings that would make it fit, found by planning again with them (each alone, then several
together, then more GPUs).

Example:
    plan = checked_plan(model_sizes(load_model_shape("qwen3-4b")), plan_settings("paper"), Available(gpus=1, gpu_bytes=24 * GiB))
    plan.problems[0]   # "train needs 26.5 GiB of GPU memory for qwen3-4b (student bf16 7.5 + ...) but 24.0 GiB is
                       #  available: add --top-k 64 and --init svd"
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from recover_lora.devices.memory_plan import (
    GiB,
    Available,
    MemoryPlan,
    PlanSettings,
    StepMemory,
    TrainPlan,
    plan_memory,
    plan_settings,
    weight_bytes,
)
from recover_lora.devices.memory_sizes import ModelSizes, model_sizes, n_params
from recover_lora.errors import RecoverLoraError

# What each resource's refusal suggests for a step that has no training settings to change.
_OTHER_REMEDIES = {"disk": "free disk space, or give --out on a larger disk",
                   "host": "use a machine with more RAM (or a CUDA GPU for the torch steps)",
                   "gpu": "use a GPU with more memory"}


def checked_plan(sizes: ModelSizes, settings: PlanSettings, available: Available, suggest: bool = True) -> MemoryPlan:
    """`plan_memory` with `problems` filled in: one refusal line per step that does not fit `available`."""
    plan = plan_memory(sizes, settings, available)
    return replace(plan, problems=tuple(line for step in plan.steps if (line := refusal(plan, step, sizes, suggest))))


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def _parts_text(parts: dict, limit: int = 4) -> str:
    items = [(k, v) for k, v in parts.items() if k != "process"]
    text = " + ".join(f"{k} {_gib(v)}" for k, v in items[:limit])
    return text + (" + ..." if len(items) > limit else "")


def refusal(plan: MemoryPlan, step: StepMemory, sizes: ModelSizes, suggest: bool = True) -> str | None:
    """One line when `step` does not fit `plan.available` (GPU first, then host, then disk), else None."""
    a = plan.available
    checks = [("GPU memory", "gpu", step.gpu_bytes, a.gpu_bytes if a.gpus else None, step.gpu),
              ("host RAM", "host", step.host_bytes, a.host_bytes, step.host),
              ("disk", "disk", step.disk_bytes, a.disk_bytes, {})]
    for what, resource, need, have, parts in checks:
        if have is None or need <= have:
            continue
        detail = f" ({_parts_text(parts)})" if parts else ""
        line = (f"{step.step} needs {_gib(need)} GiB of {what} for {plan.model}{detail} but {_gib(have)} GiB is available "
                f"({_whose(a, resource)})")
        return line + (f": {remedies(plan, step.step, sizes, resource)}" if suggest else "")
    return None


_RESOURCE_FLAGS = {"host": "--host-memory", "gpu": "--gpu-memory", "disk": "--disk"}


def _whose(available: Available, resource: str) -> str:
    """Which machine's number a refusal used: this one's (and the flag that plans another), or the one given."""
    flag = _RESOURCE_FLAGS[resource]
    return f"this machine's; {flag} GB plans another" if resource in available.measured else f"as given by {flag}"


def _fits_alone(plan: MemoryPlan, step: str, sizes: ModelSizes, settings: PlanSettings, gpus: int | None = None) -> bool:
    """Whether `step` alone fits the plan's machine under other settings."""
    available = replace(plan.available, gpus=gpus or plan.available.gpus)
    again = plan_memory(sizes, replace(settings, steps=(step,)), available)
    return refusal(again, again.steps[0], sizes, suggest=False) is None


def remedies(plan: MemoryPlan, step: str, sizes: ModelSizes, resource: str) -> str:
    """The training settings that make `step` fit, as flags: each alone, else the first few together (in the
    order below), and the fewest GPUs that make it fit alone or with them."""
    if step not in ("train", "recover") or resource == "disk":
        from recover_lora.presets import SKIPPABLE_STEPS

        other = _OTHER_REMEDIES[resource]
        if step == "reconstruct" and resource != "disk" and plan.settings.reconstruct_head and _fits_alone(
                plan, step, sizes, replace(plan.settings, reconstruct_head=False)):
            # The output head's phase is what does not fit (a large vocabulary): the blocks alone do.
            other = f"leave the output head's stage out (recover-lora reconstruct --no-head), {other}"
        return other + (f", or leave the step out (pipeline --skip {step})" if step in SKIPPABLE_STEPS else "")
    t: TrainPlan = getattr(plan.settings, step)
    on_gpu = plan.available.gpus > 0
    candidates = []
    if t.with_teacher and not t.top_k:
        candidates.append(("--top-k 64", {"top_k": 64}))
    if not t.loss_chunk:
        candidates.append(("--loss-chunk 1024", {"loss_chunk": 1024}))
    if not t.gradient_checkpointing:
        candidates.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if weight_bytes(t.dtype, on_gpu) == 4:
        candidates.append(("--dtype bfloat16", {"dtype": "bfloat16"}))
    if t.init == "eora":  # eora's statistics run a second teacher, in fp32, beside the first
        candidates.append(("--init svd", {"init": "svd"}))
    if t.batch_size > 1:
        candidates.append((f"--batch-size {t.batch_size // 2}", {"batch_size": t.batch_size // 2}))

    def fits(changes: dict, gpus: int | None = None) -> bool:
        return _fits_alone(plan, step, sizes, replace(plan.settings, **{step: replace(t, **changes)}), gpus)

    prefixes, together, labels = [], {}, []
    for label, change in candidates:  # the settings together, in the order above (halving the batch last)
        together, labels = {**together, **change}, labels + [label]
        prefixes.append((" and ".join(labels), together))
    options = [label for label, change in candidates if fits(change)]
    if not options:
        options = next(([label] for label, change in prefixes if fits(change)), [])
    if on_gpu and resource == "gpu":
        for n in (n for n in (2, 4, 8) if n > plan.available.gpus):
            if fits({}, n):
                options.append(f"--gpus {n}")
                break
            found = next((label for label, change in prefixes if fits(change, n)), None)
            if found and not options:
                options.append(f"{found} and --gpus {n}")
                break
    if not options:
        tried = ", ".join(label for label, _ in candidates) or "no setting left to change"
        return f"it does not fit even with {tried}; use a larger machine or a smaller model"
    return "add " + ", or ".join(options)


# -- The machine ---------------------------------------------------------------------------------------------------
def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def cuda_devices() -> tuple[int, int | None]:
    """(CUDA devices, free bytes on the first one), or (0, None) without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0, None
    free, _ = torch.cuda.mem_get_info(0)
    return torch.cuda.device_count(), int(free)


def available_memory(out_dir: str | Path = ".", gpus: int | None = None, gpu_gib: float | None = None,
                     host_gib: float | None = None, disk_gib: float | None = None, device: str = "auto") -> Available:
    """This machine: free host RAM (psutil), free disk where `out_dir` goes plus what that run folder already holds
    (a resumed run's plan counts it), and with CUDA the GPUs' count and the first one's free memory. Given values win;
    `gpus` or `gpu_gib` alone plans that many GPUs (1 with only `gpu_gib`); `device` cpu/mps plans no GPU."""
    import psutil

    out_dir = Path(out_dir)
    measured = [name for name, given in (("host", host_gib), ("disk", disk_gib)) if given is None]
    host = int(host_gib * GiB) if host_gib is not None else psutil.virtual_memory().available
    if disk_gib is not None:
        disk = int(disk_gib * GiB)
    else:
        existing = next(p for p in [out_dir.resolve(), *out_dir.resolve().parents] if p.exists())
        disk = shutil.disk_usage(existing).free + folder_bytes(out_dir)
    if device in ("cpu", "mps"):
        return Available(host_bytes=host, disk_bytes=disk, gpus=0, measured=tuple(measured))
    gpu = int(gpu_gib * GiB) if gpu_gib is not None else None
    if gpu_gib is None:
        measured.append("gpu")
    if gpus is None and gpu is None:
        gpus, gpu = cuda_devices()
    elif gpu is None and gpus:
        gpu = cuda_devices()[1]  # None without CUDA: the GPU side is then planned but not checked
    gpus = 1 if gpus is None else gpus
    return Available(host_bytes=host, gpu_bytes=gpu if gpus else None, disk_bytes=disk, gpus=gpus, measured=tuple(measured))


def in_this_run(available: Available) -> Available:
    """`available` for a run of this process: one GPU, or one per process under `accelerate launch` / torchrun."""
    processes = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return replace(available, gpus=min(available.gpus, processes))


# -- The checks before work -----------------------------------------------------------------------------------------
def check_pipeline_memory(config) -> MemoryPlan:
    """Refuse a `PipelineConfig` whose steps do not fit this machine, before any step runs."""
    from recover_lora.devices.shapes import load_model_shape
    from recover_lora.export.sources import default_model_path

    sizes = model_sizes(load_model_shape(config.model or default_model_path()), policies=config.policies)
    settings = plan_settings(config.preset, policies=config.policies, skip=config.skip)
    plan = checked_plan(sizes, settings, in_this_run(available_memory(config.out_dir, device=config.device)))
    if plan.problems and plan.problems[0].startswith(("train ", "recover ")) and ": add " in plan.problems[0]:
        raise RecoverLoraError(f"{plan.problems[0]} (the pipeline trains with --preset's settings: run that step with "
                               f"`recover-lora train` and these flags, or pass --no-plan-check)")
    plan.check()
    return plan


def train_plan_for(config) -> TrainPlan | None:
    """A TrainConfig's plan sizes; None when its training set cannot be sized without reading it (train reports that)."""
    if config.samples is not None:
        manifest = Path(config.samples) / "manifest.json"
        try:
            counts = json.loads(manifest.read_text())["counts"]
            n_samples, seq_len = int(counts["n_samples"]), int(counts["seq_len"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    else:
        try:
            n_samples = sum(1 for line in Path(config.data).open() if line.strip())
        except OSError:
            return None
        seq_len = config.seq_len or 256
    if n_samples <= 0:
        return None
    return TrainPlan.from_settings(vars(config), n_samples, seq_len)


def check_train_memory(config) -> MemoryPlan | None:
    """Refuse a `TrainConfig` that does not fit this machine, from the GGUF headers alone (no weights read)."""
    from recover_lora.devices.shapes import load_model_shape
    from recover_lora.export.sources import default_model_path, resolve_named

    train = train_plan_for(config)
    if train is None or not Path(config.base).is_file():
        return None
    teacher = resolve_named(config.teacher) if config.teacher else default_model_path()
    if not Path(teacher).exists():
        return None  # train names the missing teacher itself
    sizes = model_sizes(load_model_shape(teacher), student=load_model_shape(config.base), policies=())
    settings = PlanSettings(preset="train", train=train, recover=train, synth_samples=train.n_samples,
                            synth_seq_len=train.seq_len, synth_batch_size=train.batch_size, imatrix_samples=1, steps=("train",))
    plan = checked_plan(sizes, settings, in_this_run(available_memory(config.output, device=config.device)))
    plan.check()
    return plan


# -- Tables -----------------------------------------------------------------------------------------------------------
def format_plan(plan: MemoryPlan, sizes: ModelSizes) -> str:
    """The plan as a text table: one line per step, the constrained resource's largest parts, then the verdict."""
    c, a, t = sizes.teacher, plan.available, plan.settings.train
    where = f"{a.gpus} GPU{'s' if a.gpus > 1 else ''}" + (f" x {_gib(a.gpu_bytes)} GiB" if a.gpu_bytes else " (memory not known)") \
        if a.gpus else "CPU only"
    have = ", ".join(f"{name} {_gib(v)} GiB" for name, v in (("host RAM", a.host_bytes), ("disk", a.disk_bytes)) if v is not None)
    knobs = [f"dtype {t.dtype}", f"batch {t.batch_size} x {t.seq_len}", f"rank {t.rank} on {t.targets}"]
    knobs += [f"top-k {t.top_k}"] * bool(t.top_k) + [f"loss chunk {t.loss_chunk}"] * bool(t.loss_chunk)
    knobs += ["gradient checkpointing"] * t.gradient_checkpointing
    lines = [f"{plan.model}: {c.model_type}, {c.num_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}; "
             f"preset {plan.settings.preset} ({', '.join(knobs)})",
             f"{where}; available: {have or 'not known'}", "",
             f"{'step':<9} {'host GiB':>9} {'GPU GiB':>8} {'disk GiB':>9}  largest parts"]
    for s in plan.steps:
        parts = s.gpu if s.gpu_bytes and a.gpus else s.host
        lines.append(f"{s.step:<9} {_gib(s.host_bytes):>9} {_gib(s.gpu_bytes) if s.gpu_bytes else '-':>8} "
                     f"{_gib(s.disk_bytes):>9}  {_parts_text(parts, 3)}")
    lines.append("")
    lines += [f"does not fit: {p}" for p in plan.problems] or ["fits"]
    return "\n".join(lines)


def plan_json(plan: MemoryPlan, sizes: ModelSizes) -> str:
    c = sizes.teacher
    shape = {"model_type": c.model_type, "layers": c.num_layers, "hidden": c.hidden_size, "intermediate": c.intermediate_size,
             "heads": c.num_heads, "kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "vocab": c.vocab_size,
             "teacher_params": n_params(c), "student_params": n_params(sizes.student)}
    return json.dumps({**plan.to_dict(), "shape": shape}, indent=2) + "\n"


GRID_MODELS = ("qwen3-4b", "llama-3.1-8b", "qwen3-14b", "mistral-small-22b")
GRID_GPU_GIB = (24, 48, 80)


def projection_markdown(preset: str = "paper", models: tuple[str, ...] = GRID_MODELS, gpu_gib: tuple[int, ...] = GRID_GPU_GIB,
                        overrides: dict | None = None) -> str:
    """The plan's GPU memory for each model on one GPU of each size, and what to add where it does not fit."""
    from recover_lora.devices.shapes import load_model_shape

    settings = plan_settings(preset, overrides)
    t = settings.train
    lines = [f"# Memory plan: preset `{preset}` on one GPU",
             "",
             f"Written by `recover-lora plan --grid --preset {preset}` from the models' shapes alone (no weights read): "
             f"training batch {t.batch_size} x {t.seq_len}, rank {t.rank}, dtype {t.dtype} (bf16 on a GPU). GiB of GPU "
             f"memory per step that uses the GPU (the plan's arithmetic: its GPU terms are not measured yet, see README "
             f"\"Memory\"); host RAM and disk are not checked here (`recover-lora plan MODEL` does). The verdict: the settings "
             f"that make a step fit, found by planning again with them.",
             "",
             "| model | synth | imatrix | train | recover | heldout | eval |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    verdicts = ["", "| model | GPU | what makes each step fit |", "|---|---:|---|"]
    for name in models:
        sizes = model_sizes(load_model_shape(name))
        for gib in gpu_gib:
            plan = checked_plan(sizes, settings, Available(gpus=1, gpu_bytes=gib * GiB))
            if gib == gpu_gib[0]:
                gpu = {s.step: _gib(s.gpu_bytes) for s in plan.steps if s.gpu_bytes}
                lines.append(f"| {name} | " + " | ".join(gpu.get(step, "-") for step in
                                                         ("synth", "imatrix", "train", "recover", "heldout", "eval")) + " |")
            failing = [s.step for s in plan.steps if s.gpu_bytes > gib * GiB]
            verdict = "; ".join(f"{step}: {remedies(plan, step, sizes, 'gpu')}" for step in failing) or "fits as it is"
            verdicts.append(f"| {name} | {gib} GiB | {verdict} |")
    lines += verdicts
    return "\n".join(lines) + "\n"
