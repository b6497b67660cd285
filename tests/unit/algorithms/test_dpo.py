"""DPO's loss on a hand-computed two-pair batch, and its cached reference logprobs keyed by what they depend on."""

from __future__ import annotations

import math

import pytest
import torch

from engine.algorithms.dpo import DPOLoss, reference_logprobs
from engine.config import DPOConfig
from engine.data.chat import TokenizedExample
from engine.storage import ArtifactStore
from tests.unit.algorithms.fakes import FakePolicy


def test_dpo_loss_pairs_rows_and_normalizes_its_sft_term_by_the_chosen_tokens():
    # rows: [chosen 0, rejected 0, chosen 1, rejected 1]; positions of the collated [B, L-1] layout
    logprobs = torch.tensor(
        [[-1.0, -2.0, -9.0], [-1.5, -1.0, -0.5], [-9.0, -9.0, -0.5], [-2.0, -9.0, -9.0]], requires_grad=True
    )
    batch = {
        "loss_mask": torch.tensor([[1.0, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 0]]),
        "reference_logprob_sum": torch.tensor([-3.5, -2.5, -0.7, -1.5]),
        "index": torch.arange(4),
    }
    normalizers = {"units": 2.0, "tokens": 7.0, "leading_tokens": 3.0}
    loss, metrics = DPOLoss(DPOConfig(beta=0.1, sft_weight=0.5))(logprobs, batch, normalizers)
    # summed logprobs: chosen -3.0 and -0.5, rejected -3.0 and -2.0
    margins = [0.1 * ((-3.0 + 3.5) - (-3.0 + 2.5)), 0.1 * ((-0.5 + 0.7) - (-2.0 + 1.5))]  # 0.1, 0.07
    dpo = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 2
    sft = (3.0 + 0.5) / 3  # the chosen rows' NLL over the step's 3 chosen target tokens (not all 7 / 2)
    assert loss.item() == pytest.approx(dpo + 0.5 * sft, abs=1e-6)
    assert metrics == pytest.approx({"correct_pairs": 2.0, "pairs": 2.0, "margin_sum": sum(margins)})
    loss.backward()
    assert float(logprobs.grad[0, 0]) < 0 < float(logprobs.grad[1, 2])  # descent: chosen up, rejected down
    assert float(logprobs.grad[0, 2]) == 0.0  # masked positions get no gradient

    order = [1, 0, 3, 2]  # each pair's rejected response first: the margins change sign
    swapped = {
        **batch,
        "loss_mask": batch["loss_mask"][order],
        "reference_logprob_sum": batch["reference_logprob_sum"][order],
    }
    _, metrics = DPOLoss(DPOConfig(beta=0.1))(logprobs.detach()[order], swapped, normalizers)
    assert metrics["correct_pairs"] == 0.0 and metrics["margin_sum"] == pytest.approx(-sum(margins))


def pairs(max_len: int) -> list[TokenizedExample]:
    return [TokenizedExample(list(range(1, 9 + i))[:max_len], ([0] + [1] * (7 + i))[:max_len]) for i in range(4)]


def test_reference_logprobs_are_cached_by_model_examples_and_numerics(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/store", tmp_path / "cache")
    policy = FakePolicy(forward_value=lambda example, position: -0.25)
    calls = []
    forward = policy.forward
    policy.forward = lambda examples: (calls.append(len(examples)), forward(examples))[1]
    fp32 = {"precision": "fp32", "backend": "fsdp2"}

    first = reference_logprobs(store, policy, pairs(64), "model-a", fp32)
    assert first == [-0.25 * (7 + i) for i in range(4)] and calls == [4]
    assert reference_logprobs(store, policy, pairs(64), "model-a", fp32) == first and calls == [4]  # cached
    assert reference_logprobs(store, policy, pairs(8), "model-a", fp32) != first and calls == [4, 4]  # truncated
    reference_logprobs(store, policy, pairs(64), "model-b", fp32)
    reference_logprobs(store, policy, pairs(64), "model-a", {**fp32, "precision": "bf16"})
    assert calls == [4, 4, 4, 4]
    assert reference_logprobs(store, policy, pairs(64)[:2], "model-a", fp32) == first[:2] and len(calls) == 5
