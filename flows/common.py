"""What every pipeline flow shares: its run name, its MLflow parent run, its stage tasks and its summary."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.runtime import flow_run

from engine.config import PipelineConfig
from engine.logs import show_on_stderr
from engine.stages import StageResult
from engine.tracking import StageRun, Tracker
from flows import artifacts
from tasks.runner import stage_task_options


def flow_run_name() -> str:
    """'<pipeline> · <config> · <UTC time>', e.g. 'grpo-pipeline · grpo_tiny · 2026-11-27 13:45'."""
    config = flow_run.parameters.get("config")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return f"{flow_run.flow_name} · {Path(str(config or 'default')).stem} · {when}"


class PipelineRun:
    """Opens the MLflow parent run, runs stage tasks with the configured retries, and closes with the summary."""

    def __init__(self, pipeline: str, config: str, cfg: PipelineConfig):
        # posttrain's INFO lines (resumed from step N, progress) pass in every flow run, a deployment's too: Prefect
        # adds its handlers to the logger (PREFECT_LOGGING_EXTRA_LOGGERS) but leaves its level at the root's WARNING
        show_on_stderr()
        self.pipeline = pipeline
        self.config = config
        self.cfg = cfg
        self.started = time.monotonic()
        self.stages: dict[str, StageResult] = {}
        self.run_id = flow_run.get_id() or "local"
        self.tracker = Tracker.from_config(cfg)
        self.parent: StageRun = self.tracker.start_pipeline(cfg, run_name=f"{pipeline}-{self.run_id[:8]}")
        self.task_options = stage_task_options(cfg)

    def stage(self, stage_task: Task, *args: Any) -> StageResult:
        """Run a stage task; its state is kept whether the stage ran or was found committed (a ``Cached`` state)."""
        result = stage_task.with_options(**self.task_options)(*args, return_state=True).result()
        self.stages[result.name] = result
        return result

    def finish(self, status: str) -> dict[str, Any]:
        self.parent.log_metrics(
            {f"{name}/{k}": v for name, r in self.stages.items() for k, v in r.ref.metrics.items()}, step=0
        )
        self.parent.finish("FINISHED" if status == "completed" else "FAILED")
        summary = {
            "pipeline": self.pipeline,
            "status": status,
            "run_id": self.run_id,
            "mlflow_run_id": self.parent.run_id,
            "tracking": self.parent.links,
            "wall_seconds": round(time.monotonic() - self.started, 2),
            "stages": {
                name: {"artifact": r.ref.uri, "cached": r.cached, "metrics": r.ref.metrics}
                for name, r in self.stages.items()
            },
        }
        artifacts.publish(summary, self.config, self.tracker.run_url(self.parent.run_id), self.cfg.tracking.uri)
        return summary
