"""Which lines of the workers' output reach the driver: stderr lines that warn or fail, each once."""

from __future__ import annotations

import logging

from engine.cluster import WorkerWarnings


def stream(lines: list[str], is_err: bool = True, actor: str = "FSDP2Worker", pid: int = 7) -> dict:
    """One batch of worker output as Ray's dispatcher hands it to the driver."""
    return {"lines": lines, "is_err": is_err, "actor_name": actor, "pid": pid, "task_name": None}


def test_warnings_and_errors_pass_once_and_the_rest_stays_in_the_worker_logs(caplog):
    forward = WorkerWarnings()
    with caplog.at_level(logging.INFO, logger="posttrain.workers"):
        forward(stream(["INFO 12:00 vLLM engine ready", "UserWarning: the tokenizer has no pad token", ""]))
        forward(stream(["ERROR 12:00:01 [engine] KV cache lost"], actor="VLLMGenerationWorker", pid=9))
        # a traceback reaches the caller as the exception: its lines stay in the worker's log file
        forward(stream(["Traceback (most recent call last):", '  File "r.py", line 2', "ZeroDivisionError: by 0"]))
        forward(stream(['  warnings.warn("the source line a warning echoes")']))
        forward(stream(["UserWarning: the tokenizer has no pad token"], pid=8))  # another rank, the same line
        forward(stream(["Processed prompts:  50%|#####\rProcessed prompts: 100%|##########"]))
        forward(stream(["WARNING on stdout is vLLM's own INFO stream"], is_err=False))
    assert [r.getMessage() for r in caplog.records] == [
        "[FSDP2Worker pid=7] UserWarning: the tokenizer has no pad token",
        "[VLLMGenerationWorker pid=9] ERROR 12:00:01 [engine] KV cache lost",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_it_remembers_a_bounded_number_of_lines(caplog):
    forward = WorkerWarnings(remembered=1)
    with caplog.at_level(logging.WARNING, logger="posttrain.workers"):
        for _ in range(2):
            forward(stream(["WARNING A", "WARNING B"]))
    assert [r.getMessage().split("] ")[1] for r in caplog.records] == ["WARNING A", "WARNING B", "WARNING B"]
