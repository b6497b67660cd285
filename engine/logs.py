"""posttrain's own log lines (a stage resumed from step N, why a stage starts afresh) shown where the run's output
goes. Prefect also sends them to the task's log in its UI (PREFECT_LOGGING_EXTRA_LOGGERS=posttrain)."""

from __future__ import annotations

import logging
import sys

LOGGER = "posttrain"


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
