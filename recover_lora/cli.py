"""The `recover-lora` command: one typer app that only parses and dispatches.

Each stage folder owns its commands in its `commands.py` (a `register(app)` function).
Those modules import nothing heavy at import time: torch, transformers and llama_cpp are
imported inside the command that needs them, so `recover-lora --help` is instant.
"""

from __future__ import annotations

import sys

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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected failures become one line on stderr and exit code 2."""
    try:
        app(args=argv, prog_name="recover-lora")
    except RecoverLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
