"""Prefect tasks for the training stages: thin wrappers that resolve inputs and call the engine."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from engine import stages
from engine.config import PipelineConfig
from engine.storage import ArtifactRef


@task(name="train_sft", cache_policy=NO_CACHE)
def train_sft(
    cfg: PipelineConfig, model: ArtifactRef, data: ArtifactRef, parent_run_id: str | None
) -> stages.StageResult:
    return stages.train_sft(stages.Runtime.open(cfg), model, data, parent_run_id)
