"""Environments as Ray actors, one per task name; each row goes to the environment of its ``task``.

The routing itself (which rows go where, and putting the answers back in row order) is two pure functions, so
it is the same logic whether the environments are actors or, in a test, plain objects.
"""

from __future__ import annotations

from typing import Any, Iterable

import ray

from engine.environments.interfaces import EnvStepResult, Message


def rows_by_task(metadata: list[dict[str, Any]], known: Iterable[str]) -> dict[str, list[int]]:
    """Row indices per task, in row order; a task without an environment is an error naming it."""
    known = set(known)
    by_task: dict[str, list[int]] = {}
    for row, meta in enumerate(metadata):
        task = meta.get("task")
        if task not in known:
            raise ValueError(f"no environment for task {task!r} (row {row}); known: {', '.join(sorted(known))}")
        by_task.setdefault(task, []).append(row)
    return by_task


def merge_results(count: int, by_task: dict[str, list[int]], parts: dict[str, EnvStepResult]) -> EnvStepResult:
    """One result in row order from each task's result over its own rows."""
    merged = EnvStepResult([None] * count, [0.0] * count, [True] * count, [None] * count, [{}] * count)
    for task, rows in by_task.items():
        part = parts[task]
        if len(part.rewards) != len(rows):
            raise ValueError(f"the {task!r} environment answered {len(part.rewards)} of {len(rows)} rows")
        for i, row in enumerate(rows):
            merged.observations[row] = part.observations[i]
            merged.rewards[row] = part.rewards[i]
            merged.terminated[row] = part.terminated[i]
            merged.next_stop_strings[row] = part.next_stop_strings[i]
            merged.metadata[row] = part.metadata[i]
    return merged


class EnvironmentRouter:
    def __init__(self, environments: dict[str, tuple[type, dict[str, Any]]], runtime_env: dict | None = None):
        options: dict[str, Any] = {"num_cpus": 0}
        if runtime_env:
            options["runtime_env"] = runtime_env
        self.actors = {
            task: ray.remote(cls).options(**options).remote(**kwargs) for task, (cls, kwargs) in environments.items()
        }

    def step(self, message_logs: list[list[Message]], metadata: list[dict[str, Any]]) -> EnvStepResult:
        by_task = rows_by_task(metadata, self.actors)
        refs = {
            task: self.actors[task].step.remote([message_logs[r] for r in rows], [metadata[r] for r in rows])
            for task, rows in by_task.items()
        }
        return merge_results(len(message_logs), by_task, {task: ray.get(ref) for task, ref in refs.items()})

    def shutdown(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)


def environment_specs(kind: str, max_turns: int) -> dict[str, tuple[type, dict[str, Any]]]:
    """The environments of a run, by task name (the synthetic task is 'arithmetic')."""
    if kind == "calculator":
        from engine.environments.calculator import CalculatorToolEnv

        return {"arithmetic": (CalculatorToolEnv, {"max_turns": max_turns})}
    from engine.environments.math_verifier import MathVerifierEnv

    return {"arithmetic": (MathVerifierEnv, {})}
