"""The Prefect task that measures held-out accuracy before and after, and plots it."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from engine.config import PipelineConfig
from engine.stages import StageResult
from engine.storage import ArtifactRef
from tasks.runner import run_stage


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(
    cfg: PipelineConfig, sft: ArtifactRef, final: ArtifactRef, data: ArtifactRef, parent_run_id: str | None
) -> StageResult:
    return run_stage("evaluate", cfg, sft, final, data, parent_run_id)
