"""A pipeline run's record, DIR/pipeline.json: the steps in order, what each finished step read and wrote.

Its own module because two sides read it: `recover_lora.pipeline` writes it as steps finish, `recover_lora.report`
(and `recover-lora plan`, for the step names) read it, and neither should import the other for that.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import atomic_output, sha256_file

# synth needs only the teacher, so it comes first: its text feeds the importance matrix of the exports.
STEPS = ("synth", "imatrix", "export", "baselines", "autoround", "search", "reconstruct", "kltune", "train", "recover", "heldout", "eval", "bench", "report")
MANIFEST_FILE = "pipeline.json"
MANIFEST_VERSION = 1


def digest_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class StepRecord:
    inputs_digest: str
    outputs: dict[str, str]  # path relative to out_dir -> sha256
    seconds: float
    summary: dict = field(default_factory=dict)


class Manifest:
    """DIR/pipeline.json: what each finished step read and wrote (rewritten atomically)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / MANIFEST_FILE
        self.out_dir = out_dir
        self.steps: dict[str, StepRecord] = {}
        self.started: dict[str, str] = {}  # step -> inputs digest of a run that has not finished (yet)
        self.meta: dict = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.steps = {name: StepRecord(**record) for name, record in data["steps"].items()}
                self.started = dict(data.get("started", {}))
                self.meta = data.get("meta", {})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise RecoverLoraError(f"{self.path} is corrupt ({e}); delete it or pass --force all") from None

    def save(self) -> None:
        data = {"version": MANIFEST_VERSION, "meta": self.meta, "started": self.started,
                "steps": {k: asdict(v) for k, v in self.steps.items()}}
        with atomic_output(self.path, force=True) as tmp:
            tmp.write_text(json.dumps(data, indent=2))

    def hashes(self, outputs: list[Path]) -> dict[str, str] | None:
        """Hashes of the outputs, or None if one is missing."""
        if not all(p.is_file() for p in outputs):
            return None
        return {str(p.relative_to(self.out_dir)): sha256_file(p) for p in outputs}

    def up_to_date(self, step: str, digest: str, outputs: list[Path]) -> bool:
        record = self.steps.get(step)
        return record is not None and record.inputs_digest == digest and self.hashes(outputs) == record.outputs
