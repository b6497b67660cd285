"""A stage's progress: a bar on a terminal, periodic log lines anywhere else (no carriage returns in a log file)."""

from __future__ import annotations

import io
import logging

from engine.logs import StepProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_log_lines_with_the_last_step(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="posttrain.progress"):
        progress = StepProgress(start=2, total=6, stage="grpo", every_s=3600.0, stream=stream)
        for step in progress:
            progress.set_postfix(reward=f"{step / 10:.2f}")
    assert stream.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("grpo: step 6/6, reward=0.50 (")


def test_every_step_is_logged_when_the_interval_is_zero(caplog):
    with caplog.at_level(logging.INFO, logger="posttrain.progress"):
        steps = list(StepProgress(start=0, total=3, stage="sft", every_s=0.0, stream=io.StringIO()))
    assert steps == [0, 1, 2]
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"sft: step {s}/3" for s in (1, 2, 3)]


def test_on_a_terminal_it_is_a_bar_that_resumes_at_its_step(caplog):
    terminal = Terminal()
    with caplog.at_level(logging.INFO, logger="posttrain.progress"):
        progress = StepProgress(start=4, total=8, stage="sft", stream=terminal)
        assert list(progress) == [4, 5, 6, 7]
    assert "sft: 100%" in terminal.getvalue() and "8/8" in terminal.getvalue()
    assert not caplog.records
