"""Environments as Ray actors, one per task name; each row goes to the environment of its ``task``."""

from __future__ import annotations

from typing import Any

import ray

from engine.environments.interfaces import EnvStepResult, Message


class EnvironmentRouter:
    def __init__(self, environments: dict[str, tuple[type, dict[str, Any]]], runtime_env: dict | None = None):
        options: dict[str, Any] = {"num_cpus": 0}
        if runtime_env:
            options["runtime_env"] = runtime_env
        self.actors = {
            task: ray.remote(cls).options(**options).remote(**kwargs) for task, (cls, kwargs) in environments.items()
        }

    def step(self, message_logs: list[list[Message]], metadata: list[dict[str, Any]]) -> EnvStepResult:
        by_task: dict[str, list[int]] = {}
        for row, meta in enumerate(metadata):
            task = meta.get("task")
            if task not in self.actors:
                raise ValueError(f"no environment for task {task!r}; known: {', '.join(sorted(self.actors))}")
            by_task.setdefault(task, []).append(row)
        refs = {
            task: self.actors[task].step.remote([message_logs[r] for r in rows], [metadata[r] for r in rows])
            for task, rows in by_task.items()
        }
        count = len(message_logs)
        merged = EnvStepResult([None] * count, [0.0] * count, [True] * count, [None] * count, [{}] * count)
        for task, rows in by_task.items():
            part: EnvStepResult = ray.get(refs[task])
            for i, row in enumerate(rows):
                merged.observations[row] = part.observations[i]
                merged.rewards[row] = part.rewards[i]
                merged.terminated[row] = part.terminated[i]
                merged.next_stop_strings[row] = part.next_stop_strings[i]
                merged.metadata[row] = part.metadata[i]
        return merged

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
