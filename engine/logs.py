"""posttrain's own log lines (a stage resumed from step N, why a stage starts afresh, its progress) shown where the
run's output goes. Prefect also sends them to the task's log in its UI (PREFECT_LOGGING_EXTRA_LOGGERS=posttrain)."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable, Iterator, TextIO

from tqdm import tqdm

LOGGER = "posttrain"
PROGRESS_LOGGER = f"{LOGGER}.progress"
_progress_log = logging.getLogger(PROGRESS_LOGGER)

ProgressListener = Callable[[str, int, int], None]  # (stage, steps done, total steps)
_listeners: list[ProgressListener] = []


@contextlib.contextmanager
def progress_reported_to(listener: ProgressListener) -> Iterator[None]:
    """While open, every stage loop's position (at its start, then after each step) also goes to ``listener``:
    how the orchestrator shows a running stage's progress without the engine knowing about it."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def _report(stage: str, done: int, total: int) -> None:
    for listener in list(_listeners):
        listener(stage, done, total)


class _UnlessTheRootPrints(logging.StreamHandler):
    """Prints a record only while the root logger has no handler: in a flow run Prefect's console handler prints
    what propagates to it, elsewhere (a Ray job, a plain command) this one does."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def show_on_stderr(level: int = logging.INFO) -> None:
    """Let ``posttrain.*`` records at ``level`` and above through, printed once on stderr."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    if not any(isinstance(handler, _UnlessTheRootPrints) for handler in logger.handlers):
        handler = _UnlessTheRootPrints(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)


class StepProgress:
    """A stage loop's steps: a tqdm bar on a terminal; elsewhere (a file, Prefect's log, a Ray job) one log line every
    ``every_s`` seconds and one at the last step, in place of a bar redrawn with carriage returns into the log."""

    def __init__(self, start: int, total: int, stage: str, every_s: float = 30.0, stream: TextIO | None = None):
        self.start, self.total, self.stage, self.every_s = start, total, stage, every_s
        self.stream = stream or sys.stderr
        self.postfix: dict[str, str] = {}
        self._bar: tqdm | None = None
        if self.stream.isatty():
            steps = range(start, total)
            self._bar = tqdm(steps, initial=start, total=total, desc=stage, unit="step", file=self.stream)

    def set_postfix(self, **values: str) -> None:
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values)

    def __iter__(self) -> Iterator[int]:
        _report(self.stage, self.start, self.total)
        if self._bar is not None:
            for step in self._bar:
                yield step
                _report(self.stage, step + 1, self.total)
            return
        started = last = time.monotonic()
        for step in range(self.start, self.total):
            yield step
            _report(self.stage, step + 1, self.total)
            now = time.monotonic()
            if now - last >= self.every_s or step + 1 == self.total:
                rate = (step + 1 - self.start) / max(now - started, 1e-9)
                shown = "".join(f", {key}={value}" for key, value in self.postfix.items())
                _progress_log.info("%s: step %d/%d%s (%.2f step/s)", self.stage, step + 1, self.total, shown, rate)
                last = now
