"""Distillation losses: small pure functions over logits, tested on hand-made numbers.

Conventions shared with `distill.py`:
- `loss_mask[n, t]` is True where the distribution at position t (the prediction of token t + 1)
  is a training target — the meaning `samples.SyntheticSamples` gives it. KL uses those rows as
  they are; cross-entropy also needs the next token to exist (`next_token_rows`).
- Losses take rows of logits, shape [M, V] (one row per predicted position), and return the mean
  over rows. KL terms are multiplied by temperature² so gradients keep their size as T changes
  (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015).
- Cached teacher logits keep only the top-k log-probabilities (log-softmax over the full vocabulary)
  and their ids. Both distributions are then compared over k + 1 buckets — the k teacher tokens and
  one bucket for the rest of the vocabulary — which is an exact KL of those coarsened distributions.
- `chunked_losses` computes the same means from hidden states a few rows at a time, so the logits of
  a large vocabulary never exist for the whole batch (`--loss-chunk`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from recover_lora.errors import RecoverLoraError

KL_KINDS = ("forward", "reverse", "mix")
IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: a row with no next token


@dataclass(frozen=True)
class LossConfig:
    """How the student is pulled towards the teacher.

    kind: "forward" = KL(teacher || student) (mass-covering, the default), "reverse" =
        KL(student || teacher) (mode-seeking), "mix" = (1 - mix_weight) * forward + mix_weight * reverse.
    temperature: softmax temperature of both distributions.
    ce_weight: weight of cross-entropy on the data's own next tokens (labeled data); 0 = pure KL.
    kl_weight: weight of the KL term; 0 with ce_weight > 0 is plain fine-tuning on the labels.
    """

    kind: str = "forward"
    temperature: float = 1.0
    mix_weight: float = 0.5
    ce_weight: float = 0.0
    kl_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KL_KINDS:
            raise RecoverLoraError(f"loss kind {self.kind!r} is unknown; use one of: {', '.join(KL_KINDS)}")
        if not self.temperature > 0:
            raise RecoverLoraError(f"temperature={self.temperature} must be > 0")
        if not 0.0 <= self.mix_weight <= 1.0:
            raise RecoverLoraError(f"mix_weight={self.mix_weight} must be in [0, 1]")
        if self.ce_weight < 0 or self.kl_weight < 0 or self.ce_weight + self.kl_weight == 0:
            raise RecoverLoraError(
                f"ce_weight={self.ce_weight}, kl_weight={self.kl_weight}: both must be >= 0 and not both 0"
            )


def next_token_rows(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [N, L], targets [M]) for cross-entropy: masked positions that have a next token.

    Example: ids [[5, 6, 7]], mask [[T, T, T]] -> mask [[T, T, F]], targets [6, 7].
    """
    rows = loss_mask.clone()
    rows[:, -1] = False
    targets = input_ids[:, 1:][rows[:, :-1]]
    return rows, targets


def next_token_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The next token of every loss_mask row [M], in the order of `x[loss_mask]`; IGNORE_INDEX where none.

    The same rows and targets as `next_token_rows`, aligned with the KL rows so one pass serves both.
    Example: ids [[5, 6, 7]], mask [[T, T, T]] -> [6, 7, IGNORE_INDEX].
    """
    following = torch.full_like(input_ids, IGNORE_INDEX)
    following[:, :-1] = input_ids[:, 1:]
    return following[loss_mask]


def kl_from_log_probs(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities of shape [M, K]; 0·log 0 counts as 0."""
    p = p_log.exp()
    # Where p == 0 the term is 0 even if q_log is -inf; masking avoids 0 * inf = nan.
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(dim=-1)


def full_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def topk_bucket_log_probs(topk_log_probs: torch.Tensor) -> torch.Tensor:
    """Teacher top-k log-probs [M, k] -> [M, k + 1] with the rest of the vocabulary as the last bucket."""
    kept = torch.logsumexp(topk_log_probs, dim=-1, keepdim=True)
    # log(1 - exp(kept)), stable near kept -> 0; clamp keeps a rounding excess from becoming nan.
    rest = torch.log(-torch.expm1(kept.clamp(max=-1e-12)))
    return torch.cat([topk_log_probs, rest], dim=-1)


def student_bucket_log_probs(student_log_probs: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Student full log-probs [M, V] -> [M, k + 1] over the teacher's top-k tokens plus the rest."""
    return topk_bucket_log_probs(student_log_probs.gather(-1, topk_ids))


def _combine(kind: str, mix_weight: float, p_teacher: torch.Tensor, q_student: torch.Tensor) -> torch.Tensor:
    if kind == "forward":
        return kl_from_log_probs(p_teacher, q_student)
    if kind == "reverse":
        return kl_from_log_probs(q_student, p_teacher)
    return (1 - mix_weight) * kl_from_log_probs(p_teacher, q_student) + mix_weight * kl_from_log_probs(
        q_student, p_teacher
    )


def kl_per_row(teacher_logits: torch.Tensor, student_logits: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """KL per row [M] between full teacher and student logits [M, V], times temperature²."""
    t = config.temperature
    return _combine(config.kind, config.mix_weight, full_log_probs(teacher_logits, t), full_log_probs(student_logits, t)) * t * t


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """Mean KL over rows between full teacher and student logits [M, V], times temperature².

    Example:
        kl_loss(torch.zeros(1, 4), torch.zeros(1, 4), LossConfig())  # tensor(0.)
    """
    return kl_per_row(teacher_logits, student_logits, config).mean()


def topk_kl_per_row(
    teacher_topk_log_probs: torch.Tensor, teacher_topk_ids: torch.Tensor, student_logits: torch.Tensor, config: LossConfig
) -> torch.Tensor:
    """Like `kl_per_row`, from cached teacher top-k log-probs (at config.temperature) and ids [M, k]."""
    t = config.temperature
    teacher = topk_bucket_log_probs(teacher_topk_log_probs.float())
    student = student_bucket_log_probs(full_log_probs(student_logits, t), teacher_topk_ids)
    return _combine(config.kind, config.mix_weight, teacher, student) * t * t


def topk_kl_loss(
    teacher_topk_log_probs: torch.Tensor, teacher_topk_ids: torch.Tensor, student_logits: torch.Tensor, config: LossConfig
) -> torch.Tensor:
    """Like `kl_loss`, from cached teacher top-k log-probs (at config.temperature) and ids [M, k]."""
    return topk_kl_per_row(teacher_topk_log_probs, teacher_topk_ids, student_logits, config).mean()


def cross_entropy_loss(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of rows [M, V] against target ids [M]."""
    return F.cross_entropy(student_logits.float(), targets)


def chunked_losses(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    config: LossConfig,
    chunk: int,
    teacher_kl: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """{"kl": mean KL, "ce": mean cross-entropy} over the loss rows, from hidden states, `chunk` rows at a time.

    Args:
        hidden: the student's last hidden states of the loss rows [M, H] (before the output projection).
        head: hidden rows -> logits (the model's lm_head and whatever its forward does after it).
        targets: next token of each row [M] (`next_token_targets`), for cross-entropy.
        teacher_kl: (start, stop, student logits of rows start:stop) -> KL per row; needed when kl_weight > 0.

    Each chunk runs under torch.utils.checkpoint: its [chunk, V] logits (student and teacher) are freed
    once its sums are taken and recomputed in backward, so one chunk of logits exists at a time.
    Sums over all chunks divided by the full row counts are the means `kl_loss` and
    `cross_entropy_loss` take over the whole batch.
    """
    from torch.utils.checkpoint import checkpoint

    want_kl, want_ce = config.kl_weight > 0, config.ce_weight > 0

    def chunk_sums(rows: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(rows)
        zero = logits.new_zeros((), dtype=torch.float32)
        kl = teacher_kl(start, start + len(rows), logits).sum() if want_kl else zero
        ce = (F.cross_entropy(logits.float(), targets[start : start + len(rows)], ignore_index=IGNORE_INDEX, reduction="sum")
              if want_ce else zero)
        return kl, ce

    kl_sum = ce_sum = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(hidden), chunk):
        # Non-reentrant: gradients reach the LoRA parameters through `hidden` and the head without
        # the chunk's inputs having to be leaves that require grad.
        kl, ce = checkpoint(chunk_sums, hidden[start : start + chunk], start, use_reentrant=False)
        kl_sum, ce_sum = kl_sum + kl, ce_sum + ce
    parts = {}
    if want_kl:
        parts["kl"] = kl_sum / len(hidden)
    if want_ce:
        n_targets = int((targets != IGNORE_INDEX).sum())
        parts["ce"] = ce_sum / n_targets if n_targets else ce_sum  # no target: 0, as the unchunked loss
    return parts


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What a top-k teacher cache stores: (log-probs at the temperature, ids), each [M, k]."""
    log_probs = full_log_probs(teacher_logits, temperature)
    values, ids = log_probs.topk(k, dim=-1)
    return values, ids


def perplexity(mean_nll: float) -> float:
    return math.exp(mean_nll)
