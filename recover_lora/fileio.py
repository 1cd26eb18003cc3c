"""Writing outputs safely: to a temporary file beside the target, then an atomic rename.

Also: `native_stderr_to`, which keeps C libraries' (llama.cpp's) own logging out of the terminal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from recover_lora.errors import RecoverLoraError


def check_output(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to overwrite an existing output unless forced; make its folder."""
    path = Path(path)
    if path.exists() and not force:
        raise RecoverLoraError(f"{path} already exists; pass --force to overwrite it")
    if path.exists() and path.is_dir():
        raise RecoverLoraError(f"{path} is a directory; give a file path for the output")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Nothing half-written is ever left at ``path``: on any exception the temporary file is removed.

    Example:
        with atomic_output("model.gguf", force=True) as tmp:
            writer = GGUFWriter(tmp, arch); ...
    """
    path = check_output(path, force)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise RecoverLoraError(f"internal error: {tmp} was not written")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks (models can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line; a line that is not JSON is a one-line error."""
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise RecoverLoraError(f"{path}:{number} is not JSON ({e.msg}); remove or fix that line") from None


@contextlib.contextmanager
def native_stderr_to(log_path: str | os.PathLike) -> Iterator[Path]:
    """Send llama.cpp's logging (and anything else on stderr) into `log_path` meanwhile.

    llama.cpp logs through llama-cpp-python's callback, which prints to Python's `sys.stderr`,
    and some messages go straight to file descriptor 2; both are redirected (append mode, so the
    two handles interleave safely).
    """
    log_path = Path(log_path)
    sys.stderr.flush()
    saved_fd, saved_stream = os.dup(2), sys.stderr
    try:
        with open(log_path, "ab") as log_fd, open(log_path, "a", encoding="utf-8", errors="replace") as log_stream:
            os.dup2(log_fd.fileno(), 2)
            sys.stderr = log_stream
            try:
                yield log_path
            finally:
                sys.stderr = saved_stream
                log_stream.flush()
                os.dup2(saved_fd, 2)
    finally:
        os.close(saved_fd)
