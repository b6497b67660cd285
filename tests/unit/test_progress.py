"""A stage's progress: a bar on a terminal, periodic log lines anywhere else (no carriage returns in a log file), and
the Prefect progress artifact that follows it."""

from __future__ import annotations

import io
import logging

from engine.logs import StepProgress, progress_reported_to
from tasks.progress import ProgressArtifact


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


def test_listeners_hear_the_resume_position_and_every_step():
    heard: list[tuple[str, int, int]] = []
    with progress_reported_to(lambda *position: heard.append(position)):
        list(StepProgress(start=2, total=4, stage="grpo", stream=io.StringIO()))
    list(StepProgress(start=0, total=1, stage="sft", stream=io.StringIO()))  # no listener any more
    assert heard == [("grpo", 2, 4), ("grpo", 3, 4), ("grpo", 4, 4)]


class FakeArtifacts:
    """Prefect's progress-artifact functions, recording calls (the real ones need a flow run and a server)."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple] = []
        self.fail = fail

    def create(self, progress, key=None, description=None):
        if self.fail:
            raise ConnectionError("server down")
        self.calls.append(("create", key, progress, description))
        return "artifact-1"

    def update(self, artifact_id, progress, description=None):
        self.calls.append(("update", artifact_id, progress, description))


def patched(monkeypatch, fake: FakeArtifacts) -> None:
    import prefect.artifacts

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", fake.create)
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", fake.update)


def test_the_artifact_is_throttled_but_always_shows_the_last_step(monkeypatch):
    fake = FakeArtifacts()
    patched(monkeypatch, fake)
    artifact = ProgressArtifact(every_s=3600.0)
    for done in range(0, 5):
        artifact("ref_logprobs", done, 4)
    assert fake.calls == [
        ("create", "ref-logprobs-progress", 0.0, "ref_logprobs: step 0/4"),
        ("update", "artifact-1", 100.0, "ref_logprobs: step 4/4"),
    ]


def test_a_ray_jobs_progress_lines_move_the_artifact(monkeypatch, caplog):
    fake = FakeArtifacts()
    patched(monkeypatch, fake)
    artifact = ProgressArtifact(every_s=0.0)
    with caplog.at_level(logging.INFO, logger="posttrain.progress"):
        list(StepProgress(start=0, total=2, stage="sft", every_s=0.0, stream=io.StringIO()))
    for record in caplog.records:  # as the job's log shows them
        artifact.follow_line(f"12:00:00 | INFO    | {record.name} - {record.getMessage()}")
    artifact.follow_line("12:00:01 | INFO    | posttrain.stages - sft committed file:///store/sft")
    assert [call[2] for call in fake.calls] == [50.0, 100.0]


def test_an_unreachable_prefect_api_never_fails_the_stage(monkeypatch, caplog):
    patched(monkeypatch, FakeArtifacts(fail=True))
    artifact = ProgressArtifact(every_s=0.0)
    with caplog.at_level(logging.WARNING, logger="posttrain.progress"):
        artifact("sft", 0, 2)
        artifact("sft", 1, 2)  # not retried: one warning
    assert [r.getMessage() for r in caplog.records] == [
        "progress artifact of sft not updated (server down); the stage goes on"
    ]
