"""The reward-function runner in this process: TRL's call, the dataset's columns as lists, and a function's failures
kept to the rows they happen on, each named."""

from __future__ import annotations

import math

from engine.environments.reward_functions import RewardFunctionRunner


def score(*functions, rows=4):
    runner = RewardFunctionRunner(list(functions))
    prompts = [f"p{i}" for i in range(rows)]
    completions = [f"c{i}" for i in range(rows)]
    columns = [{"answer": str(i), "level": i % 2} for i in range(rows)]
    return runner.score(prompts, completions, columns, row_ids=[10 + i for i in range(rows)])


def test_functions_get_prompts_completions_and_columns_as_trl_passes_them():
    seen = {}

    def exact(prompts, completions, answer, **columns):
        seen.update(prompts=prompts, completions=completions, answer=answer, **columns)
        return [1.0 if a == "2" else None for a in answer]

    scores = score(("exact", exact))
    assert seen == {
        "prompts": ["p0", "p1", "p2", "p3"],
        "completions": ["c0", "c1", "c2", "c3"],
        "answer": ["0", "1", "2", "3"],
        "level": [0, 1, 0, 1],
    }
    assert scores.values == {"exact": [None, None, 1.0, None]} and scores.failures == [None] * 4


def test_failures_stay_on_their_rows_and_name_function_and_dataset_row():
    def picky(prompts, completions, answer, **columns):
        return [1.0 / (int(a) % 2) for a in answer]  # even answers divide by zero

    def nan_on_three(prompts, completions, answer, **columns):
        return [math.nan if a == "3" else 0.5 for a in answer]

    def short(prompts, completions, **columns):
        return [1.0]

    scores = score(("picky", picky), ("nan_on_three", nan_on_three))
    assert scores.values["picky"] == [None, 1.0, None, 1.0]
    assert scores.failures[
        0
    ] == "reward function picky raised ZeroDivisionError on dataset row 10: integer modulo by zero" or scores.failures[
        0
    ].startswith("reward function picky raised ZeroDivisionError on dataset row 10: ")
    assert scores.failures[1] is None and scores.failures[2].startswith("reward function picky raised")
    assert scores.failures[3] == "reward function nan_on_three returned nan on dataset row 13: not a finite number"
    wrong = score(("short", short))
    assert wrong.failures == ["reward function short returned 1 values for 4 completions"] * 4
