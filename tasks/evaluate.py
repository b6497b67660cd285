"""The Prefect task that measures held-out accuracy before and after, and plots it."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from engine import stages
from engine.config import PipelineConfig
from engine.storage import ArtifactRef


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(
    cfg: PipelineConfig, sft: ArtifactRef, final: ArtifactRef, data: ArtifactRef, parent_run_id: str | None
) -> stages.StageResult:
    return stages.evaluate(stages.Runtime.open(cfg), sft, final, data, parent_run_id)
