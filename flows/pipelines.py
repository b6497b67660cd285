"""The pipelines, and one flow per stage (each runs its upstream stages, which are cached once done).

grpo-pipeline: prepare -> [sft] -> [reward_model] -> grpo -> evaluate
dpo-pipeline:  prepare -> [sft] -> dpo -> evaluate
distill-pipeline: prepare -> [sft] -> distill (from distill.teacher) -> evaluate

``stages.sft: false`` starts RL or DPO from ``model.name`` itself; the reward model is trained where GRPO uses it
(``stages.reward_model: auto``) or where the config says so.
"""

from __future__ import annotations

from typing import Any, Callable

from prefect import flow

from engine.config import PipelineConfig, RunParameters
from engine.stages import StageResult, distill_teacher, preflight
from flows.common import PipelineRun, flow_run_name
from tasks.evaluate import evaluate
from tasks.prepare import prepare_data, prepare_model
from tasks.train import train_distill, train_dpo, train_grpo, train_reward_model, train_sft


def _run(pipeline: str, params: RunParameters, stages: Callable[[PipelineRun, PipelineConfig], Any]) -> dict:
    cfg = params.resolve()
    preflight(cfg)  # a bad parameter fails here, before any stage starts
    run = PipelineRun(pipeline, params.config, cfg)
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
def grpo_pipeline(params: RunParameters = RunParameters(config="grpo_tiny")) -> dict[str, Any]:
    return _run("grpo-pipeline", params, _evaluated(_grpo_stages, preference=False))


@flow(name="dpo-pipeline", flow_run_name=flow_run_name)
def dpo_pipeline(params: RunParameters = RunParameters(config="dpo_tiny")) -> dict[str, Any]:
    return _run("dpo-pipeline", params, _evaluated(_dpo_stages, preference=True))


@flow(name="distill-pipeline", flow_run_name=flow_run_name)
def distill_pipeline(params: RunParameters = RunParameters(config="distill_tiny")) -> dict[str, Any]:
    return _run("distill-pipeline", params, _evaluated(_distill_stages, preference=False))


@flow(name="sft", flow_run_name=flow_run_name)
def sft(params: RunParameters = RunParameters(config="sft_tiny")) -> dict[str, Any]:
    return _run("sft", params, _start)


@flow(name="reward-model", flow_run_name=flow_run_name)
def reward_model(params: RunParameters = RunParameters(config="grpo_tiny")) -> dict[str, Any]:
    return _run("reward-model", params, _through_reward_model)


@flow(name="grpo", flow_run_name=flow_run_name)
def grpo(params: RunParameters = RunParameters(config="grpo_tiny")) -> dict[str, Any]:
    return _run("grpo", params, _grpo_stages)


@flow(name="dpo", flow_run_name=flow_run_name)
def dpo(params: RunParameters = RunParameters(config="dpo_tiny")) -> dict[str, Any]:
    return _run("dpo", params, _dpo_stages)


@flow(name="distill", flow_run_name=flow_run_name)
def distill(params: RunParameters = RunParameters(config="distill_tiny")) -> dict[str, Any]:
    return _run("distill", params, _distill_stages)


FLOWS = {f.name: f for f in (grpo_pipeline, dpo_pipeline, distill_pipeline, sft, reward_model, grpo, dpo, distill)}
