"""The user's reward functions, with TRL's signature, run in an environment actor.

    fn(prompts, completions, **columns) -> list[float | None]

``prompts`` and ``completions`` come in the dataset's form (text, or lists of messages), ``columns`` are the
dataset's other columns as lists (GSM8K's ``answer``, say), and ``None`` means "not applicable to this row". A
function that raises, hangs past ``grpo.reward_timeout_s``, returns the wrong number of values or a value that is not
a finite number fails the completions it was asked to score: their groups are never trained on, they are counted
(``reward/failed_groups``), and past ``grpo.max_failed_groups`` (default 0) the run stops with one line naming the
function and the dataset row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import ray

from engine import cluster, user_code
from engine.config import RewardFunctionConfig
from engine.user_code import UserCodeError

Score = list[float | None]


def _checked(name: str, values: Any, count: int, row_ids: list[int]) -> tuple[Score, list[str | None]]:
    """The values a function returned, and per completion why one is unusable (None where it is fine)."""
    if not isinstance(values, (list, tuple)) or len(values) != count:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        return [None] * count, [f"reward function {name} returned {got} for {count} completions"] * count
    checked: Score = []
    failures: list[str | None] = []
    for value, row in zip(values, row_ids):
        usable = value is None or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
        checked.append(float(value) if usable and value is not None else None)
        failures.append(
            None if usable else f"reward function {name} returned {value!r} on dataset row {row}: not a finite number"
        )
    return checked, failures


@dataclass
class Scores:
    values: dict[str, Score]  # per function, per completion (None: not applicable, or failed)
    failures: list[str | None]  # per completion: why a function failed on it


class RewardFunctionRunner:
    """The actor: calls each function on a batch and checks what it returns. A call that raises is repeated row by
    row, so only the rows it fails on are lost (and the first of them named)."""

    def __init__(self, functions: list[tuple[str, Callable]]):
        self.functions = functions

    def score(self, prompts: list, completions: list, columns: list[dict[str, Any]], row_ids: list[int]) -> Scores:
        keys = sorted({key for row in columns for key in row})
        kwargs = {key: [row.get(key) for row in columns] for key in keys}
        values: dict[str, Score] = {}
        failures: list[str | None] = [None] * len(prompts)
        for name, fn in self.functions:
            try:
                returned = fn(prompts=prompts, completions=completions, **kwargs)
                raised: list[str | None] = [None] * len(prompts)
            except Exception:  # noqa: BLE001 - the user's code: tried row by row, so only failing rows are lost
                pairs = [self._one(name, fn, prompts, completions, kwargs, i, row) for i, row in enumerate(row_ids)]
                returned, raised = [value for value, _ in pairs], [why for _, why in pairs]
            values[name], bad = _checked(name, returned, len(prompts), row_ids)
            failures = [old or why or wrong for old, why, wrong in zip(failures, raised, bad)]
        return Scores(values, failures)

    @staticmethod
    def _one(
        name: str, fn: Callable, prompts: list, completions: list, kwargs: dict, i: int, row: int
    ) -> tuple[Any, str | None]:
        """One row's value, or why the function raised on it."""
        columns = {key: value[i : i + 1] for key, value in kwargs.items()}
        try:
            returned = fn(prompts=prompts[i : i + 1], completions=completions[i : i + 1], **columns)
        except Exception as exc:  # noqa: BLE001
            return None, f"reward function {name} raised {type(exc).__name__} on dataset row {row}: {exc}"
        return (returned[0] if isinstance(returned, (list, tuple)) and len(returned) == 1 else returned), None


class RewardFunctions:
    """The controller's handle: functions loaded here first (an import error fails before any work), then
    scored in one actor; a call that takes longer than ``timeout_s`` fails every completion of the batch and the
    actor is replaced."""

    def __init__(self, specs: list[RewardFunctionConfig], timeout_s: float | None = None):
        self.weights: dict[str, float] = {}
        self.functions: list[tuple[str, Callable]] = []
        self.timeout_s = timeout_s
        for index, spec in enumerate(specs):
            fn = user_code.load(user_code.parse(spec.function, f"grpo.reward_functions[{index}].function"))
            if not callable(fn):
                raise UserCodeError(f"grpo.reward_functions[{index}]: {spec.function} is not callable")
            name = spec.name or getattr(fn, "__name__", f"function_{index}")
            if name in self.weights:
                raise UserCodeError(f"grpo.reward_functions[{index}]: two reward functions are named {name!r}")
            cluster.ship_by_value(fn)
            self.functions.append((name, fn))
            self.weights[name] = spec.weight
        self.actor = self._start()

    def _start(self):
        return ray.remote(RewardFunctionRunner).options(num_cpus=0).remote(self.functions)

    def score(self, prompts: list, completions: list, columns: list[dict[str, Any]], row_ids: list[int]) -> Scores:
        ref = self.actor.score.remote(prompts, completions, columns, row_ids)
        try:
            return cluster.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.kill(self.actor)  # a hung function holds the actor: start a fresh one for the next batch
            self.actor = self._start()
            names = ", ".join(name for name, _ in self.functions)
            why = f"reward functions ({names}) did not answer within {self.timeout_s:g} s (grpo.reward_timeout_s)"
            return Scores({name: [None] * len(prompts) for name, _ in self.functions}, [why] * len(prompts))

    def shutdown(self) -> None:
        ray.kill(self.actor)
