"""The global-normalization contract through real FSDP2 workers for every training loss: GRPO (token- and
sequence-level), DPO (with its SFT term) and the pairwise reward-model loss give the same loss, gradient norm and
metric sums on 1 rank, on 2 ranks, and on 2 ranks with many micro-batches each.

Each group trains with a learning rate of 1e-30, so every loss is measured at the same weights and one group per
layout serves them all."""

from __future__ import annotations

import pytest
import torch

from engine.algorithms.dpo import DPOLoss
from engine.algorithms.losses import GRPOLoss
from engine.algorithms.rm import pairwise_loss
from engine.config import DPOConfig, PolicyLossConfig
from engine.data.chat import TokenizedExample
from tests.integration.test_fsdp2 import make_policy

LAYOUTS = {"1 rank": (1, 100_000), "2 ranks": (2, 100_000), "2 ranks, many micro-batches": (2, 48)}


def with_rl_fields(base: list[TokenizedExample]) -> list[TokenizedExample]:
    """The examples with what the RL and preference losses read: generation logprobs, advantages, references."""
    g = torch.Generator().manual_seed(0)
    out = []
    for example in base:
        n = len(example)
        generation = (torch.rand(n, generator=g) * -2.0).tolist()
        scalars = {
            "advantage": float(torch.randn((), generator=g)),
            "reference_logprob_sum": float(torch.rand((), generator=g) * -20.0),
        }
        out.append(TokenizedExample(example.input_ids, example.loss_mask, {"generation_logprobs": generation}, scalars))
    return out


LOSSES = {  # name -> (loss function, examples per unit)
    "grpo token-level": (GRPOLoss(PolicyLossConfig()), 1),
    "grpo sequence-level": (GRPOLoss(PolicyLossConfig(token_level_loss=False)), 1),
    "dpo + sft term": (DPOLoss(DPOConfig(sft_weight=0.5)), 2),
    "pairwise reward model": (pairwise_loss, 2),
}


@pytest.fixture(scope="module")
def measured(ray_local, tiny_model_dir, examples):
    data, pad = examples
    data = with_rl_fields(data[:48])
    results: dict[str, dict[str, dict[str, float]]] = {}
    for layout, (world_size, budget) in LAYOUTS.items():
        policy = make_policy(tiny_model_dir, pad, world_size, budget, **{"sft.optimizer.lr": 1e-30})
        try:
            for name, (loss_fn, group_size) in LOSSES.items():
                results.setdefault(name, {})[layout] = policy.train(data, loss_fn, group_size)
        finally:
            policy.shutdown()
    return results


@pytest.mark.parametrize("loss", list(LOSSES))
def test_a_step_is_the_same_for_any_split(measured, loss):
    reference = measured[loss]["1 rank"]
    assert reference["loss"] != 0.0 and reference["grad_norm"] > 0.0
    for layout in ("2 ranks", "2 ranks, many micro-batches"):
        got = measured[loss][layout]
        assert got["loss"] == pytest.approx(reference["loss"], abs=1e-5), layout
        assert got["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5, abs=1e-6), layout
        for key in set(reference) - {"loss", "grad_norm", "lr"}:
            assert got[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-4), (layout, key)
