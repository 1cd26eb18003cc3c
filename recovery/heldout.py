"""Held-out measurement: how far the student is from the teacher, before and after the adapter.

On text the training never saw, for the teacher, the quantized student, and the student with
its Recover-LoRA adapter: KL(teacher || model) per next-token prediction, top-1 agreement with
the teacher, and perplexity. All three run in torch on the same token windows; the student is
the dequantized GGUF, whose logits match llama.cpp's (tests/test_student.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from recover_lora.errors import RecoverLoraError

DEFAULT_HELDOUT_TEXT = Path(__file__).parent / "data" / "heldout_gsm8k_test150.jsonl"
# The `model` of each report row, in this order (the adapter row only with an adapter).
TEACHER_ROW, STUDENT_ROW, ADAPTER_ROW = "teacher", "student", "student + adapter"


@dataclass
class HeldoutMetrics:
    model: str
    kl_to_teacher: float
    top1_agreement: float
    perplexity: float
    positions: int

    def row(self) -> str:
        return f"{self.model:<24} {self.kl_to_teacher:>10.4f} {self.top1_agreement:>10.3f} {self.perplexity:>10.2f}"


class _Sums:
    def __init__(self) -> None:
        self.kl = self.agree = self.nll = 0.0
        self.count = 0

    def add(self, teacher_log_probs: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        log_probs = F.log_softmax(logits.float(), dim=-1)
        self.kl += float((teacher_log_probs.exp() * (teacher_log_probs - log_probs)).sum(-1).sum())
        self.agree += float((teacher_log_probs.argmax(-1) == log_probs.argmax(-1)).sum())
        self.nll += float(F.nll_loss(log_probs, targets, reduction="sum"))
        self.count += targets.numel()

    def metrics(self, name: str) -> HeldoutMetrics:
        import math

        n = max(self.count, 1)
        return HeldoutMetrics(name, self.kl / n, self.agree / n, math.exp(self.nll / n), self.count)


def measure_heldout(teacher, student, windows: torch.Tensor, batch_size: int = 4, device="cpu", with_adapter: bool = False):
    """[teacher, student (no adapter), student + adapter] metrics over token windows [W, T].

    `student` is a peft model when `with_adapter`; its adapter is switched off for the base row.
    Every position but each window's last predicts the next token of the window.
    """
    names = [TEACHER_ROW, STUDENT_ROW] + ([ADAPTER_ROW] if with_adapter else [])
    sums = {name: _Sums() for name in names}
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            targets = ids[:, 1:].reshape(-1)

            def rows(model):
                return model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size)

            teacher_logits = rows(teacher)
            teacher_log_probs = F.log_softmax(teacher_logits.float(), dim=-1)
            sums["teacher"].add(teacher_log_probs, teacher_logits, targets)
            off = student.disable_adapter() if with_adapter else contextlib.nullcontext()
            with off:
                sums["student"].add(teacher_log_probs, rows(student), targets)
            if with_adapter:
                sums["student + adapter"].add(teacher_log_probs, rows(student), targets)
    return [sums[name].metrics(name) for name in names]


def heldout_report(
    base_gguf: str | Path,
    adapter_dir: str | Path | None = None,
    teacher_source: str | Path | None = None,
    text: str | Path | None = None,
    window: int = 256,
    max_tokens: int = 16384,
    batch_size: int = 4,
    device: str = "auto",
    teacher_tensors: tuple[str, ...] = (),
    block_errors: bool = False,
) -> dict:
    """Measure teacher, student and student + adapter on held-out text (default: GSM8K test rows).

    `teacher_tensors`: GGUF tensor names whose teacher weights replace the student's, to see what each tensor's
    quantization costs (e.g. ("token_embd.weight",): the KL left without the embedding's error).

    Example:
        report = heldout_report("smollm2.gateup.gguf", "runs/demo/adapter")
        report["rows"][1]["kl_to_teacher"], report["rows"][2]["kl_to_teacher"]  # before, after
    """
    from recover_lora.recovery.adapter_gguf import check_peft_adapter_against_base
    from recover_lora.recovery.distill import pick_device
    from recover_lora.recovery.student import build_student, build_teacher, check_teacher_matches
    from recover_lora.recovery.text_data import heldout_windows

    if window < 2 or max_tokens < window:
        raise RecoverLoraError(f"--window={window} must be >= 2 and <= --max-tokens={max_tokens}")
    text = Path(text) if text is not None else DEFAULT_HELDOUT_TEXT
    if adapter_dir is not None:
        check_peft_adapter_against_base(adapter_dir, base_gguf)
    windows = heldout_windows(text, base_gguf, window, max_tokens)
    torch_device = pick_device(device)
    # fp32 both (the student is the GGUF's values exactly); on a GPU the teacher moves there before the student is
    # built, so the host holds one model at a time.
    teacher, teacher_config = build_teacher(teacher_source)
    teacher.to(torch_device)
    student, info = build_student(base_gguf)
    check_teacher_matches(teacher_config, info)
    _use_teacher_tensors(student, teacher, info, teacher_tensors)
    errors = None
    if block_errors:
        from recover_lora.recovery.decoder_blocks import local_block_errors

        student.to(torch_device).eval()
        errors = local_block_errors(teacher, student, windows, torch_device)
    if adapter_dir is not None:
        from peft import PeftModel

        student = PeftModel.from_pretrained(student, str(adapter_dir))
    student.to(torch_device).eval()
    rows = measure_heldout(teacher, student, windows, batch_size, torch_device, with_adapter=adapter_dir is not None)
    return {
        "base": str(base_gguf),
        "adapter": None if adapter_dir is None else str(adapter_dir),
        "teacher": teacher_source or "default",
        "text": str(text),
        "windows": int(windows.shape[0]),
        "window": window,
        "rows": [asdict(r) for r in rows],
        "teacher_tensors": list(teacher_tensors),
        "block_errors": errors,
    }


def _use_teacher_tensors(student, teacher, info, names: tuple[str, ...]) -> None:
    """Copy the teacher's weights of these GGUF tensors into the student (refused for a padded file or an unknown name)."""
    import torch

    from recover_lora.export.model import hf_name

    if names and info.unpadded:
        raise RecoverLoraError(f"--teacher-tensor needs a file of the model's own widths; {info.gguf_path.name} is padded")
    for name in names:
        if name not in info.tensor_types:
            raise RecoverLoraError(f"--teacher-tensor {name}: {info.gguf_path.name} has no such tensor (give a GGUF name, "
                                   f"e.g. token_embd.weight or blk.0.ffn_up.weight)")
        with torch.no_grad():
            student.get_parameter(hf_name(name, info.config)).copy_(teacher.get_parameter(hf_name(name, info.config)))


def format_report(report: dict) -> str:
    header = f"{'model':<24} {'KL(t||m)':>10} {'top-1':>10} {'ppl':>10}"
    lines = [f"held-out: {report['text']} ({report['windows']} windows x {report['window']} tokens)", header]
    lines += [HeldoutMetrics(**row).row() for row in report["rows"]]
    if report.get("block_errors"):
        errors = report["block_errors"]
        lines.append(f"block output errors of the student (against the teacher's block on the same input), sum {sum(errors):.5g}: "
                     + " ".join(f"{error:.3g}" for error in errors))
    return "\n".join(lines)
