"""The GRPO controller's step without a cluster: rollouts, rewards, group advantages, dynamic sampling, the KL
reference's alignment, metrics, refits, and resume, driven with in-process fakes of the worker groups."""

from __future__ import annotations

import re

import pytest
import torch

from engine.algorithms.grpo import GRPOLoop, GRPORoles, train_loop
from engine.config import load_config
from engine.data.batching import collate
from engine.data.chat import tokenize_prompt
from engine.environments.math_verifier import MathVerifierEnv
from engine.storage import ArtifactStore
from tests.unit.algorithms.fakes import FakeGeneration, FakePolicy, InProcessRouter, RecordingRun

PROMPTS, SAMPLES = 4, 4
ROWS = [{"prompt": [{"role": "user", "content": f"What is {a}+{a}?"}], "answer": str(2 * a)} for a in range(10, 30)]


def true_answer(tokenizer, prompt_ids: list[int]) -> int:
    a = int(re.search(r"What is (\d+)\+", tokenizer.decode(prompt_ids)).group(1))
    return 2 * a


def even_samples_right(tokenizer):
    """Samples 0 and 2 of every prompt answer right, 1 and 3 wrong: rewards [1, 0, 1, 0] in every group."""

    def reply(prompt, sample, call):
        answer = true_answer(tokenizer, prompt)
        return (str(answer) if sample % 2 == 0 else str(answer + 1)), "stop"

    return reply


def grpo_config(**grpo):
    overrides = {"grpo.prompts_per_step": PROMPTS, "grpo.generations_per_prompt": SAMPLES, "grpo.max_new_tokens": 6}
    overrides.update({f"grpo.{key}": value for key, value in grpo.items()})
    return load_config(None, overrides)


def make_loop(tokenizer, script, policy=None, reference=None, reward_model=None, **grpo) -> GRPOLoop:
    roles = GRPORoles(
        policy or FakePolicy(),
        FakeGeneration(tokenizer, script),
        InProcessRouter({"math": MathVerifierEnv()}),
        reference,
        reward_model,
    )
    return GRPOLoop(grpo_config(**grpo).grpo, 0, tokenizer, ROWS, ROWS[:4], roles)


def test_a_step_scores_each_group_and_trains_on_the_generated_tokens(tokenizer):
    loop = make_loop(tokenizer, even_samples_right(tokenizer))
    metrics = loop.step(3)

    ((prompts, params),) = loop.roles.generation.calls
    rows = [ROWS[i] for i in loop.sampler.indices(3)]  # the step's prompts: a pure function of seed and step
    expected_prompts = [tokenize_prompt(tokenizer, r["prompt"]) for r in rows for _ in range(SAMPLES)]
    assert prompts == expected_prompts and params.n == 1 and params.max_tokens == 6

    (examples,) = loop.roles.policy.trained
    assert len(examples) == PROMPTS * SAMPLES
    for index, example in enumerate(examples):
        prompt, sample = expected_prompts[index], index % SAMPLES
        completion = example.input_ids[len(prompt) :]
        assert example.input_ids[: len(prompt)] == prompt
        assert completion[-1] == tokenizer.eos_token_id  # the stop token is a trained target
        assert example.loss_mask == [0] * len(prompt) + [1] * len(completion)
        logprobs = example.token_values["generation_logprobs"]
        assert logprobs[: len(prompt)] == [0.0] * len(prompt) and all(lp < 0 for lp in logprobs[len(prompt) :])
        # leave-one-out: a right answer among [1, 0, 1, 0] beats the mean of the others (1/3) by 2/3
        assert example.scalars["advantage"] == pytest.approx(2 / 3 if sample % 2 == 0 else -2 / 3)

    assert metrics["reward/mean"] == 0.5 and metrics["accuracy"] == 0.5 and metrics["kept_samples"] == 16
    assert metrics["reward/std"] == pytest.approx(torch.tensor([1.0, 0.0] * 8).std().item())
    assert metrics["token_mult_prob_error"] == 1.0 and metrics["turns"] == 1.0
    assert loop.roles.generation.versions == [4]  # the generator gets the weights of step 4


def test_normalized_advantages_divide_by_the_leave_one_out_std(tokenizer):
    loop = make_loop(tokenizer, even_samples_right(tokenizer), normalize_advantages=True)
    loop.step(0)
    std_of_others = torch.tensor([0.0, 1.0, 0.0]).std().item()  # a right answer's others: [0, 1, 0]
    advantages = [e.scalars["advantage"] for e in loop.roles.policy.trained[0]]
    assert advantages[0] == pytest.approx((2 / 3) / (std_of_others + 1e-6))
    assert advantages[1] == pytest.approx(-(2 / 3) / (std_of_others + 1e-6))


def test_dynamic_sampling_drops_groups_without_spread_and_still_refits(tokenizer):
    all_right = make_loop(tokenizer, lambda p, s, c: (str(true_answer(tokenizer, p)), "stop"), dynamic_sampling=True)
    metrics = all_right.step(0)
    assert all_right.roles.policy.trained == []  # every group has equal rewards: nothing to learn, no step
    assert all_right.roles.generation.versions == [1]  # the refit still runs: versions stay in step with steps
    assert metrics["kept_samples"] == 0 and metrics["loss"] == 0.0 and metrics["reward/mean"] == 1.0

    def first_group_right(prompt, row, call):
        answer = true_answer(tokenizer, prompt)
        first_group, first_sample = row < SAMPLES, row % SAMPLES == 0
        return (str(answer) if first_group or first_sample else "0"), "stop"

    mixed = make_loop(tokenizer, first_group_right, dynamic_sampling=True)
    mixed.step(0)
    (examples,) = mixed.roles.policy.trained
    assert len(examples) == 3 * SAMPLES  # the all-right group is dropped, the three mixed ones are kept
    assert sorted(e.scalars["advantage"] for e in examples)[-1] == pytest.approx(1.0)


def test_reference_logprobs_line_up_with_the_generated_tokens(tokenizer):
    """The KL reference's logprobs, the generator's and the loss mask describe the same tokens after collate."""

    def reference_value(example, position):
        return -1.0 - position / 1000  # tells every position apart

    reference = FakePolicy(forward_value=reference_value)
    loop = make_loop(tokenizer, even_samples_right(tokenizer), reference=reference, **{"loss.kl_beta": 0.1})
    loop.step(0)
    (examples,) = loop.roles.policy.trained
    batch = collate(examples, tokenizer.pad_token_id)
    for row, example in enumerate(examples):
        for t in range(len(example) - 1):  # batch position t scores token t + 1
            assert batch["loss_mask"][row, t] == example.loss_mask[t + 1]
            assert batch["reference_logprobs"][row, t] == pytest.approx(reference_value(example, t + 1))
            assert batch["generation_logprobs"][row, t] == pytest.approx(
                example.token_values["generation_logprobs"][t + 1]
            )
    # a trainer that equals the reference has zero KL; the loss sees the generator's logprobs as the trainer's
    loss_fn = loop.roles.policy.loss_fns[0]
    _, sums = loss_fn(batch["reference_logprobs"].clone(), batch, {"tokens": 1.0, "sequences": 1.0})
    assert sums["kl_sum"] == pytest.approx(0.0, abs=1e-6)
    _, sums = loss_fn(batch["generation_logprobs"].clone(), batch, {"tokens": 1.0, "sequences": 1.0})
    assert sums["token_mult_prob_error_sum"] == pytest.approx(sums["valid_tokens"])


class FixedRewardModel:
    def __init__(self, value: float):
        self.value, self.seen = value, []

    def rewards(self, prompts, completions):
        self.seen.append((prompts, completions))
        return [self.value] * len(prompts)

    def shutdown(self):
        pass


def test_rewards_add_the_weighted_verifier_and_reward_model(tokenizer):
    scorer = FixedRewardModel(0.25)
    loop = make_loop(
        tokenizer, even_samples_right(tokenizer), reward_model=scorer, verifier_weight=2.0, reward_model_weight=4.0
    )
    metrics = loop.step(0)
    assert metrics["reward/mean"] == pytest.approx(0.5 * 2.0 + 0.25 * 4.0)
    assert metrics["reward/environment"] == 0.5 and metrics["reward/reward_model"] == 0.25
    ((prompts, completions),) = scorer.seen
    assert prompts[0] == ROWS[loop.sampler.indices(0)[0]]["prompt"] and len(prompts) == PROMPTS * SAMPLES
    assert completions[0][-1]["role"] == "assistant"


def sampled_prompts(loop: GRPOLoop) -> list[list[list[int]]]:
    """The prompts of each sampling call (validation decodes greedily)."""
    return [prompts for prompts, params in loop.roles.generation.calls if params.temperature > 0]


def test_training_loop_validates_checkpoints_and_resumes_exactly(tokenizer, tmp_path):
    settings = {"max_steps": 4, "checkpoint_every": 2, "val_every": 2}
    cfg = grpo_config(**settings)
    store = ArtifactStore(f"file://{tmp_path}/store", tmp_path / "cache")
    first, first_run = make_loop(tokenizer, even_samples_right(tokenizer), **settings), RecordingRun()
    finished = train_loop(first, store, first_run, cfg, "stages/grpo/k")
    assert finished.step == 4 and [v["step"] for v in finished.val_history] == [0, 2, 4]
    assert store.list("stages/grpo/k/checkpoints") == ["stages/grpo/k/checkpoints/step_000002"]
    assert sorted(first_run.metrics) == [0, 1, 2, 3, 4] and "val/accuracy" in first_run.metrics[2]
    assert first.roles.generation.versions == [1, 2, 3, 4]

    resumed, resumed_run = make_loop(tokenizer, even_samples_right(tokenizer), **settings), RecordingRun()
    state = train_loop(resumed, store, resumed_run, cfg, "stages/grpo/k")
    assert len(resumed.roles.policy.loaded) == 1 and resumed.roles.policy.steps_done == 4  # 2 restored + 2 trained
    assert resumed_run.tags["posttrain.resumed_from_step"] == "2" and sorted(resumed_run.metrics) == [3, 4]
    assert resumed.roles.generation.versions == [2, 3, 4]  # the generator gets the checkpoint's weights first
    assert len(resumed.roles.policy.trained) == 2
    assert sampled_prompts(resumed) == sampled_prompts(first)[2:]  # steps 3 and 4 sample the same prompts again
    assert state.val_history == finished.val_history and state.history[:2] == finished.history[:2]
    assert [h["reward/mean"] for h in state.history] == [h["reward/mean"] for h in finished.history]


def test_advantage_estimators_and_the_overlong_penalty(tokenizer):
    group_mean = make_loop(tokenizer, even_samples_right(tokenizer), advantage_estimator="grpo")
    group_mean.step(0)
    assert [e.scalars["advantage"] for e in group_mean.roles.policy.trained[0][:4]] == [0.5, -0.5, 0.5, -0.5]
    whitened = make_loop(tokenizer, even_samples_right(tokenizer), advantage_estimator="reinforce_pp")
    whitened.step(0)
    batch_std = torch.tensor([1.0, 0.0] * 8).std().item()
    assert whitened.roles.policy.trained[0][0].scalars["advantage"] == pytest.approx(0.5 / (batch_std + 1e-6))

    def long_or_short(prompt, row, call):  # right answers, one in each pair padded to the length limit
        answer = str(true_answer(tokenizer, prompt))
        return (answer if row % 2 == 0 else answer + " " * 40), "stop"

    penalized = make_loop(tokenizer, long_or_short, overlong_penalty={"buffer": 3, "penalty": 1.0})
    metrics = penalized.step(0)
    assert metrics["reward/environment"] == 1.0 and metrics["reward/overlong_penalty"] == pytest.approx(-0.5)
    advantages = [e.scalars["advantage"] for e in penalized.roles.policy.trained[0][:2]]
    assert advantages[0] > 0 > advantages[1]  # the padded answer scores below the short one


class FailingFunctions:
    """A reward-functions handle whose function fails on one prompt's completions."""

    def __init__(self, bad_answer: str):
        self.bad_answer, self.weights = bad_answer, {"bonus": 1.0}

    def score(self, prompts, completions, columns, row_ids):
        from engine.environments.reward_functions import Scores

        bad = [c[-1]["content"].startswith(self.bad_answer) for c in completions]
        failures = [
            f"reward function bonus raised ValueError on dataset row {row}: no" if b else None
            for b, row in zip(bad, row_ids)
        ]
        return Scores({"bonus": [None if b else 0.25 for b in bad]}, failures)

    def shutdown(self):
        pass


def test_a_group_a_reward_function_failed_on_is_not_trained_and_counted_until_the_budget(tokenizer):
    from engine.user_code import UserCodeError

    def reply(prompt, row, call):
        return str(true_answer(tokenizer, prompt)) if row % 2 == 0 else "0", "stop"

    first_answer = str(2 * (10 + make_loop(tokenizer, reply).sampler.indices(0)[0]))
    roles_args = {"max_failed_groups": 1}
    loop = make_loop(tokenizer, reply, **roles_args)
    loop.roles.reward_functions = FailingFunctions(first_answer)
    loop.rewards.functions = loop.roles.reward_functions
    metrics = loop.step(0)
    (examples,) = loop.roles.policy.trained
    assert len(examples) == (PROMPTS - 1) * SAMPLES  # the failed prompt's group is left out whole
    assert metrics["reward/failed_groups"] == 1.0 and metrics["reward/bonus"] == 0.25
    with pytest.raises(
        UserCodeError,
        match=r"reward function bonus raised ValueError on dataset row \d+: no "
        r"\(2 groups failed; grpo.max_failed_groups=1\)",
    ):
        loop.sampler.indices = lambda step: [0, 1, 2, 3]  # a batch holding the prompt it fails on again
        loop.rewards.functions.bad_answer = "20"
        loop.step(1)


def test_a_lost_generation_worker_is_restarted_with_the_current_weights_and_the_step_redone(tokenizer):
    uninterrupted = make_loop(tokenizer, even_samples_right(tokenizer))
    interrupted = make_loop(tokenizer, even_samples_right(tokenizer))
    for step in range(2):
        uninterrupted.step(step)
    interrupted.step(0)
    interrupted.roles.generation.die_at_call = len(interrupted.roles.generation.calls)  # the next call dies
    interrupted.step(1)
    generation = interrupted.roles.generation
    assert generation.restarts == 1
    assert generation.versions == [1, 1, 2]  # after the restart, the weights of step 1 again, then the step's refit
    first, second = (loop.roles.policy.trained for loop in (uninterrupted, interrupted))
    assert [[e.input_ids for e in batch] for batch in second] == [[e.input_ids for e in batch] for batch in first]
    assert [[e.scalars for e in batch] for batch in second] == [[e.scalars for e in batch] for batch in first]


def test_an_episode_an_environment_failed_on_is_counted_like_a_reward_function_failure(tokenizer):
    from engine.algorithms.rewards import EpisodeRewards
    from engine.algorithms.rollouts import new_episodes
    from engine.user_code import UserCodeError

    episodes = new_episodes(tokenizer, ROWS[:3], 2, "math")
    episodes[2].metadata["failed"] = "environment my_envs.py:Moody (task 'math') raised ValueError: no"
    rewards = EpisodeRewards(1.0, max_failed_groups=1)
    _, metrics, failed = rewards(episodes)
    assert failed == [False, False, True, False, False, False] and metrics["reward/failed_groups"] == 1.0
    with pytest.raises(UserCodeError, match=r"^environment my_envs.py:Moody .* raised ValueError: no \(2 groups"):
        rewards(episodes)
