"""Pure pieces of the SFT controller and the optimizer schedule."""

import pytest

from engine.algorithms.supervised import StepSampler
from engine.config import OptimizerConfig
from engine.policy.optim import lr_multiplier


def test_step_sampler_is_a_pure_function_of_seed_and_step():
    a, b = StepSampler(10, 4, seed=1), StepSampler(10, 4, seed=1)
    assert [a.indices(s) for s in range(6)] == [b.indices(s) for s in range(6)]
    first_epoch = a.indices(0) + a.indices(1) + a.indices(2)[:2]
    assert sorted(first_epoch) == list(range(10))  # every example once per epoch
    assert StepSampler(10, 4, seed=2).indices(0) != a.indices(0)


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_multiplier(s, cfg, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, cfg, 20) == pytest.approx(1.0)
    assert lr_multiplier(12, cfg, 20) == pytest.approx(0.55)
    assert lr_multiplier(20, cfg, 20) == pytest.approx(0.1)
    linear = OptimizerConfig(warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert lr_multiplier(5, linear, 10) == pytest.approx(0.5)
    assert lr_multiplier(7, OptimizerConfig(warmup_steps=0, schedule="constant"), 10) == 1.0


def test_pairwise_loss_sums_token_logprobs_over_the_response_for_the_likelihood_head():
    import torch

    from engine.algorithms.losses import bradley_terry_loss
    from engine.algorithms.rm import pairwise_loss

    logprobs = torch.tensor([[-0.5, -1.0, -2.0], [-0.5, -3.0, -4.0], [-1.0, -0.1, -0.2], [-1.0, -0.3, -0.1]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    batch = {"loss_mask": mask, "index": torch.arange(4)}
    loss, metrics = pairwise_loss(logprobs, batch, {"units": 2.0})
    expected, _ = bradley_terry_loss(torch.tensor([-3.0, -0.1]), torch.tensor([-7.0, -0.3]), global_valid_seqs=2.0)
    assert torch.allclose(loss, expected)
    assert metrics == {"correct_pairs": 2.0, "pairs": 2.0}
