"""Environments as Ray actors, one per task name; each row goes to the environment of its ``task``.

Environments follow the protocol of ``engine.environments.interfaces`` and are built with no arguments: the
built-in ones (``math``, ``calculator``) are registered exactly as a user's (``grpo.environments``).

The routing itself (which rows go where, and putting the answers back in row order) is two pure functions, so
it is the same logic whether the environments are actors or, in a test, plain objects.
"""

from __future__ import annotations

from typing import Any, Iterable

import ray

from engine import cluster, user_code
from engine.environments.interfaces import EnvStepResult, Message
from engine.user_code import UserCodeError


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


def failed_result(rows: list[int], metadata: list[dict[str, Any]], why: str) -> EnvStepResult:
    """What the rows of a user environment's failed call get: episodes that end, marked failed (never scored 0:
    ``engine.algorithms.rewards`` drops their groups and counts them)."""
    count = len(rows)
    marked = [{**metadata[row], "failed": why} for row in rows]
    return EnvStepResult([None] * count, [0.0] * count, [True] * count, [None] * count, marked)


class EnvironmentRouter:
    """One actor per task, started when a row first needs it. A user environment that raises, or does not answer
    within ``timeout_s`` (its actor is then replaced), fails the rows it was given; a built-in one that raises is a bug
    and keeps its traceback."""

    def __init__(self, classes: dict[str, str], timeout_s: float | None = None):
        self.specs, self.timeout_s = classes, timeout_s
        self.classes = {task: load_environment(task, spec) for task, spec in classes.items()}
        self.actors: dict[str, Any] = {}

    def _actor(self, task: str):
        if task not in self.actors:
            self.actors[task] = ray.remote(self.classes[task]).options(num_cpus=0).remote()
        return self.actors[task]

    def step(self, message_logs: list[list[Message]], metadata: list[dict[str, Any]]) -> EnvStepResult:
        by_task = rows_by_task(metadata, self.classes)
        refs = {
            task: self._actor(task).step.remote([message_logs[r] for r in rows], [metadata[r] for r in rows])
            for task, rows in by_task.items()
        }
        parts = {}
        for task, ref in refs.items():
            where = f"environment {self.specs[task]} (task {task!r})"
            try:
                parts[task] = cluster.get(ref, timeout=self.timeout_s)
            except ray.exceptions.RayTaskError as exc:
                if self.specs[task].startswith("engine."):
                    raise
                why = f"{where} raised {type(exc.cause).__name__}: {exc.cause}"
                parts[task] = failed_result(by_task[task], metadata, why)
            except ray.exceptions.GetTimeoutError:
                ray.kill(self.actors.pop(task))  # a hung step holds the actor: the next rows get a fresh one
                why = f"{where} did not answer within {self.timeout_s:g} s (grpo.environment_timeout_s)"
                parts[task] = failed_result(by_task[task], metadata, why)
        return merge_results(len(message_logs), by_task, parts)

    def shutdown(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)


def load_environment(task: str, spec: str) -> type:
    """The class named by ``spec`` (loaded here: a bad name fails before any work), made to travel to its actor."""
    cls = user_code.load(user_code.parse(spec, f"grpo.environments.{task}"))
    if not isinstance(cls, type) or not callable(getattr(cls, "step", None)):
        raise UserCodeError(f"grpo.environments.{task}: {spec} is not a class with a step(message_logs, metadata)")
    cluster.ship_by_value(cls)
    return cls
