"""Prefect tasks that bring the inputs of a pipeline into the store: the base model and the dataset."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from engine import stages
from engine.config import PipelineConfig


@task(name="prepare_model", cache_policy=NO_CACHE)
def prepare_model(cfg: PipelineConfig) -> stages.StageResult:
    return stages.prepare_model(stages.Runtime.open(cfg))


@task(name="prepare_data", cache_policy=NO_CACHE)
def prepare_data(cfg: PipelineConfig) -> stages.StageResult:
    return stages.prepare_data(stages.Runtime.open(cfg))
