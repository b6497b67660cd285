"""The pipelines, and one flow per stage (each runs its upstream stages, which are cached once done).

grpo-pipeline: prepare -> sft -> reward_model -> grpo -> evaluate
dpo-pipeline:  prepare -> sft -> dpo -> evaluate
"""

from __future__ import annotations

from typing import Any, Callable

from prefect import flow

from engine.config import PipelineConfig, RunParameters
from engine.stages import StageResult, preflight
from flows.common import PipelineRun, flow_run_name
from tasks.evaluate import evaluate
from tasks.prepare import prepare_data, prepare_model
from tasks.train import train_dpo, train_grpo, train_reward_model, train_sft


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


def _through_sft(run: PipelineRun, cfg: PipelineConfig) -> tuple[StageResult, StageResult]:
    model = run.stage(prepare_model, cfg)
    data = run.stage(prepare_data, cfg)
    return run.stage(train_sft, cfg, model.ref, data.ref, run.parent.run_id), data


def _through_reward_model(run: PipelineRun, cfg: PipelineConfig) -> tuple[StageResult, StageResult, StageResult]:
    sft, data = _through_sft(run, cfg)
    return sft, data, run.stage(train_reward_model, cfg, sft.ref, data.ref, run.parent.run_id)


def _grpo_stages(run: PipelineRun, cfg: PipelineConfig) -> tuple[StageResult, StageResult, StageResult]:
    sft, data, reward_model = _through_reward_model(run, cfg)
    return sft, data, run.stage(train_grpo, cfg, sft.ref, data.ref, reward_model.ref, run.parent.run_id)


def _dpo_stages(run: PipelineRun, cfg: PipelineConfig) -> tuple[StageResult, StageResult, StageResult]:
    sft, data = _through_sft(run, cfg)
    return sft, data, run.stage(train_dpo, cfg, sft.ref, data.ref, run.parent.run_id)


def _evaluated(stages: Callable) -> Callable[[PipelineRun, PipelineConfig], None]:
    def run_all(run: PipelineRun, cfg: PipelineConfig) -> None:
        sft, data, final = stages(run, cfg)
        run.stage(evaluate, cfg, sft.ref, final.ref, data.ref, run.parent.run_id)

    return run_all


@flow(name="grpo-pipeline", flow_run_name=flow_run_name)
def grpo_pipeline(params: RunParameters = RunParameters(config="grpo_tiny")) -> dict[str, Any]:
    return _run("grpo-pipeline", params, _evaluated(_grpo_stages))


@flow(name="dpo-pipeline", flow_run_name=flow_run_name)
def dpo_pipeline(params: RunParameters = RunParameters(config="dpo_tiny")) -> dict[str, Any]:
    return _run("dpo-pipeline", params, _evaluated(_dpo_stages))


@flow(name="sft", flow_run_name=flow_run_name)
def sft(params: RunParameters = RunParameters(config="sft_tiny")) -> dict[str, Any]:
    return _run("sft", params, _through_sft)


@flow(name="reward-model", flow_run_name=flow_run_name)
def reward_model(params: RunParameters = RunParameters(config="grpo_tiny")) -> dict[str, Any]:
    return _run("reward-model", params, _through_reward_model)


@flow(name="grpo", flow_run_name=flow_run_name)
def grpo(params: RunParameters = RunParameters(config="grpo_tiny")) -> dict[str, Any]:
    return _run("grpo", params, _grpo_stages)


@flow(name="dpo", flow_run_name=flow_run_name)
def dpo(params: RunParameters = RunParameters(config="dpo_tiny")) -> dict[str, Any]:
    return _run("dpo", params, _dpo_stages)


FLOWS = {f.name: f for f in (grpo_pipeline, dpo_pipeline, sft, reward_model, grpo, dpo)}
