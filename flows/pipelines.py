"""The pipelines, and one flow per stage (each runs its upstream stages, which are cached once done).

grpo-pipeline: prepare -> [sft] -> [reward_model] -> grpo -> evaluate
dpo-pipeline:  prepare -> [sft] -> dpo -> evaluate
distill-pipeline: prepare -> [sft] -> distill (from distill.teacher) -> evaluate

``stages.sft: false`` starts RL or DPO from ``model.name`` itself; the reward model is trained where GRPO uses it
(``stages.reward_model: auto``) or where the config says so.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from prefect import flow

from engine.config import PipelineConfig, RunParameters
from engine.stages import StageResult, distill_teacher, preflight
from flows.common import PipelineRun, flow_run_name
from tasks.evaluate import evaluate
from tasks.prepare import prepare_data, prepare_model
from tasks.train import train_distill, train_dpo, train_grpo, train_reward_model, train_sft

F = TypeVar("F", bound=Callable[..., Any])


def _parameters_documented(fn: F) -> F:
    """Every flow takes the same flat parameters (``prefect deployment run grpo-pipeline/local -p config=grpo_tiny
    -p overrides='{"grpo.max_steps": 20}'``); Prefect reads their descriptions for the run form from the docstring."""
    described = "\n".join(
        f"        {name}: {RunParameters.model_fields[name].description}" for name in ("config", "overrides", "resume")
    )
    fn.__doc__ = f"{fn.__doc__}\n\n    Args:\n{described}\n"
    return fn


def _run(
    pipeline: str,
    stages: Callable[[PipelineRun, PipelineConfig], Any],
    config: str,
    overrides: dict[str, Any] | None,
    resume: str | None,
) -> dict:
    cfg = RunParameters(config=config, overrides=overrides or {}, resume=resume).resolve()
    preflight(cfg)  # a bad parameter fails here, before any stage starts
    run = PipelineRun(pipeline, config, cfg)
    try:
        stages(run, cfg)
    except BaseException:
        run.finish("failed")
        raise
    return run.finish("completed")


def _start(run: PipelineRun, cfg: PipelineConfig) -> tuple[StageResult, StageResult]:
    """The model later stages start from (the SFT model, or with stages.sft=false the base model) and the data."""
    model = run.stage(prepare_model, cfg)
    data = run.stage(prepare_data, cfg)
    if not cfg.stages.sft:
        return model, data
    return run.stage(train_sft, cfg, model.ref, data.ref, run.parent.group_id), data


def _through_reward_model(run: PipelineRun, cfg: PipelineConfig) -> tuple[StageResult, StageResult, StageResult]:
    start, data = _start(run, cfg)
    return start, data, run.stage(train_reward_model, cfg, start.ref, data.ref, run.parent.group_id)


def _grpo_stages(run: PipelineRun, cfg: PipelineConfig) -> tuple[StageResult, StageResult, StageResult]:
    start, data = _start(run, cfg)
    reward_model = None
    if cfg.trains_reward_model():
        reward_model = run.stage(train_reward_model, cfg, start.ref, data.ref, run.parent.group_id).ref
    return start, data, run.stage(train_grpo, cfg, start.ref, data.ref, reward_model, run.parent.group_id)


def _dpo_stages(run: PipelineRun, cfg: PipelineConfig) -> tuple[StageResult, StageResult, StageResult]:
    start, data = _start(run, cfg)
    return start, data, run.stage(train_dpo, cfg, start.ref, data.ref, run.parent.group_id)


def _distill_stages(run: PipelineRun, cfg: PipelineConfig) -> tuple[StageResult, StageResult, StageResult]:
    distill_teacher(cfg)  # a missing teacher fails before the student's SFT
    start, data = _start(run, cfg)
    return start, data, run.stage(train_distill, cfg, start.ref, data.ref, run.parent.group_id)


def _evaluated(stages: Callable, preference: bool) -> Callable[[PipelineRun, PipelineConfig], None]:
    def run_all(run: PipelineRun, cfg: PipelineConfig) -> None:
        start, data, final = stages(run, cfg)
        start_name = "sft" if cfg.stages.sft else "base"
        run.stage(evaluate, cfg, start.ref, final.ref, data.ref, run.parent.group_id, start_name, preference)

    return run_all


@flow(name="grpo-pipeline", flow_run_name=flow_run_name)
@_parameters_documented
def grpo_pipeline(
    config: str = "grpo_tiny", overrides: dict[str, Any] | None = None, resume: str | None = None
) -> dict:
    """prepare -> [SFT] -> [reward model] -> GRPO -> evaluate."""
    return _run("grpo-pipeline", _evaluated(_grpo_stages, preference=False), config, overrides, resume)


@flow(name="dpo-pipeline", flow_run_name=flow_run_name)
@_parameters_documented
def dpo_pipeline(config: str = "dpo_tiny", overrides: dict[str, Any] | None = None, resume: str | None = None) -> dict:
    """prepare -> [SFT] -> DPO -> evaluate."""
    return _run("dpo-pipeline", _evaluated(_dpo_stages, preference=True), config, overrides, resume)


@flow(name="distill-pipeline", flow_run_name=flow_run_name)
@_parameters_documented
def distill_pipeline(
    config: str = "distill_tiny", overrides: dict[str, Any] | None = None, resume: str | None = None
) -> dict:
    """prepare -> [SFT of the student] -> distill from distill.teacher -> evaluate."""
    return _run("distill-pipeline", _evaluated(_distill_stages, preference=False), config, overrides, resume)


@flow(name="sft", flow_run_name=flow_run_name)
@_parameters_documented
def sft(config: str = "sft_tiny", overrides: dict[str, Any] | None = None, resume: str | None = None) -> dict:
    """prepare -> SFT."""
    return _run("sft", _start, config, overrides, resume)


@flow(name="reward-model", flow_run_name=flow_run_name)
@_parameters_documented
def reward_model(config: str = "grpo_tiny", overrides: dict[str, Any] | None = None, resume: str | None = None) -> dict:
    """prepare -> [SFT] -> reward model."""
    return _run("reward-model", _through_reward_model, config, overrides, resume)


@flow(name="grpo", flow_run_name=flow_run_name)
@_parameters_documented
def grpo(config: str = "grpo_tiny", overrides: dict[str, Any] | None = None, resume: str | None = None) -> dict:
    """prepare -> [SFT] -> [reward model] -> GRPO, no evaluation."""
    return _run("grpo", _grpo_stages, config, overrides, resume)


@flow(name="dpo", flow_run_name=flow_run_name)
@_parameters_documented
def dpo(config: str = "dpo_tiny", overrides: dict[str, Any] | None = None, resume: str | None = None) -> dict:
    """prepare -> [SFT] -> DPO, no evaluation."""
    return _run("dpo", _dpo_stages, config, overrides, resume)


@flow(name="distill", flow_run_name=flow_run_name)
@_parameters_documented
def distill(config: str = "distill_tiny", overrides: dict[str, Any] | None = None, resume: str | None = None) -> dict:
    """prepare -> [SFT of the student] -> distill, no evaluation."""
    return _run("distill", _distill_stages, config, overrides, resume)


FLOWS = {f.name: f for f in (grpo_pipeline, dpo_pipeline, distill_pipeline, sft, reward_model, grpo, dpo, distill)}
