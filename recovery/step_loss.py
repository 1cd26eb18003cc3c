"""One training step's loss: the teacher's signal (live, or a top-k cache) against the student's logits.

`step_loss` runs the student over a batch and returns the weighted KL (and cross-entropy); with
`loss_chunk` it runs the decoder once and the output head plus the loss a chunk of positions at a time
(`losses.chunked_losses`), so full [batch, seq, vocab] logits never exist: what lets a 150k-token
vocabulary train on one GPU. Used by `distill.train`.
"""

from __future__ import annotations

import torch

from recover_lora.recovery.losses import (
    LossConfig,
    chunked_losses,
    cross_entropy_loss,
    kl_loss,
    kl_per_row,
    next_token_rows,
    next_token_targets,
    topk_kl_loss,
    topk_kl_per_row,
)


class TeacherSignal:
    """The teacher's side of the KL: full logits on the fly, or a precomputed top-k cache."""

    def __init__(self, teacher, topk: tuple[torch.Tensor, torch.Tensor] | None):
        self.teacher, self.topk = teacher, topk

    def kl(self, ids, rows, batch_index, student_rows, loss_config, autocast):
        if self.topk is not None:
            values, top_ids = self.topk[0][batch_index], self.topk[1][batch_index]
            device = student_rows.device
            return topk_kl_loss(values[rows.cpu()].to(device), top_ids[rows.cpu()].long().to(device), student_rows, loss_config)
        with torch.no_grad(), autocast:
            teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
        return kl_loss(teacher_logits[rows], student_rows, loss_config)

    def row_kl(self, ids, rows, batch_index, loss_config, autocast):
        """For `chunked_losses`: (start, stop, student logits of loss rows start:stop) -> KL per row."""
        from recover_lora.recovery.student import decoder_hidden_states, output_logits

        if self.topk is not None:
            values = self.topk[0][batch_index][rows.cpu()].to(ids.device)
            top_ids = self.topk[1][batch_index][rows.cpu()].long().to(ids.device)
            return lambda start, stop, logits: topk_kl_per_row(values[start:stop], top_ids[start:stop], logits, loss_config)
        with torch.no_grad(), autocast:
            hidden = decoder_hidden_states(self.teacher, ids)[rows]

        def live(start: int, stop: int, logits: torch.Tensor) -> torch.Tensor:
            # Inside the student's checkpointed chunk: recomputed in backward (one more lm_head of
            # the chunk) rather than keeping every chunk's teacher logits alive until then.
            with torch.no_grad(), autocast:
                teacher_logits = output_logits(self.teacher, hidden[start:stop])
            return kl_per_row(teacher_logits, logits, loss_config)

        return live


def step_loss(model, signal: TeacherSignal | None, ids, mask, batch_index, loss_config: LossConfig, autocast,
              loss_chunk: int | None = None):
    """(total loss, {"kl": ..., "ce": ...}) of one batch; with loss_chunk, logits of at most that many rows at a time."""
    if loss_chunk is not None:
        return _chunked_step_loss(model, signal, ids, mask, batch_index, loss_config, autocast, loss_chunk)
    with autocast:
        logits = model(input_ids=ids, use_cache=False).logits
    parts = {}
    total = torch.zeros((), device=ids.device)
    if loss_config.kl_weight > 0:
        parts["kl"] = signal.kl(ids, mask, batch_index, logits[mask], loss_config, autocast)
        total = total + loss_config.kl_weight * parts["kl"]
    if loss_config.ce_weight > 0:
        ce_rows, targets = next_token_rows(ids, mask)
        parts["ce"] = cross_entropy_loss(logits[ce_rows], targets) if targets.numel() else torch.zeros((), device=ids.device)
        total = total + loss_config.ce_weight * parts["ce"]
    return total, parts


def _chunked_step_loss(model, signal, ids, mask, batch_index, loss_config: LossConfig, autocast, loss_chunk: int):
    """`step_loss` from the student's hidden states of the loss rows, lm_head and loss `loss_chunk` rows at a time."""
    from recover_lora.recovery.student import decoder_hidden_states, output_logits

    with autocast:
        hidden = decoder_hidden_states(model, ids)[mask]

    def head(rows: torch.Tensor) -> torch.Tensor:
        with autocast:
            return output_logits(model, rows)

    teacher_kl = signal.row_kl(ids, mask, batch_index, loss_config, autocast) if loss_config.kl_weight > 0 else None
    parts = chunked_losses(hidden, head, next_token_targets(ids, mask), loss_config, loss_chunk, teacher_kl)
    total = torch.zeros((), device=ids.device)
    if "kl" in parts:
        total = total + loss_config.kl_weight * parts["kl"]
    if "ce" in parts:
        total = total + loss_config.ce_weight * parts["ce"]
    return total, parts
