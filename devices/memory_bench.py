"""Measure each step's peak memory on random-weight models of the bundled shapes, next to the plan's prediction.

For each shape (fewer layers, and optionally a smaller vocabulary, so a small machine holds it) this writes
a random-weight F32 teacher GGUF (`export.sources.random_model`), then runs the real commands one per
subprocess on the CPU: synth, imatrix, export (gateup), train (a few steps; full-vocabulary KL, then a
top-k cache) and heldout. Each child's peak RSS comes from `os.wait4` (ru_maxrss: what the kernel saw, mapped
file pages included) and its wall time from the clock; the plan (`devices.memory_plan`, CPU, same settings)
gives the prediction. Results go to devices/results/memory-bench.json.

    python -m recover_lora.devices.memory_bench --shape qwen3-4b:1 --shape qwen3-4b:4:4096:16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recover_lora.devices.memory_plan import Available, MiB, PlanSettings, TrainPlan, plan_memory
from recover_lora.devices.memory_sizes import model_sizes
from recover_lora.devices.shapes import SHAPES_DIR, load_model_shape
from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output

RESULTS = Path(__file__).with_name("results") / "memory-bench.json"
# Small enough for 2 CPU cores in minutes, large enough that the model terms dwarf the process itself.
SYNTH_SAMPLES, SEQ_LEN, SYNTH_BATCH = 16, 64, 16
TRAIN_BATCH, TRAIN_STEPS, RANK, TOP_K = 4, 2, 16, 32
HELDOUT_TOKENS = 1024  # 4 windows of 256: one heldout batch
# Qwen3-4B's widths: one layer with its whole 152k vocabulary (embedding and logits are most of it), and four layers with a
# 4096-token vocabulary and a 16-sample batch (activations and weights dominate).
DEFAULT_SHAPES = ("qwen3-4b:1", "qwen3-4b:4:4096:16")


def reduced_config(name: str, layers: int, vocab: int | None, folder: Path) -> Path:
    """The bundled shape `name` with `layers` layers (and `vocab` tokens) as folder/config.json."""
    config = json.loads((SHAPES_DIR / f"{name}.json").read_text())
    config["num_hidden_layers"] = layers
    if vocab is not None:
        config["vocab_size"] = vocab
    for key in ("layer_types",):  # per-layer lists follow the layer count
        if isinstance(config.get(key), list):
            config[key] = config[key][:layers]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder / "config.json"


def measure(command: list[str], cwd: Path, log: Path) -> dict:
    """Run one command; its peak RSS (bytes) and wall seconds. A failing command is a one-line error."""
    started = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(command)}\n".encode())
        out.flush()
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:]
        raise RecoverLoraError(f"{' '.join(command[1:4])} failed (exit {process.returncode}): {tail[0] if tail else ''}; see {log}")
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "wall_s": round(seconds, 1)}  # Linux reports KiB


def write_teacher(config: str, out: str) -> None:
    """The random-weight model of a config.json as an F16 GGUF (a teacher the steps can read)."""
    from recover_lora.export.gguf_io import write_gguf
    from recover_lora.export.sources import random_model

    write_gguf(random_model(config), out, dtype="f16", force=True)


def bench_shape(name: str, layers: int, vocab: int | None, batch: int, work: Path, threads: int) -> list[dict]:
    folder = work / f"{name}-{layers}l" / "model"
    config = reduced_config(name, layers, vocab, folder)
    teacher = folder / "teacher.gguf"
    rl, log, cpu = [sys.executable, "-m", "recover_lora"], folder.parent / "commands.log", ["--device", "cpu"]
    # In a child: Linux carries a process's peak RSS over fork and exec into its children, so this process must
    # stay small for the children's ru_maxrss to be their own. F16, as a bf16 checkpoint's 2 bytes per weight.
    measure([sys.executable, "-c", "import sys; from recover_lora.devices.memory_bench import write_teacher; "
             "write_teacher(sys.argv[1], sys.argv[2])", str(config), str(teacher)], folder.parent, log)
    train = ["train", "--base", "gateup.gguf", "--teacher", str(teacher), "--samples", "synth", "--batch-size", str(batch),
             "--max-steps", str(TRAIN_STEPS), "--rank", str(RANK), "--init", "zero", "--threads", str(threads),
             "--no-progress", "--force", "--no-plan-check", *cpu]
    commands = {
        "synth": ["synth", str(teacher), "-o", "synth", "--n-samples", str(SYNTH_SAMPLES), "--seq-len", str(SEQ_LEN),
                  "--batch-size", str(SYNTH_BATCH), "--threads", str(threads), "--force", *cpu],
        "imatrix": ["imatrix", str(teacher), "-o", "imatrix.gguf", "--samples", "synth", "--threads", str(threads), "--force", *cpu],
        "export": ["export", str(teacher), "--policy", "gateup", "-o", "gateup.gguf", "--imatrix", "imatrix.gguf",
                   "--threads", str(threads), "--force"],
        "train": [*train, "--out", "train"],
        "train --top-k": [*train, "--out", "train-topk", "--top-k", str(TOP_K)],
        "heldout": ["heldout", "--base", "gateup.gguf", "--adapter", "train/adapter", "--teacher", str(teacher),
                    "--max-tokens", str(HELDOUT_TOKENS), "--threads", str(threads), *cpu],
    }
    shape = load_model_shape(config)
    sizes = model_sizes(shape, policies=("gateup",), teacher_file=teacher)
    rows = []
    for label, args in commands.items():
        measured = measure(rl + args, folder.parent, log)
        train_plan = TrainPlan(batch_size=batch, seq_len=SEQ_LEN, n_samples=SYNTH_SAMPLES, rank=RANK, init="zero",
                               top_k=TOP_K if label == "train --top-k" else None)
        step = label.split()[0]
        settings = PlanSettings(preset="memory-bench", train=train_plan, recover=train_plan, synth_samples=SYNTH_SAMPLES,
                                synth_seq_len=SEQ_LEN, synth_batch_size=SYNTH_BATCH, imatrix_samples=SYNTH_SAMPLES,
                                policies=("gateup",), steps=(step,))
        planned = plan_memory(sizes, settings, Available(gpus=0)).steps[0]
        row = {"shape": name, "layers": layers, "vocab": shape.config.vocab_size, "train_batch": batch, "step": label, **measured,
               "planned_host_bytes": planned.host_bytes, "planned_parts": planned.host,
               "planned_over_measured": round(planned.host_bytes / measured["peak_rss_bytes"], 3)}
        print(f"{name} x{layers} {label:<14} measured {measured['peak_rss_bytes'] / MiB:8.0f} MiB  planned "
              f"{planned.host_bytes / MiB:8.0f} MiB  ({row['planned_over_measured']:.2f})  {measured['wall_s']:6.1f} s", flush=True)
        rows.append(row)
    return rows


def parse_shape(text: str) -> tuple[str, int, int | None, int]:
    """'qwen3-4b:1' -> ('qwen3-4b', 1, None, TRAIN_BATCH); 'qwen3-4b:2:4096:16' -> (..., 2, 4096, 16)."""
    name, *numbers = text.split(":")
    try:
        layers, vocab, batch = [int(n) if n else None for n in numbers] + [None] * (3 - len(numbers))
    except ValueError:
        raise RecoverLoraError(f"--shape {text!r} must be NAME[:LAYERS[:VOCAB[:TRAIN_BATCH]]], e.g. qwen3-4b:1") from None
    if not (SHAPES_DIR / f"{name}.json").is_file():
        raise RecoverLoraError(f"--shape {name!r} is not a bundled shape (devices/shapes/*.json)")
    return name, layers or 1, vocab, batch or TRAIN_BATCH


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", default=None, help="NAME[:LAYERS[:VOCAB[:TRAIN_BATCH]]] (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=None, help="Folder for the models and runs (default: a temporary one)")
    args = parser.parse_args(argv)
    shapes = [parse_shape(s) for s in (args.shape or list(DEFAULT_SHAPES))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        work = args.work or Path(tmp)
        for name, layers, vocab, batch in shapes:
            rows += bench_shape(name, layers, vocab, batch, work, args.threads)
    import resource

    from recover_lora.runtime.records import machine_identity

    # This process's own peak: every child's ru_maxrss is at least this (see bench_shape).
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"machine": machine_identity(),
              "parent_peak_rss_bytes": parent,
              "settings": {"synth_samples": SYNTH_SAMPLES, "seq_len": SEQ_LEN, "synth_batch": SYNTH_BATCH, "default_train_batch": TRAIN_BATCH,
                           "train_steps": TRAIN_STEPS, "rank": RANK, "top_k": TOP_K, "heldout_tokens": HELDOUT_TOKENS, "device": "cpu"},
              "rows": rows}
    with atomic_output(args.out, force=True) as out:
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except RecoverLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
