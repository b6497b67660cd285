"""Per-step wall times (and a few logged values) of a transformers Trainer, for the TRL comparisons."""

from __future__ import annotations

import time


def step_timer(steps: list[dict], logged: tuple[str, ...] = ()):
    """A TrainerCallback appending {"seconds", <logged keys>} to ``steps`` for every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"seconds": time.perf_counter() - self.started})

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in logged:
                if logs and key in logs and steps:
                    steps[-1][key] = logs[key]

    return StepTimer()
