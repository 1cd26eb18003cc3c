"""Can llama.cpp decode on this machine? A few tokens in a child process decide, before any real work.

A native crash in llama.cpp (a CPU kernel built for another CPU, ggml's AMX kernels miscompiled:
see runtime/llama_build.py) kills the Python process that called it, with a core dump and no word
of what to do. So before the first model is loaded, a child process loads the default model and
decodes a short prompt (a batch of rows: the matrix-matrix kernels) and 4 tokens (one row: the
matrix-vector kernels) with llama.cpp's defaults, its "extra buffer types" on: AMX and weight
repacking (Q4_0/IQ4_NL into interleaved layouts). If that child dies by a signal, a second one
tries with them off. The outcome is remembered per llama.cpp build and CPU, so this costs a few
seconds once.

- both decode: extra buffer types on (llama.cpp's default);
- only the second decodes: every model of this process loads with them off, and one line on
  stderr says so (prompt processing is slower; decode of repack-able types too);
- neither decodes: `RecoverLoraError` (exit 2) naming the signal and what to do.

The setting: RECOVER_LORA_EXTRA_BUFTS = auto (default: the self-test decides) | on | off (no test).
`recover-lora selftest` runs it again and prints the outcome with the build and the CPU's extensions.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from recover_lora.errors import RecoverLoraError
from recover_lora.runtime.llama_build import cache_root, cpu_flags, installed_build_info

EXTRA_BUFTS_ENV = "RECOVER_LORA_EXTRA_BUFTS"
SETTINGS = {"auto": None, "on": True, "off": False}
PROMPT = "Once upon a time, in a small village by the sea,"
N_DECODE = 4
CHILD_TIMEOUT_S = 300
# The child's exit code for a Python-level failure (no default model, a broken install): no verdict on llama.cpp.
CHILD_COULD_NOT_RUN = 3

_decided: bool | None = None


@dataclass(frozen=True)
class ChildRun:
    """One child decode: what it printed, or how it died."""

    extra_buffer_types: bool
    returncode: int
    signal: str | None  # "SIGSEGV", ... when a signal ended it
    text: str | None  # the decoded tokens' text when it succeeded
    error: str | None  # the last line of its stderr otherwise

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.text is not None


@dataclass(frozen=True)
class SelftestOutcome:
    runs: tuple[ChildRun, ...]  # with extra buffer types, then (if that one failed) without
    key: str

    @property
    def extra_buffer_types(self) -> bool:
        return self.runs[0].ok

    def notice(self) -> str | None:
        """The one line for stderr when llama.cpp runs, but not as it would by default."""
        if self.extra_buffer_types:
            return None
        crash = self.runs[0].signal or f"exit {self.runs[0].returncode}"
        return (
            f"recover-lora: llama.cpp crashed ({crash}) decoding with its extra CPU buffer types (AMX, weight repacking) "
            f"on this machine; every model now loads without them (slower prompts). Rebuild it for this CPU with "
            f"`make install`, or set {EXTRA_BUFTS_ENV}=on to force them"
        )


def parse_setting(value: str, what: str) -> bool | None:
    """auto -> None (the self-test decides), on -> True, off -> False; `what` names the flag or variable in the error."""
    value = value.strip().lower() or "auto"
    if value not in SETTINGS:
        raise RecoverLoraError(f"{what}={value!r} is not one of {', '.join(SETTINGS)}; choose one")
    return SETTINGS[value]


def setting() -> bool | None:
    """RECOVER_LORA_EXTRA_BUFTS, parsed."""
    return parse_setting(os.environ.get(EXTRA_BUFTS_ENV, "auto"), EXTRA_BUFTS_ENV)


def build_key() -> str:
    """What the outcome depends on: llama.cpp's shared libraries as installed, this CPU, this environment."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    libs = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in (lib_dir.iterdir() if lib_dir.is_dir() else [])
        if p.suffix in (".so", ".dylib", ".dll") or ".so." in p.name
    )
    parts = [libs, cpu_flags(), platform.processor(), platform.machine(), sys.prefix]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def cache_path(key: str) -> Path:
    return cache_root() / "llama-selftest" / f"{key}.json"


def run_child(extra_buffer_types: bool, timeout_s: float = CHILD_TIMEOUT_S) -> ChildRun:
    """Decode the self-test prompt in a fresh Python process; a crash there is only a return code here."""
    command = [sys.executable, "-m", "recover_lora.runtime.llama_selftest", "--child", "on" if extra_buffer_types else "off"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return ChildRun(extra_buffer_types, -1, None, None, f"no answer in {timeout_s:.0f} s")
    sig = signal.Signals(-done.returncode).name if done.returncode < 0 else None
    text = None
    if done.returncode == 0:
        try:
            text = json.loads(done.stdout.strip().splitlines()[-1])["text"]
        except (ValueError, IndexError, KeyError):
            text = None
    err_lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    return ChildRun(extra_buffer_types, done.returncode, sig, text, err_lines[-1] if err_lines and text is None else None)


def failure_message(runs: tuple[ChildRun, ...]) -> str:
    """One line: llama.cpp cannot decode here, how it died, and what to do."""
    how = "; ".join(
        f"{'with' if r.extra_buffer_types else 'without'} extra buffer types: "
        + (r.signal or f"exit {r.returncode}") + (f" ({r.error})" if r.error and not r.signal else "")
        for r in runs
    )
    build = installed_build_info()
    hint = "rebuild llama-cpp-python for this CPU with `make install` (runtime/llama_build.py)"
    if build and build.get("cpu_flags"):
        missing = sorted(set(build["cpu_flags"]) - set(cpu_flags()))
        if missing:
            hint = f"it was built on a CPU with {', '.join(missing[:6])} that this one lacks: " + hint
    return f"llama.cpp cannot decode on this machine ({how}); {hint}"


def selftest(use_cache: bool = True) -> SelftestOutcome:
    """Run (or recall) the self-test; raises RecoverLoraError if llama.cpp cannot decode at all."""
    key = build_key()
    path = cache_path(key)
    if use_cache and path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            return SelftestOutcome(tuple(ChildRun(**r) for r in saved["runs"]), key)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: run it again
    runs = [run_child(True)]
    if not runs[0].ok:
        if runs[0].returncode == CHILD_COULD_NOT_RUN:
            raise RecoverLoraError(f"the llama.cpp self-test could not run: {runs[0].error}")
        runs.append(run_child(False))
    if not runs[-1].ok:
        raise RecoverLoraError(failure_message(tuple(runs)))
    outcome = SelftestOutcome(tuple(runs), key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"extra_buffer_types": outcome.extra_buffer_types, "runs": [asdict(r) for r in runs]}), encoding="utf-8")
    os.replace(tmp, path)
    return outcome


def extra_buffer_types() -> bool:
    """Whether this process loads models with llama.cpp's extra CPU buffer types: the setting, else the self-test."""
    global _decided
    if _decided is None:
        choice = setting()
        if choice is not None:
            _decided = choice
        else:
            outcome = selftest()
            notice = outcome.notice()
            if notice:
                print(notice, file=sys.stderr)
            _decided = outcome.extra_buffer_types
    return _decided


def _child(extra_buffer_types: bool) -> None:
    """The decode itself (runs in the child): the default model, a prompt batch, then N_DECODE tokens."""
    import llama_cpp

    from recover_lora.export.sources import default_model_path
    from recover_lora.runtime.llama import default_threads, model_params_override

    with model_params_override(use_extra_bufts=extra_buffer_types):
        llm = llama_cpp.Llama(model_path=str(default_model_path()), n_ctx=64, n_batch=32, n_threads=default_threads(), verbose=False)
    out = llm(PROMPT, max_tokens=N_DECODE, temperature=0.0)
    print(json.dumps({"text": out["choices"][0]["text"]}))
    llm.close()


def main(argv: list[str] | None = None) -> int:
    """The child's entry point (`--child on|off`); people run `recover-lora selftest`."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--child" or argv[1] not in ("on", "off"):
        print("usage: python -m recover_lora.runtime.llama_selftest --child on|off (people: recover-lora selftest)", file=sys.stderr)
        return 2
    try:
        _child(argv[1] == "on")
    except Exception as e:  # noqa: BLE001  (any Python-level failure: reported, not a crash)
        print(f"{type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return CHILD_COULD_NOT_RUN
    return 0


if __name__ == "__main__":
    sys.exit(main())
