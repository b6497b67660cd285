"""Hand-computed checks of engine/algorithms/advantages.py."""

import math
import statistics

import pytest
import torch

from engine.algorithms.advantages import (
    gae_advantages,
    group_baseline,
    grpo_advantages,
    overlong_penalty,
    reinforce_pp_advantages,
    whiten,
)


def test_leave_one_out_baseline_and_std_mixed_group_sizes():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 3.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 2])
    baseline, std = group_baseline(rewards, groups)
    # group 0: others of sample 0 are [0, 0, 1]
    assert baseline[:4].tolist() == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1 / 3])
    assert std[0].item() == pytest.approx(statistics.stdev([0, 0, 1]))
    assert std[1].item() == pytest.approx(statistics.stdev([1, 0, 1]))
    # singleton groups: baseline = own reward, std 0
    assert baseline[4:].tolist() == [5.0, 3.0]
    assert std[4:].tolist() == [0.0, 0.0]


def test_masked_samples_are_excluded_from_others_statistics():
    rewards = torch.tensor([1.0, 0.0, 100.0, 1.0])
    groups = torch.tensor([7, 7, 7, 7])
    valid = torch.tensor([True, True, False, True])
    baseline, std = group_baseline(rewards, groups, valid)
    assert baseline.tolist() == pytest.approx([0.5, 1.0, 2 / 3, 0.5])
    assert std[2].item() == pytest.approx(statistics.stdev([1, 0, 1]))
    assert std[0].item() == pytest.approx(statistics.stdev([0, 1]))


def test_group_with_one_valid_sample():
    rewards = torch.tensor([4.0, 9.0, 2.0])
    baseline, std = group_baseline(rewards, torch.tensor([0, 0, 0]), torch.tensor([False, True, False]))
    assert baseline.tolist() == [9.0, 9.0, 9.0]
    assert std.tolist() == [0.0, 0.0, 0.0]


def test_two_valid_samples_leave_one_out_std_is_zero():
    baseline, std = group_baseline(torch.tensor([1.0, 0.0]), torch.tensor([3, 3]))
    assert baseline.tolist() == [0.0, 1.0]
    assert std.tolist() == [0.0, 0.0]


def test_plain_group_mean_without_leave_one_out():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    baseline, std = group_baseline(rewards, torch.zeros(4, dtype=torch.long), leave_one_out=False)
    assert baseline.tolist() == pytest.approx([0.5] * 4)
    assert std.tolist() == pytest.approx([statistics.stdev([1, 0, 0, 1])] * 4)


def test_grpo_advantages_normalize_only_where_std_positive():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1])
    adv = grpo_advantages(rewards, groups, eps=0.0)
    s0 = statistics.stdev([0, 0, 1])
    assert adv[0].item() == pytest.approx((1 - 1 / 3) / s0)
    assert adv[4].item() == 0.0
    raw = grpo_advantages(rewards, groups, normalize=False)
    assert raw[:4].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_identical_rewards_give_zero_advantage():
    adv = grpo_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long))
    assert adv.tolist() == [0.0] * 4


def test_advantages_finite_at_tiny_and_huge_magnitudes():
    for scale in (1e-30, 1e30):
        rewards = torch.tensor([1.0, 0.0, 2.0, 3.0]) * scale
        adv = grpo_advantages(rewards, torch.zeros(4, dtype=torch.long), eps=0.0)
        assert torch.isfinite(adv).all()
        assert adv[0].item() == pytest.approx((1 - 5 / 3) / statistics.stdev([0, 2, 3]), rel=1e-4)


def test_reinforce_pp_global_whitening():
    rewards = torch.tensor([1.0, 2.0, 3.0, 50.0])
    adv = reinforce_pp_advantages(rewards, valid=torch.tensor([True, True, True, False]), eps=0.0)
    assert adv[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0])


def test_overlong_penalty():
    # max 100, buffer 20, penalty 1: free up to 80, then -(len - 80)/20, and -1 beyond the limit
    out = overlong_penalty(torch.tensor([50, 80, 90, 100, 130]), max_length=100, buffer=20, penalty=1.0)
    assert out.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    assert math.isfinite(out.sum().item())


def test_gae_by_hand_with_the_reward_on_the_last_response_token():
    values = torch.tensor([[7.0, 0.5, 0.2, 0.1]])  # position 0 is the prompt: its value is never read
    mask = torch.tensor([[0, 1, 1, 1]])
    advantages, returns = gae_advantages(torch.tensor([1.0]), values, mask, gamma=1.0, lam=1.0)
    assert advantages.tolist()[0] == pytest.approx([0.0, 0.5, 0.8, 0.9])  # returns - values
    assert returns.tolist()[0] == pytest.approx([0.0, 1.0, 1.0, 1.0])  # gamma = lam = 1: every return is the reward
    advantages, _ = gae_advantages(torch.tensor([1.0]), values, mask, gamma=0.9, lam=0.5)
    # delta3 = 1 - 0.1; delta2 = 0.9 * 0.1 - 0.2; delta1 = 0.9 * 0.2 - 0.5; A_k = delta_k + 0.45 * A_{k+1}
    assert advantages.tolist()[0] == pytest.approx([0.0, -0.32 + 0.45 * (-0.11 + 0.45 * 0.9), -0.11 + 0.45 * 0.9, 0.9])


def test_gae_skips_observation_tokens_and_padding_between_and_after_turns():
    values = torch.tensor([[0.3, 0.4, 9.0, 9.0, 0.2, 9.0], [0.5, 9.0, 9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0]])  # row 0: two turns around a tool's reply
    advantages, returns = gae_advantages(torch.tensor([2.0, -1.0]), values, mask, gamma=0.5, lam=1.0)
    # row 0: A4 = 2 - 0.2 = 1.8; A1 = 0.5 * 0.2 - 0.4 + 0.5 * 1.8 = 0.6; A0 = 0.5 * 0.4 - 0.3 + 0.5 * 0.6 = 0.2
    assert advantages.tolist()[0] == pytest.approx([0.2, 0.6, 0.0, 0.0, 1.8, 0.0])
    assert advantages.tolist()[1] == pytest.approx([-1.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert returns.tolist()[1] == pytest.approx([-1.0, 0.0, 0.0, 0.0, 0.0, 0.0])


def test_whitening_over_the_masked_entries_only():
    values = torch.tensor([[1.0, 3.0, 100.0], [5.0, -100.0, -100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = whiten(values, mask, eps=0.0)
    assert out.tolist() == [pytest.approx([-1.0, 0.0, 0.0]), pytest.approx([1.0, 0.0, 0.0])]  # mean 3, std 2
