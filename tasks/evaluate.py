"""The Prefect task that measures held-out accuracy before and after, and plots it."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from engine import stages
from engine.config import PipelineConfig
from engine.storage import ArtifactRef
from tasks.runner import TaskOutcome, run_stage


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(
    cfg: PipelineConfig,
    start: ArtifactRef,
    final: ArtifactRef,
    data: ArtifactRef,
    parent_run_id: str | None,
    start_name: str,
    preference: bool,
) -> TaskOutcome:
    return run_stage(stages.evaluate, cfg, start, final, data, parent_run_id, start_name, preference)
