"""What every pipeline flow shares: its parameters, its MLflow parent run, and its JSON summary."""

from __future__ import annotations

import time
from typing import Any

from prefect.runtime import flow_run

from engine.config import PipelineConfig
from engine.stages import StageResult
from engine.tracking import StageRun, Tracker


class PipelineRun:
    """Opens the MLflow parent run, collects stage results, and closes with the summary."""

    def __init__(self, pipeline: str, cfg: PipelineConfig):
        self.pipeline = pipeline
        self.cfg = cfg
        self.started = time.monotonic()
        self.stages: dict[str, StageResult] = {}
        self.run_id = flow_run.get_id() or "local"
        self.parent: StageRun = Tracker.from_config(cfg).start_pipeline(cfg, run_name=f"{pipeline}-{self.run_id[:8]}")

    def add(self, result: StageResult) -> StageResult:
        self.stages[result.name] = result
        return result

    def finish(self, status: str) -> dict[str, Any]:
        self.parent.log_metrics(
            {f"{name}/{k}": v for name, r in self.stages.items() for k, v in r.ref.metrics.items()}, step=0
        )
        self.parent.finish("FINISHED" if status == "completed" else "FAILED")
        return {
            "pipeline": self.pipeline,
            "status": status,
            "run_id": self.run_id,
            "mlflow_run_id": self.parent.run_id,
            "wall_seconds": round(time.monotonic() - self.started, 2),
            "stages": {
                name: {"artifact": r.ref.uri, "cached": r.cached, "metrics": r.ref.metrics}
                for name, r in self.stages.items()
            },
        }
