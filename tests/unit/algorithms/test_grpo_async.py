"""Asynchronous GRPO's schedule without a cluster: which weights sample which step, the staleness bound, resume
with the queue in the checkpoint, and a generator lost while sampling ahead, with the in-process fakes."""

from __future__ import annotations

import pytest

from engine.algorithms.grpo import train_loop
from engine.errors import DataError
from engine.storage import ArtifactStore
from tests.unit.algorithms.fakes import RecordingRun
from tests.unit.algorithms.test_grpo_step import even_samples_right, grpo_config, make_loop, sampled_prompts

ASYNC = {"max_steps": 4, "async": {"enabled": True, "queue_size": 1, "max_staleness": 1}}  # nothing past step 4


def trained_inputs(loop) -> list[list[list[int]]]:
    return [[e.input_ids for e in batch] for batch in loop.roles.policy.trained]


def run_steps(loop, steps: int) -> list[dict[str, float]]:
    try:
        return [loop.step(step) for step in range(steps)]
    finally:
        loop.rollouts.close()


def test_the_generator_samples_each_step_with_the_weights_of_the_step_before(tokenizer):
    sync = make_loop(tokenizer, even_samples_right(tokenizer))
    ahead = make_loop(tokenizer, even_samples_right(tokenizer), **ASYNC)
    sync_metrics, metrics = run_steps(sync, 4), run_steps(ahead, 4)

    assert sync.roles.generation.held == [0, 1, 2, 3]
    assert ahead.roles.generation.held == [0, 0, 1, 2]  # step s+1 sampled while step s trained, with its weights
    assert ahead.roles.generation.versions == [1, 2, 3, 4]  # one refit per step, after the step's sampling ended
    assert [m["async/staleness"] for m in metrics] == [0.0, 1.0, 1.0, 1.0]
    assert [m["async/dropped"] for m in metrics] == [0.0] * 4
    assert "async/staleness" not in sync_metrics[0]
    assert sampled_prompts(ahead) == sampled_prompts(sync)  # each step's prompts and seeds: a function of the step
    assert trained_inputs(ahead) == trained_inputs(sync)  # the fakes answer alike whatever the weights


def test_off_policy_data_turns_the_importance_sampling_correction_on_unless_the_loss_says(tokenizer):
    assert grpo_config(**ASYNC).grpo.loss.importance_sampling == "tis"
    assert grpo_config(**ASYNC).grpo.loss.is_max == 2.0
    assert grpo_config().grpo.loss.importance_sampling is None
    on_policy = {"async": {"enabled": True, "queue_size": 1, "max_staleness": 0}}  # stale episodes never train
    assert grpo_config(**on_policy).grpo.loss.importance_sampling is None
    chosen = grpo_config(**ASYNC, loss={"importance_sampling": None}).grpo.loss
    assert chosen.importance_sampling is None


def test_episodes_older_than_max_staleness_are_dropped_counted_and_sampled_again(tokenizer):
    loop = make_loop(tokenizer, even_samples_right(tokenizer), **{**ASYNC, "async": {"enabled": True, "queue_size": 2}})
    metrics = run_steps(loop, 4)
    # steps 1 and 2 are sampled ahead with the weights of step 0; step 2's are two steps old at step 2: dropped
    # and step 2 sampled again with its own weights; step 3 (sampled with the weights of step 1) is dropped too
    assert [m["async/dropped"] for m in metrics] == [0.0, 0.0, 16.0, 16.0]
    assert [m["async/staleness"] for m in metrics] == [0.0, 1.0, 0.0, 0.0]
    assert loop.roles.generation.held == [0, 0, 0, 1, 2, 3]
    assert len(loop.roles.policy.trained) == 4 and all(len(batch) == 16 for batch in loop.roles.policy.trained)


def test_a_checkpoint_holds_the_steps_sampled_ahead_and_the_run_resumes_exactly(tokenizer, tmp_path):
    settings = {"checkpoint_every": 2, "val_every": 2, **ASYNC}
    cfg = grpo_config(**settings)
    store = ArtifactStore(f"file://{tmp_path}/store", tmp_path / "cache")
    first, first_run = make_loop(tokenizer, even_samples_right(tokenizer), **settings), RecordingRun()
    finished = train_loop(first, store, first_run, cfg, "stages/grpo/k")

    resumed, resumed_run = make_loop(tokenizer, even_samples_right(tokenizer), **settings), RecordingRun()
    state = train_loop(resumed, store, resumed_run, cfg, "stages/grpo/k")
    # step 3 (index 2) was sampled before the checkpoint and comes back from it; only step 4 is sampled again
    assert sampled_prompts(resumed) == sampled_prompts(first)[3:]
    assert trained_inputs(resumed) == trained_inputs(first)[2:]
    assert [h["async/staleness"] for h in state.history] == [0.0, 1.0, 1.0, 1.0]
    assert [h["reward/mean"] for h in state.history] == [h["reward/mean"] for h in finished.history]


def test_a_generator_lost_while_sampling_ahead_is_restarted_and_the_step_sampled_again(tokenizer, caplog):
    loop = make_loop(tokenizer, even_samples_right(tokenizer), **ASYNC)
    loop.roles.generation.die_at_call = 2  # step 2's sampling, ahead, during step 1's training
    with caplog.at_level("WARNING", logger="posttrain.grpo"):
        metrics = run_steps(loop, 4)
    assert "lost while sampling ahead" in caplog.text
    generation = loop.roles.generation
    assert generation.restarts == 1
    assert generation.held == [0, 0, 2, 2]  # step 2 sampled again after the refit of step 2, then step 3 ahead
    assert [m["async/staleness"] for m in metrics] == [0.0, 1.0, 0.0, 1.0]
    assert len(loop.roles.policy.trained) == 4


def test_an_error_of_the_run_while_sampling_ahead_fails_the_step_that_takes_it_without_a_restart(tokenizer):
    right = even_samples_right(tokenizer)

    def fails_on_step_2(prompt, row, call):
        if call == 2:  # step 2's sampling, ahead, during step 1's training
            raise DataError("row 7: no answer column")
        return right(prompt, row, call)

    loop = make_loop(tokenizer, fails_on_step_2, **ASYNC)
    try:
        loop.step(0)
        loop.step(1)  # trains; its settle does not mistake the error for a lost worker
        with pytest.raises(DataError, match="row 7"):
            loop.step(2)
        assert loop.roles.generation.restarts == 0
    finally:
        loop.rollouts.close()
