"""The `sft` flow: prepare the base model and data, then supervised fine-tuning."""

from __future__ import annotations

from typing import Any

from prefect import flow

from engine.config import RunParameters
from engine.stages import preflight
from flows.common import PipelineRun
from tasks.prepare import prepare_data, prepare_model
from tasks.train import train_sft


@flow(name="sft", log_prints=True)
def sft(params: RunParameters = RunParameters()) -> dict[str, Any]:
    cfg = params.resolve()
    preflight(cfg)
    run = PipelineRun("sft", cfg)
    try:
        model = run.add(prepare_model(cfg))
        data = run.add(prepare_data(cfg))
        run.add(train_sft(cfg, model.ref, data.ref, run.parent.run_id))
    except BaseException:
        run.finish("failed")
        raise
    return run.finish("completed")
