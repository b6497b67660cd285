"""Tracking: one parent run per pipeline run, one nested run per stage, in MLflow and the other configured sinks.

MLflow runs are addressed explicitly through ``MlflowClient`` (no global active run), so a stage run can be
opened from any process that knows the parent's id. Per-step metrics are buffered and sent with
``log_batch`` (one call per ``flush_every`` steps: a single ``log_metric`` costs 4-67 ms). TensorBoard and W&B
(``tracking.sinks``, engine/tracking_sinks.py) receive the same params and metrics as they are logged.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import subprocess
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from engine.caching import code_version
from engine.config import PipelineConfig, TrackingConfig
from engine.secrets import redact
from engine.tracking_sinks import SinkRun, check_installed, open_sink_runs

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# MLflow retries a failed request 7 times with exponential back-off by default (minutes against a server that is
# down); StageRun keeps the metrics and retries itself, so a call gives up within seconds
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

log = logging.getLogger("posttrain.tracking")
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start and stop lines, once per stage
_MAX_PARAM_CHARS = 6000
_MAX_BATCH = 100
# MLflow's UI opens an experiment tagged so in its model-training view (untagged, it guesses GenAI)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
SOURCE_ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def source_tags() -> dict[str, str]:
    """Where the code of a run comes from: MLflow's source tags (the runs table's Source column), the user, the
    engine's code version (the one in stage keys) and, in a git checkout, its commit."""
    tags = {
        "mlflow.source.type": "JOB",
        "mlflow.source.name": "posttrain",
        "mlflow.user": getpass.getuser(),
        "posttrain.code_version": code_version(),
    }
    try:
        commit = subprocess.run(
            ["git", "-C", str(SOURCE_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return tags
    if commit.returncode == 0:
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
    return tags


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} as MLflow params."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:_MAX_PARAM_CHARS]
    return flat


def open_store(cfg: TrackingConfig) -> None:
    """Open the tracking store ahead of the first run. MLflow keeps one store per URI for the process, and a SQL
    store takes about 2 s to import and connect: the CLI opens it while Prefect's temporary server starts."""
    if cfg.enabled and "mlflow" in cfg.sinks:
        MlflowClient(tracking_uri=cfg.uri)


class StageRun:
    """A run (pipeline or stage) with buffered MLflow metrics, mirrored to the other sinks' runs.

    Training never waits on, or fails for, the tracking server: metrics that cannot be sent stay in a bounded buffer
    (one warning line when the server stops answering), are sent again at most every ``RETRY_EVERY_S`` and when the
    run finishes, and one line says when they went through."""

    RETRY_EVERY_S = 30.0
    MAX_BUFFERED = 1_000_000  # metrics; beyond it the oldest are dropped, and counted

    def __init__(self, client: MlflowClient | None, run_id: str | None, flush_every: int):
        self.client = client
        self.run_id = run_id
        self.flush_every = flush_every
        self.mirrors: dict[str, SinkRun] = {}
        self.system_metrics: Any = None  # MLflow's SystemMetricsMonitor while the run lasts
        # the pipeline run's stages are grouped under this id in every sink: MLflow's run id where MLflow tracks
        self.group_id = run_id or uuid.uuid4().hex
        self._pending: list[Metric] = []
        self._steps_pending = 0
        self._unreachable_since: float | None = None
        self._dropped = 0

    @property
    def links(self) -> dict[str, str]:
        """Where each sink keeps this run: MLflow's run id, TensorBoard's folder, W&B's run path or folder."""
        mlflow = {"mlflow": self.run_id} if self.run_id else {}
        return {**mlflow, **{name: run.link for name, run in self.mirrors.items()}}

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten(redact(dict(params)))
        for mirror in self.mirrors.values():
            mirror.log_params(flat)
        if self.client is None:
            return
        items = [Param(k, v) for k, v in flat.items()]
        for start in range(0, len(items), _MAX_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _MAX_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for mirror in self.mirrors.values():
            mirror.log_metrics(metrics, step)
        if self.client is None:
            return
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._steps_pending += 1
        if self._steps_pending >= self.flush_every:
            self.flush()

    def flush(self, force: bool = False) -> None:
        if self.client is None or not self._pending:
            return
        outage = self._unreachable_since
        if outage is not None and not force and time.monotonic() - outage < self.RETRY_EVERY_S:
            self._bound()
            return
        try:
            while self._pending:  # sent in order: what went through is not sent twice
                self.client.log_batch(self.run_id, metrics=self._pending[:1000])
                del self._pending[:1000]
        except Exception as exc:  # noqa: BLE001 - the tracking server is down or unreachable: keep the metrics
            if outage is None:
                reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                log.warning("MLflow does not answer (%s); metrics are kept and sent when it does", reason)
            self._unreachable_since = time.monotonic()
            self._bound()
            return
        self._steps_pending = 0
        if outage is not None:
            self._unreachable_since = None
            log.warning("MLflow answers again: the metrics kept meanwhile are sent")

    def _bound(self) -> None:
        excess = len(self._pending) - self.MAX_BUFFERED
        if excess > 0:
            del self._pending[:excess]
            self._dropped += excess
            log.warning("MLflow has been unreachable for long: %d metrics dropped so far", self._dropped)

    def log_dataset(self, name: str, digest: str, uri: str, profile: Mapping[str, float], context: str) -> None:
        """The run's data as an MLflow dataset input (the runs table's Dataset column); ``context``: training or
        evaluation."""
        if self.client is None:
            return
        source = json.dumps({"uri": uri})
        dataset = Dataset(name, digest[:36], "posttrain_store", source, profile=json.dumps(dict(profile)))
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.client is not None:
            self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.client is not None:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is left and close the run; a tracking server still down costs the record, not the result."""
        for mirror in self.mirrors.values():
            mirror.finish(status)
        if self.client is None:
            return
        if self.system_metrics is not None:
            self.system_metrics.finish()
        self.flush(force=True)
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            log.warning(
                "MLflow run %s could not be closed (%s); %d metrics were not sent", self.run_id, exc, len(self._pending)
            )


class Tracker:
    """Opens pipeline and stage runs in one experiment of each sink; a no-op when tracking is disabled."""

    def __init__(self, cfg: TrackingConfig, artifact_root: Path):
        self.cfg = cfg
        self.client: MlflowClient | None = None
        self.experiment_id: str | None = None
        self.sinks = cfg.sinks if cfg.enabled else []
        check_installed(self.sinks)
        if "mlflow" not in self.sinks:
            return
        self.client = MlflowClient(tracking_uri=cfg.uri)
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            location = artifact_root.as_uri() if cfg.uri and cfg.uri.startswith("sqlite") else None
            self.experiment_id = self.client.create_experiment(
                cfg.experiment, artifact_location=location, tags=dict([EXPERIMENT_KIND])
            )
        else:
            self.experiment_id = experiment.experiment_id
            if EXPERIMENT_KIND[0] not in experiment.tags:  # a kind chosen in the UI stays
                self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> "Tracker":
        return cls(cfg.tracking, Path(cfg.workdir) / "mlartifacts")

    def run_url(self, run_id: str | None) -> str | None:
        """The run's page in the MLflow UI, where the tracking URI is a server."""
        uri = self.cfg.uri or ""
        if run_id is None or not uri.startswith(("http://", "https://")):
            return None
        return f"{uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def start_pipeline(self, cfg: PipelineConfig, run_name: str) -> StageRun:
        run = self._create(run_name, {"posttrain.pipeline": cfg.name}, group=None, job_type="pipeline")
        run.log_params(cfg.redacted())
        run.log_text(cfg.to_yaml(), "config.yaml")
        return run

    def start_stage(self, parent_run_id: str | None, stage: str, params: Mapping[str, Any]) -> StageRun:
        """A stage's run under the pipeline run ``parent_run_id`` (the parent's ``group_id``)."""
        tags = {"posttrain.stage": stage}
        if parent_run_id and self.client is not None:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self._create(stage, tags, group=parent_run_id or "ungrouped", job_type=stage)
        run.log_params(params)
        if self.client is not None and self.cfg.system_metrics_every_s > 0:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            run.system_metrics = SystemMetricsMonitor(
                run.run_id, sampling_interval=self.cfg.system_metrics_every_s, tracking_uri=self.cfg.uri
            )
            run.system_metrics.start()
        return run

    def register_model(self, name: str, source: str, run_id: str | None, stage: str) -> str | None:
        """A new version of registered model ``name`` pointing at a committed model (its store URI), linked to the
        stage run that trained it; returns the version."""
        if self.client is None:
            return None
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description="models committed by posttrain stages")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(name, source=source, run_id=run_id, tags={"posttrain.stage": stage})
        return version.version

    def _create(self, name: str, tags: dict[str, str], group: str | None, job_type: str) -> StageRun:
        """A run in every sink; ``group`` None opens a pipeline run, whose own id groups its stages."""
        run_id = None
        if self.client is not None:
            created = self.client.create_run(self.experiment_id, run_name=name, tags={**source_tags(), **tags})
            run_id = created.info.run_id
        run = StageRun(self.client, run_id, self.cfg.flush_every)
        if any(sink != "mlflow" for sink in self.sinks):
            run.mirrors = open_sink_runs(self.cfg, group or run.group_id, name, job_type)
        return run
