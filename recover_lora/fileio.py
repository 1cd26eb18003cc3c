"""Writing outputs safely: to a temporary file beside the target, then an atomic rename.

Also: `sha256_file`, which reads a file once while it stays unchanged, and `native_stderr_to`,
which keeps C libraries' (llama.cpp's) own logging out of the terminal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
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


def read_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (models can be GBs); no cache: see `sha256_file`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# Hashes remembered by (resolved path, size, mtime_ns, ctime_ns), so a file that has not changed is read once
# per process (and, through save_hash_cache / load_hash_cache, once per run folder). The ctime (which no tool
# can set back) catches a rewrite whose size and mtime were restored. A file modified less than RACY_SECONDS
# before it was hashed is not remembered: a second write within the file system's timestamp granularity
# could leave all of them as they were (git's "racily clean" index entries).
RACY_SECONDS = 2.0
_hash_cache: dict[tuple[str, int, int, int], str] = {}


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file; read only when its (path, size, mtime, ctime) is not remembered yet."""
    path = Path(path)
    key = _stat_key(path)
    if key in _hash_cache:
        return _hash_cache[key]
    hashed_at_ns = time.time_ns()
    digest = read_sha256(path)
    if _stat_key(path) == key and hashed_at_ns - key[2] >= RACY_SECONDS * 1e9:
        _hash_cache[key] = digest
    return digest


def load_hash_cache(cache_file: str | os.PathLike) -> None:
    """Remember the hashes a `save_hash_cache` wrote; a missing or unreadable file is an empty cache."""
    try:
        entries = json.loads(Path(cache_file).read_text())["files"]
        for entry in entries:
            key = (entry["path"], int(entry["size"]), int(entry["mtime_ns"]), int(entry["ctime_ns"]))
            _hash_cache[key] = str(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # only a cache: the files are hashed again


def save_hash_cache(cache_file: str | os.PathLike, roots: list[Path]) -> None:
    """Write the remembered hashes of files under `roots` that are unchanged since (atomically)."""
    roots = [Path(root).resolve() for root in roots]
    entries = []
    for key, digest in sorted(_hash_cache.items()):
        file = Path(key[0])
        if not any(file == root or file.is_relative_to(root) for root in roots):
            continue
        try:
            if _stat_key(file) != key:
                continue
        except OSError:
            continue
        entries.append({"path": key[0], "size": key[1], "mtime_ns": key[2], "ctime_ns": key[3], "sha256": digest})
    with atomic_output(cache_file, force=True) as tmp:
        tmp.write_text(json.dumps({"files": entries}, indent=1))


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
