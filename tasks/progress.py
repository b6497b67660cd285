"""A Prefect progress artifact per running stage: the stage loop's position, shown on the flow run's page.

Fed by ``engine.logs`` where the stage runs in the task's process, and by the progress lines of the job's log where
it runs as a Ray job. The artifact is a view: a Prefect API that fails to take an update never fails the stage.
"""

from __future__ import annotations

import logging
import re
import time

from engine.logs import PROGRESS_LOGGER

log = logging.getLogger(PROGRESS_LOGGER)

# what engine.logs.StepProgress writes, as followed from a Ray job's log
_PROGRESS_LINE = re.compile(re.escape(PROGRESS_LOGGER) + r" - (\w+): step (\d+)/(\d+)")


class ProgressArtifact:
    """Created at the stage's first report (its resume position), updated at most every ``every_s`` seconds and at
    the last step; keyed ``<stage>-progress``."""

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self._ids: dict[str, object] = {}
        self._last = 0.0
        self._broken = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        now = time.monotonic()
        if self._broken or (stage in self._ids and done < total and now - self._last < self.every_s):
            return
        percent, description = 100.0 * done / max(total, 1), f"{stage}: step {done}/{total}"
        try:
            if stage in self._ids:
                update_progress_artifact(self._ids[stage], percent, description=description)
            else:
                key = f"{stage.replace('_', '-')}-progress"
                self._ids[stage] = create_progress_artifact(percent, key=key, description=description)
        except Exception as exc:  # the Prefect API is down or refuses: the stage goes on, its log lines still flow
            self._broken = True
            log.warning("progress artifact of %s not updated (%s); the stage goes on", stage, exc)
        self._last = now

    def follow_line(self, line: str) -> None:
        """A line of a Ray job's log: a progress line moves the artifact."""
        match = _PROGRESS_LINE.search(line)
        if match:
            self(match.group(1), int(match.group(2)), int(match.group(3)))
