"""The MLflow server stopped mid-run and started again (by PID, same database): logging never raises nor stalls the
loop, one line says metrics are kept, and every metric is in MLflow once the server answers."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

from engine.config import TrackingConfig
from engine.tracking import Tracker
from tests.conftest import free_port


def start_mlflow(port: int, folder: Path) -> subprocess.Popen:
    from tasks.prefect_api import answers

    mlflow = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not answers(f"http://127.0.0.1:{port}/health"):
        assert server.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
        time.sleep(0.5)
    return server


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=60)


def test_metrics_logged_while_mlflow_is_down_arrive_when_it_returns(tmp_path, caplog):
    port = free_port()
    server = start_mlflow(port, tmp_path)
    try:
        tracker = Tracker(TrackingConfig(uri=f"http://127.0.0.1:{port}", flush_every=1), tmp_path / "artifacts")
        run = tracker.start_stage(None, "sft", {"sft": {"max_steps": 6}})
        for step in (1, 2, 3):
            run.log_metrics({"train/loss": 1.0 / step}, step=step)
        stop(server)
        with caplog.at_level(logging.WARNING, logger="posttrain.tracking"):
            started = time.monotonic()
            for step in (4, 5, 6):
                run.log_metrics({"train/loss": 1.0 / step}, step=step)
            assert time.monotonic() - started < 20  # a few seconds for the first try, then no waiting at all
            server = start_mlflow(port, tmp_path)
            run.finish()
        warnings = [r.getMessage() for r in caplog.records if r.name == "posttrain.tracking"]
        assert len(warnings) == 2 and "metrics are kept" in warnings[0] and "answers again" in warnings[1]
        history = tracker.client.get_metric_history(run.run_id, "train/loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
        assert tracker.client.get_run(run.run_id).info.status == "FINISHED"
    finally:
        stop(server)
