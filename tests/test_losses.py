"""Distillation losses on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from recover_lora.errors import RecoverLoraError
from recover_lora.recovery.losses import (
    LossConfig,
    cross_entropy_loss,
    kl_from_log_probs,
    kl_loss,
    next_token_rows,
    teacher_topk,
    topk_bucket_log_probs,
    topk_kl_loss,
)


def kl_by_hand(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_identical_logits_give_zero_kl():
    logits = torch.tensor([[1.0, 2.0, -3.0, 0.5]])
    for kind in ("forward", "reverse", "mix"):
        assert kl_loss(logits, logits.clone(), LossConfig(kind=kind)).item() == pytest.approx(0.0, abs=1e-7)


def test_forward_and_reverse_kl_match_hand_computation():
    p, q = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]
    teacher, student = torch.tensor([p]).log(), torch.tensor([q]).log()
    assert kl_loss(teacher, student, LossConfig("forward")).item() == pytest.approx(kl_by_hand(p, q), rel=1e-6)
    assert kl_loss(teacher, student, LossConfig("reverse")).item() == pytest.approx(kl_by_hand(q, p), rel=1e-6)
    mixed = kl_loss(teacher, student, LossConfig("mix", mix_weight=0.25)).item()
    assert mixed == pytest.approx(0.75 * kl_by_hand(p, q) + 0.25 * kl_by_hand(q, p), rel=1e-6)


def test_forward_kl_is_asymmetric():
    p, q = [0.9, 0.05, 0.05], [0.4, 0.3, 0.3]
    teacher, student = torch.tensor([p]).log(), torch.tensor([q]).log()
    forward = kl_loss(teacher, student, LossConfig("forward")).item()
    reverse = kl_loss(teacher, student, LossConfig("reverse")).item()
    assert forward != pytest.approx(reverse, rel=1e-3)


def test_temperature_softens_both_sides_and_scales_by_t_squared():
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    student = torch.tensor([[0.0, 1.0, 0.0]])
    t = 2.0
    p = torch.softmax(teacher / t, -1)[0].tolist()
    q = torch.softmax(student / t, -1)[0].tolist()
    expected = kl_by_hand(p, q) * t * t
    assert kl_loss(teacher, student, LossConfig(temperature=t)).item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_mean_over_rows():
    teacher = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    student = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    p = torch.softmax(teacher[1], -1).tolist()
    q = torch.softmax(student[1], -1).tolist()
    assert kl_loss(teacher, student, LossConfig()).item() == pytest.approx(kl_by_hand(p, q) / 2, rel=1e-6)


def test_zero_probability_terms_do_not_make_nan():
    p_log = torch.tensor([[0.0, float("-inf")]])  # p = [1, 0]
    q_log = torch.tensor([[math.log(0.5), math.log(0.5)]])
    assert kl_from_log_probs(p_log, q_log).item() == pytest.approx(math.log(2), rel=1e-6)


def test_topk_buckets_keep_the_rest_of_the_mass():
    log_probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    buckets = topk_bucket_log_probs(log_probs[:, :2]).exp()
    assert buckets[0].tolist() == pytest.approx([0.5, 0.3, 0.2], rel=1e-5)


def test_topk_kl_with_full_vocabulary_equals_full_kl():
    torch.manual_seed(0)
    teacher, student = torch.randn(5, 7), torch.randn(5, 7)
    config = LossConfig(temperature=1.5)
    values, ids = teacher_topk(teacher, 7, config.temperature)
    full = kl_loss(teacher, student, config).item()
    # k = V: the rest bucket is empty (probability ~0), so the bucketed KL is the full KL.
    assert topk_kl_loss(values, ids, student, config).item() == pytest.approx(full, rel=1e-4)


def test_topk_kl_matches_hand_computed_coarse_kl():
    p = [0.6, 0.2, 0.1, 0.1]
    q = [0.3, 0.3, 0.2, 0.2]
    teacher, student = torch.tensor([p]).log(), torch.tensor([q]).log()
    values, ids = teacher_topk(teacher, 2, 1.0)
    # buckets: token 0, token 1, rest
    expected = kl_by_hand([0.6, 0.2, 0.2], [0.3, 0.3, 0.4])
    assert topk_kl_loss(values, ids, student, LossConfig()).item() == pytest.approx(expected, rel=1e-5)


def test_topk_kl_reverse_uses_the_same_buckets():
    p, q = [0.6, 0.2, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]
    teacher, student = torch.tensor([p]).log(), torch.tensor([q]).log()
    values, ids = teacher_topk(teacher, 2, 1.0)
    expected = kl_by_hand([0.3, 0.3, 0.4], [0.6, 0.2, 0.2])
    assert topk_kl_loss(values, ids, student, LossConfig("reverse")).item() == pytest.approx(expected, rel=1e-5)


def test_kl_gradient_flows_to_student_only():
    teacher = torch.tensor([[1.0, 0.0, 0.0]])
    student = torch.zeros(1, 3, requires_grad=True)
    kl_loss(teacher, student, LossConfig()).backward()
    # d KL(p||softmax(s)) / ds = softmax(s) - p
    expected = torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)
    assert torch.allclose(student.grad, expected, atol=1e-6)


def test_next_token_rows_drop_the_last_position():
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[False, True, True, True]])
    rows, targets = next_token_rows(ids, mask)
    assert rows.tolist() == [[False, True, True, False]]
    assert targets.tolist() == [7, 8]


def test_cross_entropy_matches_hand_value():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = [0.25, 0.75]
    assert cross_entropy_loss(logits, torch.tensor([1])).item() == pytest.approx(-math.log(0.75), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [dict(kind="sideways"), dict(temperature=0.0), dict(mix_weight=1.5), dict(kl_weight=0.0, ce_weight=0.0), dict(ce_weight=-1.0)],
)
def test_bad_loss_settings_are_refused(kwargs):
    with pytest.raises(RecoverLoraError):
        LossConfig(**kwargs)
