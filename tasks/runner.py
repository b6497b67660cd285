"""How a Prefect task runs a stage: here in the task's process (Ray driver), or as a Ray job in the cluster.

Both ways call the same ``engine.stages`` function. Where runs report to a Prefect server, that happens under a
Prefect global concurrency lock named by the stage's store prefix, so two runs never write the same stage
artifact at once (the second waits, then finds the first one's artifact in the cache).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Any, Iterator

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from engine import stages
from engine.config import PipelineConfig
from engine.errors import PosttrainError
from engine.storage import ArtifactRef
from tasks.prefect_api import reporting_api_url

STAGES = ("prepare_model", "prepare_data", "train_sft", "train_reward_model", "train_grpo", "train_dpo", "evaluate")


@contextmanager
def prefect_stage_lock(store_root: str, prefix: str, timeout_s: float | None) -> Iterator[None]:
    """One slot per (store, stage prefix): a Prefect global concurrency limit, created on first use."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = "posttrain-stage-" + hashlib.sha256(f"{store_root}/{prefix}".encode()).hexdigest()[:20]
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass
    # strict: a missing limit is an error, not a silent pass; a failed lease renewal (an API blip) must not kill
    # hours of training, so it is tolerated
    # (renewed in the background; a killed holder's slot is revoked by the server about a minute after it dies)
    with concurrency(
        name, occupy=1, strict=True, timeout_seconds=timeout_s, lease_duration=60, raise_on_lease_renewal_failure=False
    ):
        yield


def has_prefect_server() -> bool:
    """True where runs report to a Prefect server (deployments, `posttrain server up`). A temporary server (the plain
    CLI) revokes no expired lease, so a killed run would hold its stage lock for ever: no lock there."""
    return reporting_api_url() is not None


def open_runtime(cfg: PipelineConfig) -> stages.Runtime:
    runtime = stages.Runtime.open(cfg)
    if has_prefect_server():
        root = cfg.storage.root or ""
        runtime.lock = lambda prefix: prefect_stage_lock(root, prefix, cfg.orchestration.lock_timeout_s)
    return runtime


def run_stage(stage: str, cfg: PipelineConfig, *inputs: ArtifactRef | str | None) -> stages.StageResult:
    """Run ``engine.stages.<stage>(runtime, *inputs)`` where ``cfg.ray.submission`` says."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    if cfg.ray.submission == "job":
        from tasks.ray_job import submit_stage

        return submit_stage(stage, cfg, list(inputs))
    return getattr(stages, stage)(open_runtime(cfg), *inputs)


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
