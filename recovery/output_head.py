"""The output head's codes and scales, tuned on the next-token KL: the last stage of `recover-lora reconstruct`.

No decoder block owns the output matrix (lm_head, or the token embedding where the head is tied to it), so block
reconstruction leaves it as llama.cpp rounded it, and on the default model it holds about half of what is left:
`heldout --teacher-tensor token_embd.weight` takes the reconstructed searched file from 0.0297 to 0.0157. The head
needs no proxy loss: its output is the logits. So, with every block already written, its rounding offsets (and scale
multipliers, as --tune says) learn by SignRound on KL(teacher || student) per position, from

- the teacher's distribution: its own final hidden states through its own head;
- the student's final hidden states (the blocks as reconstructed) through the quantized head,

both hidden states cached once, so a step is a matrix product per side, never a pass through the model. A step takes a
batch of positions (at most HEAD_STEP_LOGITS logits, so a 150k vocabulary takes fewer positions than a 49k one) from
the calibration windows but the last `held_out_windows`; those windows judge SNAPSHOTS evenly spaced snapshots, and
the head keeps its tuning only if the best beats the input's bytes there. Where the head is the tied token embedding,
the new bytes also change what every block reads, so that verdict is the whole student's KL on those windows (the
blocks streamed one at a time, as reconstruction runs them).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from recover_lora.recovery.student import causal_lm, output_logits

if TYPE_CHECKING:
    import torch
# torch (and decoder_blocks, which imports it) are imported inside the functions: reconstruct's CLI reads HeadRecord's
# module without loading torch.

HEAD_STEP_LOGITS = 2**25  # logits per step and per side (128 MiB in fp32): positions per step = this / vocabulary
SNAPSHOTS = 4
HELD_OUT_SHARE = 8  # at most one window in 8 is held out for the verdict (16 of the default 128)
MAX_HELD_OUT = 16


@dataclass
class HeadRecord:
    tensor: str  # GGUF name of the head: output.weight, or token_embd.weight where tied
    ggml_type: str
    tied: bool
    held_out_windows: int
    kl_before: float  # KL on the held-out windows with the input's bytes
    kl_after: float  # with the bytes written (the input's, when reverted)
    tuned_kl: float  # with the tuned bytes, whether kept or not
    kept: bool
    seconds: float


def head_tensor_name(info) -> str:
    """The GGUF tensor that computes the logits: output.weight, or the token embedding where the head is tied to it."""
    return "output.weight" if "output.weight" in info.tensor_types else "token_embd.weight"


def held_out_count(windows: int) -> int:
    """Calibration windows the head's verdict is taken on (the last ones): 1 in HELD_OUT_SHARE, at most MAX_HELD_OUT."""
    return max(1, min(MAX_HELD_OUT, windows // HELD_OUT_SHARE)) if windows > 1 else 0


def final_hidden(model, last_outputs, counted, device: str) -> torch.Tensor:
    """float32 [positions, hidden] on the CPU: the final norm of the last block's outputs at the counted positions."""
    import torch

    norm = causal_lm(model).get_decoder().norm.to(device)
    rows = last_outputs[counted.to(torch.bool)]
    with torch.no_grad():
        out = torch.cat([norm(rows[i : i + 4096].to(device)).float().cpu() for i in range(0, rows.shape[0], 4096)])
    norm.to("cpu")
    return out


def streamed_final_hidden(model, ids, counted, kwargs: list[dict], device: str) -> torch.Tensor:
    """final_hidden of a whole forward pass, one block on the device at a time (the model stays on the host)."""
    from recover_lora.recovery.decoder_blocks import decoder_layers, layer_inputs, layer_outputs

    hidden = layer_inputs(model, ids)
    for layer, layer_kwargs in zip(decoder_layers(model), kwargs):
        layer.to(device)
        hidden = layer_outputs(layer, hidden, layer_kwargs, device)
        layer.to("cpu")
    return final_hidden(model, hidden, counted, device)


def _position_kl_sum(teacher, student, teacher_hidden, student_hidden, weight, chunk: int) -> torch.Tensor:
    """Σ over these positions of KL(teacher || student), the student's head weight replaced by `weight`."""
    import torch
    import torch.nn.functional as F

    from recover_lora.recovery.losses import kl_from_log_probs

    total = torch.zeros((), device=weight.device)
    for start in range(0, teacher_hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        with torch.no_grad():
            target = F.log_softmax(output_logits(teacher, teacher_hidden[rows].to(weight.device)).float(), dim=-1)
        logits = output_logits(student, student_hidden[rows].to(weight.device), weight=weight)
        total = total + kl_from_log_probs(target, F.log_softmax(logits.float(), dim=-1)).sum()
    return total


@contextmanager
def heads_on(device: str, *models):
    """The models' output heads on `device` for the duration (a tied head is the embedding: it goes along)."""
    heads = [causal_lm(model).get_output_embeddings() for model in models]
    for head in heads:
        head.to(device)
    try:
        yield
    finally:
        for head in heads:
            head.to("cpu")


def _mean_kl(teacher, student, teacher_hidden, student_hidden, weight) -> float:
    """Mean KL(teacher || student) over these positions, the heads already on `weight`'s device (no gradient)."""
    import torch

    with torch.no_grad():
        total = _position_kl_sum(teacher, student, teacher_hidden, student_hidden, weight, max(1, HEAD_STEP_LOGITS // weight.shape[0]))
    return float(total) / max(teacher_hidden.shape[0], 1)


def head_kl(teacher, student, teacher_hidden, student_hidden, weight, device: str) -> float:
    """_mean_kl with the models' heads moved to `device` for it."""
    with heads_on(device, teacher, student):
        return _mean_kl(teacher, student, teacher_hidden, student_hidden, weight.to(device))


def tune_output_head(teacher, student, tensor, base_raw, config, teacher_hidden, student_hidden, split: int,
                     held_out_windows: int, settings, held_out_check=None) -> tuple[HeadRecord, dict]:
    """SignRound on the head (reconstruct.TensorToTune `tensor`, its bytes `base_raw`) over cached final hidden states.

    `teacher_hidden` / `student_hidden`: [positions, hidden] of every calibration window, the first `split` positions
    trained on, the rest (the last `held_out_windows` windows') held out; `student_hidden` comes from the input's head
    bytes, so the held-out KL with them is the whole student's before tuning, tied or not. `held_out_check(raw_bytes) ->
    KL` (tied heads): the whole student's KL on the held-out windows with the tuned bytes, which then decides whether
    the tuning is kept; else the head's own held-out KL decides. Returns (the record, {GGUF name: new bytes}, empty when
    the input's bytes stay). Both models' heads sit on settings.device while it tunes.
    """
    import torch

    from recover_lora.recovery.reconstruct import sign_round_step, tuned_weight, written_weight

    start, device = time.perf_counter(), settings.device
    weight = tuned_weight(teacher, tensor, base_raw, config, device)
    chunk = max(1, HEAD_STEP_LOGITS // tensor.shape[0])
    train_t, train_s = teacher_hidden[:split], student_hidden[:split]
    held_t, held_s = teacher_hidden[split:], student_hidden[split:]
    generator = torch.Generator().manual_seed((settings.seed << 16) + 0xFFFF)
    every = max(1, settings.iters // SNAPSHOTS)
    best_kl, best_state, order = float("inf"), None, torch.empty(0, dtype=torch.long)
    with heads_on(device, teacher, student):
        before = _mean_kl(teacher, student, held_t, held_s, written_weight(base_raw, tensor, config).to(device))
        for step in range(settings.iters):
            if order.numel() < chunk:  # a new pass over the training positions, in a seeded random order
                order = torch.cat([order, torch.randperm(split, generator=generator)])
            chosen, order = order[:chunk], order[chunk:]
            loss = _position_kl_sum(teacher, student, train_t[chosen], train_s[chosen], weight(), chunk) / chosen.numel()
            loss.backward()
            sign_round_step([weight], settings.learning_rate * (1 - step / settings.iters), settings)  # as the blocks'
            if (step + 1) % every == 0 or step + 1 == settings.iters:
                with torch.no_grad():
                    kl = _mean_kl(teacher, student, held_t, held_s, weight())
                if kl < best_kl:
                    best_kl, best_state = kl, {name: value.detach().clone() for name, value in weight.named_parameters()}
        with torch.no_grad():
            for name, value in best_state.items():
                weight.get_parameter(name).copy_(value)
        new_raw = weight.to_blocks().to_bytes()
        if held_out_check is None:
            tuned = _mean_kl(teacher, student, held_t, held_s, written_weight(new_raw, tensor, config).to(device))
    if held_out_check is not None:  # the lookup changes too: judge the whole student (it moves the heads itself)
        tuned = held_out_check(new_raw)
    kept = tuned < before
    record = HeadRecord(tensor.name, tensor.ggml_type.name, held_out_check is not None, held_out_windows, before,
                        tuned if kept else before, tuned, kept, round(time.perf_counter() - start, 2))
    return record, ({tensor.name: new_raw} if kept else {})
