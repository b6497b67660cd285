"""Trackers beside MLflow: TensorBoard event files and Weights & Biases runs that receive the same params and metrics.

MLflow stays the run of record (summaries, the model registry, the UI links); a sink mirrors what a stage logs so a
team that watches TensorBoard or W&B sees the same curves there. A pipeline run and its stage runs are grouped the way
each tool groups runs, under the pipeline run's id (MLflow's run id where MLflow tracks): TensorBoard sub-folders
``<tracking.dir>/tensorboard/<id>/<run name>``, a W&B group ``<id>`` with the stage as the job type.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Protocol

from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.config import TrackingConfig


class SinkRun(Protocol):
    """One run in one tracker."""

    link: str  # where a user finds the run: a folder, or W&B's run path

    def log_params(self, params: Mapping[str, str]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def finish(self, status: str) -> None: ...


class TensorBoardRun:
    """Scalars per metric name and the flat params as a markdown table under the ``params`` text tag."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.link = str(folder)
        self._writer = SummaryWriter(log_dir=str(folder))

    def log_params(self, params: Mapping[str, str]) -> None:
        rows = "\n".join(f"| {key} | {value} |" for key, value in sorted(params.items()))
        self._writer.add_text("params", f"| param | value |\n|---|---|\n{rows}")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, global_step=step)

    def finish(self, status: str) -> None:
        self._writer.add_text("status", status)
        self._writer.close()


class WandbRun:
    """A W&B run; ``mode`` None leaves the choice to W&B ($WANDB_MODE, else online with the logged-in key)."""

    def __init__(
        self, folder: Path, project: str, group: str, name: str, job_type: str, mode: str | None, entity: str | None
    ):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", save_code=False, silent=True)  # our logs are not W&B's to keep
        self._run = wandb.init(
            dir=str(folder), project=project, entity=entity, group=group, name=name, job_type=job_type, mode=mode,
            reinit="create_new", settings=settings,
        )  # fmt: skip
        self.link = self._run.path if self._run.settings.mode == "online" else self._run.dir
        self._last_step = -1

    def log_params(self, params: Mapping[str, str]) -> None:
        self._run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """W&B's steps only increase: what comes after the run's last step (a stage's ``final/*``) is its summary."""
        if step < self._last_step:
            self._run.summary.update(dict(metrics))
            return
        self._run.log(dict(metrics), step=step)
        self._last_step = step

    def finish(self, status: str) -> None:
        self._run.finish(exit_code=0 if status == "FINISHED" else 1)


def check_installed(sinks: list[str]) -> None:
    """One line before any run opens when a configured tracker's package is missing (they are an extra)."""
    for sink in sinks:
        if sink != "mlflow" and importlib.util.find_spec(sink) is None:
            raise ConfigError(
                f"tracking.sinks names {sink}, whose package is not installed: pip install 'posttrain[trackers]'"
            )


def open_sink_runs(cfg: "TrackingConfig", group: str, name: str, job_type: str) -> dict[str, SinkRun]:
    """The runs beside MLflow's for one pipeline run (``group``) or one of its stages, by sink name."""
    folder = Path(cfg.dir)
    runs: dict[str, SinkRun] = {}
    if "tensorboard" in cfg.sinks:
        runs["tensorboard"] = TensorBoardRun(folder / "tensorboard" / group / name)
    if "wandb" in cfg.sinks:
        project = cfg.wandb_project or cfg.experiment
        runs["wandb"] = WandbRun(folder, project, group, name, job_type, cfg.wandb_mode, cfg.wandb_entity)
    return runs
