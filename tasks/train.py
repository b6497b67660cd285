"""Prefect tasks for the training stages: thin wrappers that hand the stage to ``tasks.runner``."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from engine import stages
from engine.config import PipelineConfig
from engine.storage import ArtifactRef
from tasks.runner import TaskOutcome, run_stage


@task(name="train_sft", cache_policy=NO_CACHE)
def train_sft(cfg: PipelineConfig, model: ArtifactRef, data: ArtifactRef, parent_run_id: str | None) -> TaskOutcome:
    return run_stage(stages.train_sft, cfg, model, data, parent_run_id)


@task(name="train_reward_model", cache_policy=NO_CACHE)
def train_reward_model(
    cfg: PipelineConfig, sft: ArtifactRef, data: ArtifactRef, parent_run_id: str | None
) -> TaskOutcome:
    return run_stage(stages.train_reward_model, cfg, sft, data, parent_run_id)


@task(name="train_grpo", cache_policy=NO_CACHE)
def train_grpo(
    cfg: PipelineConfig,
    sft: ArtifactRef,
    data: ArtifactRef,
    reward_model: ArtifactRef | None,
    parent_run_id: str | None,
) -> TaskOutcome:
    return run_stage(stages.train_grpo, cfg, sft, data, reward_model, parent_run_id)


@task(name="train_distill", cache_policy=NO_CACHE)
def train_distill(
    cfg: PipelineConfig, student: ArtifactRef, data: ArtifactRef, parent_run_id: str | None
) -> TaskOutcome:
    return run_stage(stages.train_distill, cfg, student, data, parent_run_id)


@task(name="train_dpo", cache_policy=NO_CACHE)
def train_dpo(cfg: PipelineConfig, sft: ArtifactRef, data: ArtifactRef, parent_run_id: str | None) -> TaskOutcome:
    return run_stage(stages.train_dpo, cfg, sft, data, parent_run_id)
