"""PPO's step without a cluster: the critic's values turn into GAE's per-token advantages and returns on the
examples both losses read, the critic trains before the policy (alone during its warm-up), and checkpoints hold it."""

from __future__ import annotations

from collections import Counter

import pytest

from engine.algorithms.grpo import GRPOLoop, GRPORoles, train_loop
from engine.algorithms.losses import GRPOLoss, ValueLoss
from engine.environments.math_verifier import MathVerifierEnv
from engine.storage import ArtifactStore
from tests.unit.algorithms.fakes import FakeGeneration, FakePolicy, InProcessRouter, RecordingRun
from tests.unit.algorithms.test_grpo_step import ROWS, even_samples_right, grpo_config

VALUE = 0.25
PPO = {"advantage_estimator": "gae", "critic": {"gamma": 1.0, "lam": 1.0}, "max_steps": 4}


def ppo_loop(tokenizer, **grpo) -> GRPOLoop:
    roles = GRPORoles(
        FakePolicy(),
        FakeGeneration(tokenizer, even_samples_right(tokenizer)),
        InProcessRouter({"math": MathVerifierEnv()}),
        critic=FakePolicy(forward_value=lambda example, position: VALUE),
    )
    return GRPOLoop(grpo_config(**{**PPO, **grpo}).grpo, 0, tokenizer, ROWS, ROWS[:4], roles)


def test_gae_advantages_and_returns_from_the_critics_values_reach_both_losses(tokenizer):
    loop = ppo_loop(tokenizer)
    metrics = loop.step(0)
    (critic_batch,), (policy_batch,) = loop.roles.critic.trained, loop.roles.policy.trained
    assert isinstance(loop.roles.critic.loss_fns[0], ValueLoss) and isinstance(loop.roles.policy.loss_fns[0], GRPOLoss)
    assert critic_batch == policy_batch and len(policy_batch) == 16
    for index, example in enumerate(policy_batch):
        reward = 1.0 if index % 2 == 0 else 0.0  # even samples answer right
        response = [m == 1 for m in example.loss_mask]
        assert "advantage" not in example.scalars
        # gamma = lam = 1: every response token's return is the episode's reward, its advantage reward - value
        want_advantage = [reward - VALUE if r else 0.0 for r in response]
        assert example.token_values["advantage"] == pytest.approx(want_advantage)
        assert example.token_values["returns"] == pytest.approx([reward if r else 0.0 for r in response])
        assert example.token_values["old_values"][1:] == pytest.approx([VALUE] * (len(example) - 1))
    assert metrics["critic/value_mean"] == pytest.approx(VALUE)
    assert metrics["critic/explained_variance"] == pytest.approx(0.0, abs=1e-6)  # a constant critic explains nothing
    assert metrics["critic/value_loss"] == 1.0 and "loss" in metrics


def test_the_policy_waits_out_the_critics_warm_up_and_generation_still_gets_every_refit(tokenizer):
    loop = ppo_loop(tokenizer, critic={"warmup_steps": 2})
    for step in range(3):
        loop.step(step)
    assert len(loop.roles.critic.trained) == 3 and len(loop.roles.policy.trained) == 1
    assert loop.roles.generation.versions == [1, 2, 3]


def test_a_checkpoint_holds_the_critic_and_a_resumed_run_loads_it(tokenizer, tmp_path):
    settings = {"checkpoint_every": 2, "val_every": 2}
    cfg = grpo_config(**PPO, **settings)
    store = ArtifactStore(f"file://{tmp_path}/store", tmp_path / "cache")
    train_loop(ppo_loop(tokenizer, **settings), store, RecordingRun(), cfg, "stages/grpo/k")
    committed = store.download("stages/grpo/k/checkpoints/step_000002")
    assert (committed / "critic" / "fake_shards.json").is_file() and (committed / "fake_shards.json").is_file()

    resumed = ppo_loop(tokenizer, **settings)
    train_loop(resumed, store, RecordingRun(), cfg, "stages/grpo/k")
    critic = resumed.roles.critic
    assert [source.under for source in critic.loaded] == ["critic"] and critic.steps_done == 4


def test_epochs_and_minibatches_update_on_whole_prompt_groups_from_a_forward_passs_old_logprobs(tokenizer):
    loop = ppo_loop(tokenizer, ppo_epochs=2, minibatches=2)
    metrics = loop.step(0)
    policy, critic = loop.roles.policy, loop.roles.critic
    assert len(policy.trained) == len(critic.trained) == 4  # 2 passes x 2 minibatches, the critic's alike
    first, second = policy.trained[0], policy.trained[1]
    assert len(first) == len(second) == 8  # two whole groups of 4 samples each
    for minibatch in (first, second):  # each prompt's 4 samples together
        prompts = Counter(tuple(t for t, m in zip(e.input_ids, e.loss_mask) if not m) for e in minibatch)
        assert sorted(prompts.values()) == [4, 4]
    assert policy.trained[2] == first and policy.trained[3] == second  # the second pass sees the same slices
    assert all(e.token_values["prev_logprobs"][1:] == [-0.5] * (len(e) - 1) for e in first + second)
    assert metrics["loss"] == pytest.approx((1 / 1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)  # the updates' mean


def test_one_update_a_step_needs_no_forward_pass_for_the_old_policy(tokenizer):
    loop = ppo_loop(tokenizer)
    loop.step(0)
    assert all("prev_logprobs" not in e.token_values for e in loop.roles.policy.trained[0])
