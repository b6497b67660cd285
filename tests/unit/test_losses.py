"""Hand-computed checks of every branch of engine/algorithms/losses.py."""

import math

import pytest
import torch

from engine.algorithms.losses import (
    PolicyLossConfig,
    bradley_terry_loss,
    clipped_pg_loss,
    clipped_value_loss,
    dpo_loss,
    kl_penalty,
    masked_mean,
    nll_loss,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- masked_mean / nll


def test_masked_mean_local_and_global_normalizer():
    values, mask = t([1.0, 2.0, 3.0]), t([1.0, 0.0, 1.0])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_mean(values, mask, global_normalizer=8).item() == pytest.approx(0.5)


def test_masked_mean_empty_mask_is_zero_not_nan():
    out = masked_mean(t([float("nan"), 1.0]), t([0.0, 0.0]))
    assert out.item() == 0.0
    assert masked_mean(t([1.0]), t([0.0]), global_normalizer=0).item() == 0.0


def test_masked_positions_never_leak_nan_or_inf():
    values = t([1.0, float("inf"), float("nan")])
    assert masked_mean(values, t([1.0, 0.0, 0.0])).item() == 1.0


def test_nll_loss_uses_global_count():
    lp = t([-1.0, -2.0], [-3.0, -4.0])
    mask = t([1, 1], [1, 0])
    assert nll_loss(lp, mask).item() == pytest.approx(6.0 / 3)
    assert nll_loss(lp, mask, global_valid_tokens=12).item() == pytest.approx(0.5)


# ---------------------------------------------------------------- KL


@pytest.mark.parametrize(
    "kind,expected",
    [("k1", -0.5), ("k2", 0.125), ("k3", math.exp(0.5) - 0.5 - 1)],
)
def test_kl_kinds(kind, expected):
    # d = ref - lp = -1.0 - (-1.5) = 0.5
    out = kl_penalty(t([-1.5]), t([-1.0]), kind=kind)
    assert out.item() == pytest.approx(expected)


def test_kl_input_clamp_cuts_gradient_and_value():
    lp = torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([30.0, 1.0], dtype=torch.float64)
    out = kl_penalty(lp, ref, kind="k2", input_clamp=20.0, output_clamp=None)
    assert out.tolist() == pytest.approx([200.0, 0.5])
    out.sum().backward()
    # clamped token: no gradient; unclamped: d(d^2/2)/dlp = -d = -1
    assert lp.grad.tolist() == pytest.approx([0.0, -1.0])


def test_kl_output_clamp_and_no_clamps():
    lp, ref = t([0.0]), t([5.0])
    assert kl_penalty(lp, ref, kind="k3", output_clamp=10.0).item() == pytest.approx(10.0)
    assert kl_penalty(lp, ref, kind="k3", output_clamp=None).item() == pytest.approx(math.exp(5) - 6)
    assert kl_penalty(lp, t([50.0]), kind="k1", input_clamp=None, output_clamp=None).item() == -50.0


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(t([0.0]), t([0.0]), kind="k4")


# ---------------------------------------------------------------- clipped PG


def pg(lp, prev, adv, mask, **cfg):
    return clipped_pg_loss(t(*lp), t(*prev), t(*adv), t(*mask), PolicyLossConfig(**cfg))


def test_pg_unclipped_is_minus_advantage_times_ratio():
    # ratio = exp(0.1) inside [0.8, 1.2]; loss = -(A * r) averaged over 2 valid tokens
    r = math.exp(0.1)
    loss, m = pg([[0.1, 0.1, 0.0]], [[0.0, 0.0, 0.0]], [[1.0, -2.0, 5.0]], [[1, 1, 0]])
    assert loss.item() == pytest.approx((-1 * r + 2 * r) / 2)
    assert m["clip_fraction"] == 0.0
    assert m["ratio_mean"] == pytest.approx(r)


def test_pg_clip_positive_and_negative_advantages():
    # r = e^0.5 = 1.6487 (> 1.2); r = e^-0.5 = 0.6065 (< 0.8)
    hi, lo = math.exp(0.5), math.exp(-0.5)
    loss, m = pg([[0.5, -0.5, 0.5, -0.5]], [[0, 0, 0, 0]], [[1.0, 1.0, -1.0, -1.0]], [[1, 1, 1, 1]])
    # A>0, r high: max(-r, -1.2) = -1.2 (clipped); A>0, r low: max(-0.6065, -0.8) = -0.6065
    # A<0, r high: max(r, 1.2) = r;                 A<0, r low: max(0.6065, 0.8) = 0.8 (clipped)
    expected = (-1.2 - lo + hi + 0.8) / 4
    assert loss.item() == pytest.approx(expected)
    assert m["clip_fraction"] == pytest.approx(0.5)
    assert m["ratio_min"] == pytest.approx(lo) and m["ratio_max"] == pytest.approx(hi)


def test_pg_asymmetric_clip_bounds():
    # clip-higher: ratio_clip_max 0.6 lets r = e^0.4 = 1.49 through for A > 0
    r = math.exp(0.4)
    loss, _ = pg([[0.4]], [[0.0]], [[1.0]], [[1]], ratio_clip_min=0.2, ratio_clip_max=0.6)
    assert loss.item() == pytest.approx(-r)
    loss, _ = pg([[0.4]], [[0.0]], [[1.0]], [[1]], ratio_clip_min=0.2, ratio_clip_max=0.2)
    assert loss.item() == pytest.approx(-1.2)


def test_pg_dual_clip_bounds_negative_advantage():
    # A = -1, r = e^2 = 7.39: plain PPO loss = 7.39; dual clip c=3 caps it at 3
    loss, m = pg([[2.0]], [[0.0]], [[-1.0]], [[1]], ratio_clip_c=3.0)
    assert loss.item() == pytest.approx(3.0)
    assert m["clip_fraction"] == 1.0
    loss, _ = pg([[2.0]], [[0.0]], [[-1.0]], [[1]])
    assert loss.item() == pytest.approx(math.exp(2.0))
    # positive advantages are untouched by dual clip
    loss, _ = pg([[2.0]], [[0.0]], [[1.0]], [[1]], ratio_clip_c=3.0)
    assert loss.item() == pytest.approx(-1.2)


def test_pg_dual_clip_must_exceed_one():
    with pytest.raises(ValueError):
        PolicyLossConfig(ratio_clip_c=0.9)


def test_pg_reinforce_ignores_ratio():
    loss, m = pg([[-0.5, -2.0]], [[9.0, 9.0]], [[2.0, -1.0]], [[1, 1]], disable_ppo_ratio=True)
    # -A * lp = [1.0, -2.0] -> mean -0.5
    assert loss.item() == pytest.approx(-0.5)
    assert m["clip_fraction"] == 0.0


def test_pg_force_on_policy_ratio_is_one_with_gradient_of_logprob():
    lp = torch.tensor([[-0.7, -1.3]], dtype=torch.float64, requires_grad=True)
    cfg = PolicyLossConfig(force_on_policy_ratio=True)
    loss, m = clipped_pg_loss(lp, t([5.0, 5.0]), t([2.0, 1.0]), t([1, 1]), cfg)
    assert loss.item() == pytest.approx(-(2.0 + 1.0) / 2)
    assert m["ratio_mean"] == pytest.approx(1.0)
    loss.backward()
    assert lp.grad[0].tolist() == pytest.approx([-1.0, -0.5])


def test_pg_sequence_level_ratio_gspo():
    # seq 0: log-ratios 0.1 and 0.3 -> mean 0.2 -> r = e^0.2 = 1.2214 > 1.2, A = 1 -> clipped to -1.2
    # seq 1: log-ratios 0.0 (masked 9.0 ignored) -> r = 1, A = -1 -> loss 1
    loss, m = pg(
        [[0.1, 0.3], [0.0, 9.0]],
        [[0.0, 0.0], [0.0, 0.0]],
        [[1.0, 1.0], [-1.0, -1.0]],
        [[1, 1], [1, 0]],
        sequence_level_ratio=True,
    )
    assert loss.item() == pytest.approx((-1.2 * 2 + 1.0) / 3)
    assert m["ratio_max"] == pytest.approx(math.exp(0.2))


def test_pg_tis_truncates_weights():
    # w = exp(prev - gen): e^1 = 2.718 -> truncated to 2.0; e^-1 = 0.368 kept
    cfg = PolicyLossConfig(importance_sampling="tis", is_max=2.0)
    loss, m = clipped_pg_loss(
        t([0.0, 0.0]), t([0.0, 0.0]), t([1.0, 1.0]), t([1, 1]), cfg, generation_logprobs=t([-1.0, 1.0])
    )
    assert loss.item() == pytest.approx(-(2.0 + math.exp(-1)) / 2)
    assert m["is_oob_fraction"] == pytest.approx(0.5)
    assert m["is_weight_mean"] == pytest.approx((2.0 + math.exp(-1)) / 2)


def test_pg_tis_lower_bound():
    cfg = PolicyLossConfig(importance_sampling="tis", is_max=2.0, is_min=0.5)
    loss, _ = clipped_pg_loss(t([0.0]), t([0.0]), t([1.0]), t([1]), cfg, generation_logprobs=t([1.0]))
    assert loss.item() == pytest.approx(-0.5)


def test_pg_icepop_zeroes_out_of_band_tokens():
    cfg = PolicyLossConfig(importance_sampling="icepop", is_min=0.5, is_max=2.0)
    # weights e^1 (out), e^-1 = 0.37 (out), e^0.2 = 1.22 (in)
    loss, m = clipped_pg_loss(
        t([0.0, 0.0, 0.0]),
        t([0.0, 0.0, 0.0]),
        t([1.0, 1.0, 1.0]),
        t([1, 1, 1]),
        cfg,
        generation_logprobs=t([-1.0, 1.0, -0.2]),
    )
    assert loss.item() == pytest.approx(-math.exp(0.2) / 3)
    assert m["is_oob_fraction"] == pytest.approx(2 / 3)


def test_pg_tis_needs_is_max_and_generation_logprobs():
    with pytest.raises(ValueError, match="is_max"):
        PolicyLossConfig(importance_sampling="tis")
    cfg = PolicyLossConfig(importance_sampling="icepop", is_min=0.5, is_max=2.0)
    with pytest.raises(ValueError, match="generation_logprobs"):
        clipped_pg_loss(t([0.0]), t([0.0]), t([1.0]), t([1]), cfg)


def test_pg_kl_term_added_per_token():
    # A = 0 so only the KL term remains: beta * k3(d = ref - lp = 0.5)
    cfg = PolicyLossConfig(kl_beta=0.1)
    loss, m = clipped_pg_loss(t([-1.5]), t([-1.5]), t([0.0]), t([1]), cfg, reference_logprobs=t([-1.0]))
    k3 = math.exp(0.5) - 0.5 - 1
    assert loss.item() == pytest.approx(0.1 * k3)
    assert m["kl"] == pytest.approx(k3)
    with pytest.raises(ValueError, match="reference_logprobs"):
        clipped_pg_loss(t([-1.5]), t([-1.5]), t([0.0]), t([1]), cfg)


def test_pg_sequence_level_loss_means_per_sequence_first():
    # per-token losses with r = 1: -A. seq 0 tokens [-1, -3] -> mean -2; seq 1 one token [-4] -> -4
    loss, _ = pg(
        [[0, 0], [0, 0]],
        [[0, 0], [0, 0]],
        [[1.0, 3.0], [4.0, 99.0]],
        [[1, 1], [1, 0]],
        token_level_loss=False,
        ratio_clip_max=10.0,
    )
    assert loss.item() == pytest.approx((-2 - 4) / 2)
    cfg = PolicyLossConfig(token_level_loss=False, ratio_clip_max=10.0)
    loss, _ = clipped_pg_loss(
        t([0, 0], [0, 0]), t([0, 0], [0, 0]), t([1.0, 3.0], [4.0, 99.0]), t([1, 1], [1, 0]), cfg, global_valid_seqs=6
    )
    assert loss.item() == pytest.approx((-2 - 4) / 6)


def test_pg_all_zero_mask_gives_exact_zero():
    for cfg in [{}, {"token_level_loss": False}, {"sequence_level_ratio": True}]:
        loss, m = pg([[float("nan"), 1.0]], [[0.0, 0.0]], [[1.0, 1.0]], [[0, 0]], **cfg)
        assert loss.item() == 0.0
        assert m["valid_tokens"] == 0.0


def test_pg_per_sequence_advantages_broadcast():
    loss_seq, _ = clipped_pg_loss(t([0.0, 0.0]), t([0.0, 0.0]), t(2.0), t([1, 1]), PolicyLossConfig())
    assert loss_seq.item() == pytest.approx(-2.0)


def test_pg_approx_entropy_metric():
    _, m = pg([[-1.0, -3.0]], [[-1.0, -3.0]], [[0.0, 0.0]], [[1, 1]])
    assert m["approx_entropy"] == pytest.approx(2.0)


def test_pg_tiny_and_huge_magnitudes_stay_finite():
    for scale in (1e-30, 1e30):
        loss, m = pg([[0.0, -1e-8]], [[0.0, 0.0]], [[scale, -scale]], [[1, 1]])
        assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in m.values())
    loss, _ = pg([[-80.0]], [[0.0]], [[1.0]], [[1]])  # ratio underflows toward 0
    assert math.isfinite(loss.item())


# ---------------------------------------------------------------- DPO / Bradley-Terry


def test_dpo_sigmoid_with_and_without_label_smoothing():
    # m = 0.1 * ((-1 - -2) - (-3 - -2.5)) = 0.1 * (1 + 0.5) = 0.15
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.5))
    m = 0.15
    loss, metrics = dpo_loss(*args, beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-m)))
    assert metrics["accuracy"] == 1.0
    assert metrics["reward_margin"] == pytest.approx(m)
    assert metrics["chosen_reward"] == pytest.approx(0.1) and metrics["rejected_reward"] == pytest.approx(-0.05)
    loss, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(0.8 * math.log1p(math.exp(-m)) + 0.2 * math.log1p(math.exp(m)))


def test_dpo_ipo_and_hinge():
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.5))
    loss, _ = dpo_loss(*args, beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx((0.15 / 0.1 - 1 / 0.2) ** 2)
    loss, _ = dpo_loss(*args, beta=0.1, loss_type="hinge")
    assert loss.item() == pytest.approx(1 - 0.15)
    loss, _ = dpo_loss(*args, beta=20.0, loss_type="hinge")  # m = 30 -> relu(1 - 30) = 0
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*args, loss_type="nope")


def test_dpo_accuracy_counts_pairs_and_global_normalizer():
    chosen, rejected = t(0.0, 0.0), t(-1.0, 1.0)
    zeros = t(0.0, 0.0)
    loss, m = dpo_loss(chosen, rejected, zeros, zeros, beta=1.0)
    assert m["accuracy"] == 0.5
    per_pair = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0))]
    assert loss.item() == pytest.approx(sum(per_pair) / 2)
    loss, _ = dpo_loss(chosen, rejected, zeros, zeros, beta=1.0, global_valid_seqs=4)
    assert loss.item() == pytest.approx(sum(per_pair) / 4)


def test_bradley_terry_with_margin():
    loss, m = bradley_terry_loss(t(2.0, 0.0), t(1.0, 1.0))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2)
    assert m["accuracy"] == 0.5
    loss, _ = bradley_terry_loss(t(2.0), t(1.0), margin=t(1.0))
    assert loss.item() == pytest.approx(math.log(2))


def test_preference_losses_stay_finite_at_huge_margins():
    loss, _ = dpo_loss(t(1e6), t(-1e6), t(0.0), t(0.0))
    assert math.isfinite(loss.item())
    loss, _ = bradley_terry_loss(t(-1e30), t(1e30))
    assert math.isfinite(loss.item())


def test_logprob_agreement_metric():
    from engine.algorithms.metrics import logprob_agreement

    out = logprob_agreement(t([-1.0, -2.0, -3.0]), t([-1.0, -2.5, 50.0]), t([1, 1, 0]))
    assert out["token_mult_prob_error"] == pytest.approx((1 + math.exp(0.5)) / 2)
    assert out["logprob_max_abs_diff"] == pytest.approx(0.5)
    assert logprob_agreement(t([0.0]), t([9.0]), t([0]))["token_mult_prob_error"] == 1.0


def test_the_clipped_value_loss_by_hand():
    values, old = torch.tensor([[1.0, 0.5, 42.0]]), torch.tensor([[0.8, 0.8, 0.0]])
    returns, mask = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    # token 0: (1 - 0)^2 = 1 beats the clipped (0.9 - 0)^2; token 1: (0.5 - 1)^2 = 0.25 beats (0.7 - 1)^2
    loss, metrics = clipped_value_loss(values, old, returns, mask, clip=0.1)
    assert float(loss) == pytest.approx((0.5 * 1.0 + 0.5 * 0.25) / 2)
    # a value moved past the clip toward the return keeps the clipped (larger) error: no reward for the jump
    loss, _ = clipped_value_loss(
        torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.ones(1, 1), 0.1
    )
    assert float(loss) == pytest.approx(0.5 * 0.9**2)
    unclipped, _ = clipped_value_loss(values, old, returns, mask, clip=None, global_valid_tokens=4)
    assert float(unclipped) == pytest.approx((0.5 * 1.0 + 0.5 * 0.25) / 4)
    assert metrics["value_mean"] == pytest.approx(0.75) and metrics["valid_tokens"] == 2.0
