"""AutoRound's own GGUF files (`auto-round` on PyPI, Intel): the other baseline a user would make instead.

AutoRound tunes each block's rounding and scales by signed gradient descent (SignRound) on calibration text,
or with `iters=0` runs its "optimized RTN" (scale search weighted by the calibration activations), and writes
the GGUF itself with its own copy of llama.cpp's converter. It needs a Hugging Face folder: for a GGUF source
(the default model) one is made from the teacher's dequantized weights and its tokenizer, in a temporary folder
beside the output. Calibration is the run's own text (the synthetic windows the importance matrix sees), so
every baseline learns from the same tokens.

Example:
    autoround_gguf(None, "autoround-q3_k_m-iters0.gguf", AutoRoundBaseline("gguf:q3_k_m", 0), input_ids)
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf

from recover_lora.errors import RecoverLoraError

if TYPE_CHECKING:
    from recover_lora.export.quantize import ExportResult

# AutoRound's GGUF schemes (auto_round/schemes.py, 0.16.1) and the llama.cpp file type each writes.
SCHEME_FILE_TYPES = {
    "gguf:q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "gguf:q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "gguf:q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "gguf:q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "gguf:q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "gguf:q2_k_s": gguf.LlamaFileType.MOSTLY_Q2_K_S, "gguf:q3_k_s": gguf.LlamaFileType.MOSTLY_Q3_K_S,
    "gguf:q3_k_m": gguf.LlamaFileType.MOSTLY_Q3_K_M, "gguf:q3_k_l": gguf.LlamaFileType.MOSTLY_Q3_K_L,
    "gguf:q4_k_s": gguf.LlamaFileType.MOSTLY_Q4_K_S, "gguf:q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "gguf:q5_k_s": gguf.LlamaFileType.MOSTLY_Q5_K_S, "gguf:q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "gguf:q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
}
# AutoRound's own default number of tuning steps per block (its README and `auto-round --iters`).
DEFAULT_ITERS = 200


@dataclass(frozen=True)
class AutoRoundBaseline:
    """One AutoRound file: its GGUF scheme and tuning steps per block (0 = its optimized RTN, no tuning)."""

    scheme: str
    iters: int

    def __post_init__(self) -> None:
        if self.scheme not in SCHEME_FILE_TYPES:
            raise RecoverLoraError(f"unknown AutoRound GGUF scheme {self.scheme!r}; use one of: {', '.join(SCHEME_FILE_TYPES)}")
        if self.iters < 0:
            raise RecoverLoraError(f"AutoRound iters={self.iters} must be >= 0 (0 = no tuning)")

    @classmethod
    def parse(cls, text: str) -> "AutoRoundBaseline":
        """'gguf:q3_k_m@0' or 'q3_k_m@200' -> AutoRoundBaseline; no '@' means AutoRound's default iters."""
        scheme, _, iters = text.strip().lower().partition("@")
        scheme = scheme if scheme.startswith("gguf:") else f"gguf:{scheme}"
        try:
            return cls(scheme, int(iters) if iters else DEFAULT_ITERS)
        except ValueError:
            raise RecoverLoraError(f"AutoRound baseline {text!r}: iters after '@' must be a whole number, e.g. q3_k_m@0") from None

    @property
    def label(self) -> str:
        """Its name in every table: 'AutoRound q3_k_m iters 0'."""
        return f"AutoRound {self.scheme.removeprefix('gguf:')} iters {self.iters}"

    @property
    def file_name(self) -> str:
        return f"autoround-{self.scheme.removeprefix('gguf:')}-iters{self.iters}.gguf"


def unsupported_reason(architecture: str) -> str | None:
    """Why AutoRound's GGUF converter cannot write `architecture` (a transformers class name) here, or None if it can.

    Checked before any work: AutoRound 0.16.1's bundled converter names gguf-py members newer than PyPI's gguf
    0.19.0 has for the Qwen family (MODEL_ARCH.DFLASH), so Qwen2/Qwen3 models cannot be written with it.
    """
    from importlib.metadata import version

    from auto_round.export.export_to_gguf.llama_cpp_conversion import get_conversion

    try:
        get_conversion(hparams={"architectures": [architecture]}, auto_update=False)
    except Exception as e:  # noqa: BLE001 - any failure to import its converter means no file
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ is not None else ""
        return (f"AutoRound {version('auto-round')}'s GGUF converter cannot write {architecture} with gguf "
                f"{version('gguf')}{cause}")
    return None


def model_architecture(source: str | Path | None) -> str:
    """The transformers class of the model at `source` (config only, no weights read)."""
    from recover_lora.export.sources import load_model

    return load_model(source).config.to_hf_config()["architectures"][0]


def teacher_hf_folder(source: str | Path | None, folder: Path) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) of the teacher: `source` itself if it is one.

    A GGUF source is dequantized by our reader (the teacher every other step uses) and saved with the tokenizer
    transformers reads from the same GGUF. Large models are saved in fp16, as their full-precision work file is.
    """
    import torch

    from recover_lora.export.quantize import F32_WORK_FILE_MAX_PARAMS
    from recover_lora.export.sources import default_model_path, load_model, resolve_named
    from recover_lora.export.torch_model import to_hf_model
    from recover_lora.recovery.teacher_source import load_hf_tokenizer

    path = resolve_named(source) if source is not None else default_model_path()
    if Path(path).is_dir():
        return Path(path)
    weights = load_model(source)
    dtype = torch.float32 if weights.config.num_linear_parameters() <= F32_WORK_FILE_MAX_PARAMS else torch.float16
    to_hf_model(weights, dtype=dtype).save_pretrained(folder, safe_serialization=True)
    load_hf_tokenizer(Path(path)).save_pretrained(folder)
    return folder


@contextlib.contextmanager
def _autoround_log(log_path: Path):
    """AutoRound's log and progress bars go to `log_path` (kept only when the run fails), not the terminal."""
    logger = logging.getLogger("autoround")
    handlers = list(logger.handlers)
    with open(log_path, "w") as log, contextlib.redirect_stderr(log):  # tqdm writes to sys.stderr
        file_handler = logging.StreamHandler(log)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(filename)s L%(lineno)d: %(message)s"))
        for handler in handlers:
            logger.removeHandler(handler)
        logger.addHandler(file_handler)
        try:
            yield
        finally:
            logger.removeHandler(file_handler)
            for handler in handlers:
                logger.addHandler(handler)


def autoround_gguf(
    source: str | Path | None,
    out_path: str | Path,
    baseline: AutoRoundBaseline,
    input_ids,
    batch_size: int = 8,
    seed: int = 0,
    device: str = "cpu",
    force: bool = False,
) -> "ExportResult":
    """Quantize the teacher with AutoRound's `baseline.scheme` and write its GGUF to `out_path`.

    Args:
        source: Hugging Face folder, .gguf file, named model, or None for the default model.
        out_path: the GGUF to write (temporary file + rename; AutoRound's log beside it if it fails).
        baseline: scheme and iters.
        input_ids: calibration token ids [n_windows, seq_len] (e.g. `recovery.imatrix.calibration_windows`).
        batch_size: windows per AutoRound step (its default 8).
        device: where AutoRound tunes (its device_map: cpu, cuda, ...).
    """
    import torch

    try:
        from auto_round import AutoRound
    except ImportError:
        raise RecoverLoraError("AutoRound is not installed; run `make install` (or pip install auto-round==0.16.1)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recover_lora.export.gguf_header import read_gguf_header
    from recover_lora.export.gguf_io import field_value
    from recover_lora.export.llama_load import llama_cpp_load_check
    from recover_lora.export.quantize import ExportResult
    from recover_lora.fileio import atomic_output, check_output

    out_path = check_output(out_path, force)
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise RecoverLoraError(f"AutoRound needs calibration windows [n, seq_len]; got shape {tuple(input_ids.shape)}")
    reason = unsupported_reason(model_architecture(source))
    if reason is not None:
        raise RecoverLoraError(f"{reason}; no {baseline.label} file for this model")
    log_path = out_path.with_name(out_path.name + ".autoround.log")
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".recover-lora-") as work_dir:
        windows = [input_ids[i:i + 1].to(torch.long) for i in range(input_ids.shape[0])]
        output_dir = Path(work_dir) / "autoround"
        try:
            with _autoround_log(log_path):
                folder = teacher_hf_folder(source, Path(work_dir) / "teacher")
                model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
                tokenizer = AutoTokenizer.from_pretrained(folder)
                rounder = AutoRound(model, tokenizer=tokenizer, scheme=baseline.scheme, iters=baseline.iters, dataset=windows,
                                    nsamples=len(windows), seqlen=input_ids.shape[1], batch_size=min(batch_size, len(windows)),
                                    seed=seed, device_map=device)
                rounder.quantize_and_save(str(output_dir), format=baseline.scheme)
        except SystemExit:  # AutoRound exits the process on what it does not support (an architecture, a tokenizer)
            raise RecoverLoraError(f"AutoRound refused {baseline.label} for this model; its log: {log_path}") from None
        written = sorted(output_dir.rglob("*.gguf"))
        if len(written) != 1:
            raise RecoverLoraError(f"AutoRound wrote {len(written)} GGUF files, expected one; its log: {log_path}")
        with atomic_output(out_path, force=force) as tmp:
            os.replace(written[0], tmp)
            header = read_gguf_header(tmp)
            file_type = field_value(header, gguf.Keys.General.FILE_TYPE)
            expected = SCHEME_FILE_TYPES[baseline.scheme]
            if file_type != int(expected):
                raise RecoverLoraError(f"AutoRound wrote file type {file_type}, not {expected.name} for {baseline.scheme}")
            types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in header.tensors}
            llama_cpp_load_check(tmp, name=str(out_path))
    log_path.unlink(missing_ok=True)
    return ExportResult(path=out_path, policy=baseline.label, padded=False, types=types)
