"""How a Prefect task runs a stage: here in the task's process (Ray driver), or as a Ray job in the cluster.

Both ways call the same ``engine.stages`` function, under the stage lock where runs report to a Prefect server
(``tasks.stage_lock``).
"""

from __future__ import annotations

from typing import Any, Callable

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import Completed, State

from engine import stages
from engine.config import PipelineConfig
from engine.errors import PosttrainError
from engine.logs import progress_reported_to
from engine.storage import ArtifactRef
from tasks.prefect_api import reporting_api_url
from tasks.progress import ProgressArtifact
from tasks.stage_lock import open_runtime


def has_prefect_server() -> bool:
    """True where runs report to a Prefect server (deployments, `posttrain server up`). A temporary server (the plain
    CLI) revokes no expired lease, so a killed run would hold its stage lock for ever: no lock there."""
    return reporting_api_url() is not None


StageInput = ArtifactRef | str | bool | None
TaskOutcome = stages.StageResult | State


def run_stage(stage: Callable[..., stages.StageResult], cfg: PipelineConfig, *inputs: StageInput) -> TaskOutcome:
    """Run ``stage(runtime, *inputs)`` (a function of ``engine.stages``) where ``cfg.ray.submission`` says."""
    if cfg.ray.submission == "job":
        from tasks.ray_job import submit_stage

        return task_outcome(submit_stage(stage, cfg, list(inputs)))
    with progress_reported_to(ProgressArtifact()):
        return task_outcome(stage(open_runtime(cfg, reporting_api_url()), *inputs))


def task_outcome(result: stages.StageResult) -> TaskOutcome:
    """A stage found committed ends its task in a completed state named ``Cached``: in the Prefect UI a cache hit
    does not look like a run. Callers take the result from the state (``return_state=True``, ``state.result()``)."""
    if result.cached:
        return Completed(data=result, name="Cached", message=f"{result.name}: committed by an earlier run")
    return result


def retry_on_infrastructure_failure(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry a stage unless it failed on the user's input (bad config, data, model): that fails the same again."""
    try:
        state.result()
    except PosttrainError:
        return False
    except Exception:
        return True
    return False


def stage_task_options(cfg: PipelineConfig) -> dict[str, Any]:
    """Prefect task options from the config (``task.with_options(**stage_task_options(cfg))``)."""
    orchestration = cfg.orchestration
    return {
        "retries": orchestration.retries,
        "retry_delay_seconds": orchestration.retry_delay_s,
        "timeout_seconds": orchestration.stage_timeout_s,
        "retry_condition_fn": retry_on_infrastructure_failure,
    }


def prefect_api_env() -> dict[str, str]:
    """The Prefect API a submitted job reports its lock to (none for a temporary server)."""
    url = reporting_api_url()
    return {"PREFECT_API_URL": url} if url else {}
