"""Prefect tasks that bring the inputs of a pipeline into the store: the base model and the dataset."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from engine import stages
from engine.config import PipelineConfig
from tasks.runner import TaskOutcome, run_stage


@task(name="prepare_model", cache_policy=NO_CACHE)
def prepare_model(cfg: PipelineConfig) -> TaskOutcome:
    return run_stage(stages.prepare_model, cfg)


@task(name="prepare_data", cache_policy=NO_CACHE)
def prepare_data(cfg: PipelineConfig) -> TaskOutcome:
    return run_stage(stages.prepare_data, cfg)
