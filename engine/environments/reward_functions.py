"""The user's reward functions, with TRL's signature, run in an environment actor.

    fn(prompts, completions, **columns) -> list[float | None]

``prompts`` and ``completions`` come in the dataset's form (text, or lists of messages), ``columns`` are the
dataset's other columns as lists (GSM8K's ``answer``, say), and ``None`` means "not applicable to this row". A
function that raises, returns the wrong number of values, or a value that is not a finite number stops the run
with one line naming the function (and, for a raise, the dataset row).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import ray

from engine import cluster, user_code
from engine.config import RewardFunctionConfig
from engine.user_code import UserCodeError

Score = list[float | None]


def _check(name: str, values: Any, count: int) -> Score:
    if not isinstance(values, (list, tuple)) or len(values) != count:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise UserCodeError(f"reward function {name} returned {got} for {count} completions")
    checked: Score = []
    for index, value in enumerate(values):
        if value is None:
            checked.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserCodeError(
                f"reward function {name} returned {value!r} for completion {index}: not a finite number"
            )
        checked.append(float(value))
    return checked


class RewardFunctionRunner:
    """The actor: calls each function on a batch, checks what it returns."""

    def __init__(self, functions: list[tuple[str, Callable]]):
        self.functions = functions

    def score(
        self, prompts: list, completions: list, columns: list[dict[str, Any]], row_ids: list[int]
    ) -> dict[str, Score]:
        keys = sorted({key for row in columns for key in row})
        kwargs = {key: [row.get(key) for row in columns] for key in keys}
        scores = {}
        for name, fn in self.functions:
            try:
                values = fn(prompts=prompts, completions=completions, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the user's code: find the row and report it in one line
                row = self._failing_row(fn, prompts, completions, kwargs, row_ids)
                where = f" on dataset row {row}" if row is not None else ""
                raise UserCodeError(f"reward function {name} raised {type(exc).__name__}{where}: {exc}") from None
            scores[name] = _check(name, values, len(prompts))
        return scores

    @staticmethod
    def _failing_row(fn: Callable, prompts: list, completions: list, kwargs: dict, row_ids: list[int]) -> int | None:
        for i, row_id in enumerate(row_ids):
            try:
                fn(
                    prompts=prompts[i : i + 1],
                    completions=completions[i : i + 1],
                    **{k: v[i : i + 1] for k, v in kwargs.items()},
                )
            except Exception:  # noqa: BLE001
                return row_id
        return None


class RewardFunctions:
    """The controller's handle: functions loaded here first (an import error fails before any work), then
    scored in one actor."""

    def __init__(self, specs: list[RewardFunctionConfig]):
        self.weights: dict[str, float] = {}
        functions: list[tuple[str, Callable]] = []
        for index, spec in enumerate(specs):
            fn = user_code.load(user_code.parse(spec.function, f"grpo.reward_functions[{index}].function"))
            if not callable(fn):
                raise UserCodeError(f"grpo.reward_functions[{index}]: {spec.function} is not callable")
            name = spec.name or getattr(fn, "__name__", f"function_{index}")
            if name in self.weights:
                raise UserCodeError(f"grpo.reward_functions[{index}]: two reward functions are named {name!r}")
            cluster.ship_by_value(fn)
            functions.append((name, fn))
            self.weights[name] = spec.weight
        self.actor = ray.remote(RewardFunctionRunner).options(num_cpus=0).remote(functions)

    def score(
        self, prompts: list, completions: list, columns: list[dict[str, Any]], row_ids: list[int]
    ) -> dict[str, Score]:
        return cluster.get(self.actor.score.remote(prompts, completions, columns, row_ids))

    def shutdown(self) -> None:
        ray.kill(self.actor)
