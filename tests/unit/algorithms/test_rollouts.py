"""Multi-turn rollouts without a cluster: the generator's token ids go into the episode untouched, tool
observations are appended untrained, and an episode ends on an answer, a truncated turn or the turn limit."""

from __future__ import annotations

import pytest

from engine.algorithms.rollouts import new_episodes, run_rollouts
from engine.data.chat import tokenize_observation
from engine.environments.calculator import CalculatorToolEnv
from engine.environments.math_verifier import MathVerifierEnv
from engine.errors import DataError
from engine.generation.interfaces import SamplingParams
from tests.unit.algorithms.fakes import FakeGeneration, InProcessRouter

ROW = {"prompt": [{"role": "user", "content": "What is 12+12?"}], "answer": "24"}
PARAMS = SamplingParams(temperature=1.0, max_tokens=16, seed=5)


def calculator() -> InProcessRouter:
    return InProcessRouter({"calculator": CalculatorToolEnv()})


class CharByChar(FakeGeneration):
    """Returns each character as its own token: ids that re-tokenizing the text would not give back."""

    def generate(self, prompts, params):
        outputs = super().generate(prompts, params)
        for samples in outputs:
            for completion in samples:
                stop = [self.tokenizer.eos_token_id] if completion.finish_reason == "stop" else []
                ids = [i for ch in completion.text for i in self.tokenizer(ch, add_special_tokens=False)["input_ids"]]
                completion.token_ids = ids + stop
                completion.logprobs = [-0.1] * len(completion.token_ids)
        return outputs


def test_a_tool_call_then_an_answer(tokenizer):
    replies = {0: ("<calc>12+12</calc>", "stop"), 1: ("24", "stop")}
    generation = CharByChar(tokenizer, lambda prompt, row, call: replies[call])
    (episode,) = run_rollouts(
        new_episodes(tokenizer, [ROW], 1, "calculator"), generation, calculator(), tokenizer, PARAMS, 3
    )

    first_call, second_call = (prompts[0] for prompts, _ in generation.calls)
    call_ids = [i for ch in "<calc>12+12</calc>" for i in tokenizer(ch, add_special_tokens=False)["input_ids"]]
    call_ids.append(tokenizer.eos_token_id)
    assert call_ids != tokenizer("<calc>12+12</calc>", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    observation = tokenize_observation(
        tokenizer, episode.messages[:3], {"role": "tool", "content": "24"}
    )  # the template's text after the eos, the tool turn, the next assistant header
    # the second turn is prompted with the exact tokens so far: the sampled ids, never re-tokenized text
    assert second_call == first_call + call_ids + observation
    answer_ids = episode.token_ids[len(second_call) :]
    assert episode.token_ids == second_call + answer_ids and answer_ids[-1] == tokenizer.eos_token_id
    assert episode.loss_mask == [0] * len(first_call) + [1] * len(call_ids) + [0] * len(observation) + [1] * len(
        answer_ids
    )
    assert episode.generation_logprobs == [0.0] * len(first_call) + [-0.1] * len(call_ids) + [0.0] * len(
        observation
    ) + [-0.1] * len(answer_ids)
    assert [m["role"] for m in episode.messages] == ["user", "assistant", "tool", "assistant"]
    assert episode.messages[2]["content"] == "24"
    assert episode.turns == 2 and episode.done and episode.reward == 1.0 and not episode.truncated
    assert episode.metadata["tool_calls"] == 1 and episode.metadata["tool_errors"] == 0


def test_the_turn_limit_ends_an_episode_that_keeps_calling(tokenizer):
    generation = FakeGeneration(tokenizer, lambda prompt, row, call: ("<calc>1+1</calc>", "stop"))
    (episode,) = run_rollouts(
        new_episodes(tokenizer, [ROW], 1, "calculator"), generation, calculator(), tokenizer, PARAMS, 3
    )
    assert len(generation.calls) == 3 and episode.turns == 3 and episode.done
    assert episode.reward == 0.0  # no final answer within the limit
    assert [m["role"] for m in episode.messages].count("tool") == 2


def test_a_truncated_turn_ends_the_episode(tokenizer):
    generation = FakeGeneration(tokenizer, lambda prompt, row, call: ("<calc>1+1</calc>", "length"))
    (episode,) = run_rollouts(
        new_episodes(tokenizer, [ROW], 1, "calculator"), generation, calculator(), tokenizer, PARAMS, 3
    )
    assert len(generation.calls) == 1 and episode.done and episode.truncated and episode.turns == 1
    assert episode.token_ids[-1] != tokenizer.eos_token_id and sum(episode.loss_mask) == len(episode.generated_tokens)
    assert episode.messages[-1]["role"] == "assistant"  # no observation after a cut turn


def test_turns_are_seeded_per_turn_and_finished_episodes_leave_the_batch(tokenizer):
    def reply(prompt, row, call):
        return ("24" if (call, row) == (0, 0) else "<calc>12+12</calc>"), "stop"

    generation = FakeGeneration(tokenizer, reply)
    episodes = new_episodes(tokenizer, [ROW, ROW], 1, "calculator")
    run_rollouts(episodes, generation, calculator(), tokenizer, PARAMS, 3)
    sizes = [len(prompts) for prompts, _ in generation.calls]
    assert sizes == [2, 1, 1]  # the answered episode is not generated for again
    seeds = [params.seed for _, params in generation.calls]
    assert len(set(seeds)) == 3 and all(params.n == 1 for _, params in generation.calls)
    assert [e.turns for e in episodes] == [1, 3]


def test_groups_single_turn_rewards_and_task_routing(tokenizer):
    generation = FakeGeneration(tokenizer, lambda prompt, row, call: (["24", "25"][row % 2], "stop"))
    rows = [ROW, {**ROW, "answer": "25", "task": "other"}]
    episodes = new_episodes(tokenizer, rows, 2, "math")
    assert [e.metadata["task"] for e in episodes] == ["math", "math", "other", "other"]  # the row's task wins
    router = InProcessRouter({"math": MathVerifierEnv(), "other": MathVerifierEnv()})
    run_rollouts(episodes, generation, router, tokenizer, PARAMS, 1)
    assert [e.group for e in episodes] == [0, 0, 1, 1]
    assert [e.reward for e in episodes] == [1.0, 0.0, 0.0, 1.0]
    assert episodes[1].completion == [{"role": "assistant", "content": "25"}]


def test_a_plain_text_prompt_is_one_user_turn_to_environments_and_text_to_reward_functions(tokenizer):
    generation = FakeGeneration(tokenizer, lambda prompt, row, call: ("24", "stop"))
    (episode,) = new_episodes(tokenizer, [{"prompt": "12+12=", "answer": "24"}], 1, "math")
    assert episode.token_ids == tokenizer("12+12=")["input_ids"]  # no chat template on plain text
    run_rollouts([episode], generation, InProcessRouter({"math": MathVerifierEnv()}), tokenizer, PARAMS, 1)
    assert episode.messages == [{"role": "user", "content": "12+12="}, {"role": "assistant", "content": "24"}]
    assert episode.completion == "24" and episode.reward == 1.0
    with pytest.raises(DataError, match="multi-turn rollouts"):
        run_rollouts(
            new_episodes(tokenizer, [{"prompt": "1+1="}], 1, "calculator"),
            generation,
            calculator(),
            tokenizer,
            PARAMS,
            3,
        )


@pytest.mark.parametrize("task", ["arithmetic", "spelling"])
def test_the_router_merges_tasks_in_row_order_and_names_an_unknown_one(tokenizer, task):
    from engine.environments.router import merge_results, rows_by_task

    router = InProcessRouter({"arithmetic": MathVerifierEnv(), "tool": CalculatorToolEnv()})
    logs = [[{"role": "assistant", "content": text}] for text in ("24", "<calc>2+2</calc>", "7", "<calc>1</calc>")]
    metadata = [{"task": "arithmetic", "answer": "24"}, {"task": "tool", "answer": "4"}]
    metadata += [{"task": task, "answer": "8"}, {"task": "tool", "answer": "1"}]
    if task == "spelling":
        with pytest.raises(ValueError, match="no environment for task 'spelling' \\(row 2\\); known: arithmetic, tool"):
            router.step(logs, metadata)
        return
    result = router.step(logs, metadata)
    assert result.rewards == [1.0, 0.0, 0.0, 0.0]
    assert result.observations[0] is None and result.observations[1] == {"role": "tool", "content": "4"}
    assert result.terminated == [True, False, True, False]
    assert result.metadata[1]["tool_calls"] == 1 and "tool_calls" not in result.metadata[0]
    by_task = rows_by_task(metadata, ["arithmetic", "tool"])
    assert by_task == {"arithmetic": [0, 2], "tool": [1, 3]}
    short = MathVerifierEnv().step(logs[:1], metadata[:1])
    with pytest.raises(ValueError, match="'arithmetic' environment answered 1 of 2 rows"):
        merge_results(4, by_task, {"arithmetic": short, "tool": short})
