"""Generation ahead of training on a fixed schedule: asynchronous GRPO.

    step s:   take(s)            the episodes of step s: generated ahead, or now (synchronous, or none queued)
              prefetch(s)        one background thread samples steps s+1 .. s+queue_size with the weights of step s
              ... the trainer trains step s while the generator samples ...
              settle()           wait until the generator is idle
              refitted(s + 1)    the caller pushed the weights of step s+1

Refits wait for the generator instead of racing it, so the weights each episode was sampled by are exact and the
schedule does not depend on timing: a run's episodes are a pure function of (seed, step, weight version), the same
seeds give the same curve, and a checkpoint that stores the generated but untrained steps resumes exactly.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from engine.algorithms.rollouts import Episode
from engine.generation.group import WorkerLost


@dataclass
class GeneratedStep:
    """A step's episodes and the weights that sampled them."""

    step: int
    version: int  # the number of training steps behind the weights that sampled it
    episodes: list[Episode]
    seconds: float  # how long sampling it took, wherever it ran

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "GeneratedStep":
        episodes = [Episode(**episode) for episode in data["episodes"]]
        return cls(data["step"], data["version"], episodes, data["seconds"])


class RolloutQueue:
    """The steps sampled ahead of the trainer. ``generate(step)`` samples a step on the generator (the caller's
    ``collect``); it runs on one background thread, so the generator serves one step at a time, in step order.
    ``queue_size`` 0 is synchronous GRPO: every step is generated when it is taken."""

    def __init__(self, generate: Callable[[int], list[Episode]], queue_size: int, max_staleness: int, max_steps: int):
        self._generate = generate
        self.queue_size, self.max_staleness, self.max_steps = queue_size, max_staleness, max_steps
        self.version = 0  # the weights the generator holds, in training steps
        self._pending: dict[int, Future[GeneratedStep]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-rollouts")

    def _sample(self, step: int, version: int) -> GeneratedStep:
        started = time.perf_counter()
        episodes = self._generate(step)
        return GeneratedStep(step, version, episodes, time.perf_counter() - started)

    def take(self, step: int) -> tuple[GeneratedStep, int]:
        """Step ``step``'s episodes and how many episodes were dropped as too stale (their step then sampled anew
        with the current weights). A lost worker raises ``WorkerLost`` here, from the background or not."""
        future = self._pending.pop(step, None)
        if future is not None:
            generated = future.result()
            if step - generated.version <= self.max_staleness:
                return generated, 0
            return self._sample(step, self.version), len(generated.episodes)
        return self._sample(step, self.version), 0

    def prefetch(self, step: int) -> None:
        """Queue the steps after ``step`` up to ``queue_size`` ahead (none past the run's last), sampled with the
        weights the generator holds now."""
        for ahead in range(step + 1, min(step + self.queue_size, self.max_steps - 1) + 1):
            if ahead not in self._pending:
                self._pending[ahead] = self._executor.submit(self._sample, ahead, self.version)

    def settle(self) -> bool:
        """Wait until the generator is idle (a refit may go ahead); steps whose generator was lost are forgotten, to
        be sampled again when taken. Returns whether any were (the caller restarts the generator). Any other error
        stays with its step and is raised when that step is taken."""
        failed = [step for step, future in self._pending.items() if isinstance(future.exception(), WorkerLost)]
        for step in failed:
            del self._pending[step]
        return bool(failed)

    def refitted(self, version: int) -> None:
        """The generator now holds the weights of ``version``."""
        self.version = version

    def forget(self) -> None:
        """Drop every queued step, waiting for the one being sampled (before a lost generator is restarted)."""
        self.settle()
        self._pending.clear()

    def state(self) -> list[dict[str, Any]]:
        """The queued steps, sampled and not yet trained, for a checkpoint (call after ``settle``)."""
        return [self._pending[step].result().to_json() for step in sorted(self._pending)]

    def restore(self, saved: list[dict[str, Any]], version: int) -> None:
        """Continue from a checkpoint: its queued steps, and the generator holding the weights of ``version``."""
        self.version = version
        for data in saved:
            future: Future[GeneratedStep] = Future()
            future.set_result(GeneratedStep.from_json(data))
            self._pending[data["step"]] = future

    def close(self) -> None:
        """Stop sampling: queued steps that have not started are cancelled; the one running ends with its call."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
