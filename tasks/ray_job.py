"""Job-submission mode: a stage's controller runs inside the Ray cluster as a Ray job.

The Prefect task submits ``python -m tasks.ray_job <payload>`` through the Jobs API (the dashboard address),
streams the job's log lines into the task's log, waits for a terminal status, and returns the stage result that
the job prints as its last line. The job connects to its own cluster (``address: auto``) and runs the same
``engine.stages`` function a driver-mode task would; it needs Prefect only to take the stage lock on a server the
task names (``PREFECT_API_URL`` in its environment).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from typing import Any, Callable

from engine import stages
from engine.config import PipelineConfig
from engine.errors import PosttrainError
from engine.logs import PROGRESS_LOGGER
from engine.storage import ArtifactRef
from tasks.progress import ProgressArtifact

RESULT_MARK = "POSTTRAIN_STAGE_RESULT "
USER_ERROR_MARK = "POSTTRAIN_USER_ERROR "
# what a payload may name: the stage functions, by their names
STAGES: dict[str, Callable[..., stages.StageResult]] = {
    fn.__name__: fn
    for fn in (
        stages.prepare_model,
        stages.prepare_data,
        stages.train_sft,
        stages.train_reward_model,
        stages.train_grpo,
        stages.train_dpo,
        stages.train_distill,
        stages.evaluate,
    )
}


class RayJobFailed(RuntimeError):
    """The stage job ended FAILED or STOPPED for a reason other than the user's input (Prefect may retry)."""


def encode_payload(stage: Callable[..., stages.StageResult], cfg: PipelineConfig, inputs: list[Any]) -> str:
    if STAGES.get(stage.__name__) is not stage:
        raise ValueError(f"{stage.__name__} is not a stage of engine.stages")
    payload = {
        "stage": stage.__name__,
        "config": cfg.redacted(),  # the job runs in the environment that carries the secrets: none travel here
        "inputs": [i.model_dump(mode="json") if isinstance(i, ArtifactRef) else i for i in inputs],
    }
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def decode_payload(text: str) -> tuple[Callable[..., stages.StageResult], PipelineConfig, list[Any]]:
    payload = json.loads(base64.urlsafe_b64decode(text.encode()))
    config = payload["config"]
    config["ray"].update(address="auto", submission="driver")  # inside the cluster, the job is the driver
    inputs = [ArtifactRef.model_validate(i) if isinstance(i, dict) else i for i in payload["inputs"]]
    return STAGES[payload["stage"]], PipelineConfig.model_validate(config), inputs


def dashboard_url(cfg: PipelineConfig) -> str:
    """The Jobs API: ``ray.dashboard_url``, else RAY_API_SERVER_ADDRESS, else port 8265 on the head's host."""
    if cfg.ray.dashboard_url:
        return cfg.ray.dashboard_url
    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        return os.environ["RAY_API_SERVER_ADDRESS"]
    if cfg.ray.address.startswith("ray://"):
        return f"http://{cfg.ray.address.removeprefix('ray://').rsplit(':', 1)[0]}:8265"
    raise PosttrainError("ray.submission=job needs ray.dashboard_url (the Jobs API, e.g. http://head:8265)")


def submit_stage(
    stage: Callable[..., stages.StageResult], cfg: PipelineConfig, inputs: list[Any]
) -> stages.StageResult:
    from ray.job_submission import JobStatus, JobSubmissionClient

    from tasks.runner import prefect_api_env

    log = _task_logger()
    url = dashboard_url(cfg)
    name = stage.__name__
    try:
        client = JobSubmissionClient(url)
    except Exception as exc:  # the Jobs API is unreachable: infrastructure, so Prefect may retry
        raise RayJobFailed(f"cannot reach the Ray Jobs API at {url} (ray.dashboard_url): {exc}") from exc
    runtime_env = dict(cfg.ray.job_runtime_env)
    runtime_env["env_vars"] = {**prefect_api_env(), **runtime_env.get("env_vars", {})}
    job_id = client.submit_job(
        entrypoint="python -m tasks.ray_job " + encode_payload(stage, cfg, inputs),  # the cluster's python
        runtime_env=runtime_env,
        metadata={"posttrain.stage": name, "posttrain.pipeline": cfg.name},
    )
    log.info("submitted %s as Ray job %s at %s", name, job_id, url)
    marked = asyncio.run(_follow(client, job_id, log, ProgressArtifact()))  # returns when the job has ended
    status = client.get_job_status(job_id)
    for line in reversed(marked):
        if line.startswith(USER_ERROR_MARK):
            raise PosttrainError(line.removeprefix(USER_ERROR_MARK))
        if status == JobStatus.SUCCEEDED and line.startswith(RESULT_MARK):
            return stages.StageResult.model_validate_json(line.removeprefix(RESULT_MARK))
    info = client.get_job_info(job_id)
    raise RayJobFailed(f"Ray job {job_id} ({name}) ended {status}: {info.message or 'no result line'}")


async def _follow(client, job_id: str, log, progress: ProgressArtifact) -> list[str]:
    """Stream the job's log into the task's log until the job ends, its progress lines into the stage's progress
    artifact; return its result/error lines."""
    marked: list[str] = []

    async def handle(line: str) -> None:
        line = line.rsplit("\r", 1)[-1]  # a progress bar's latest state
        if line.startswith((RESULT_MARK, USER_ERROR_MARK)):
            marked.append(line)
        elif line.strip():
            log.info("[%s] %s", job_id, line)
            if PROGRESS_LOGGER in line:  # off the event loop: Prefect's artifact calls are synchronous only outside one
                await asyncio.to_thread(progress.follow_line, line)

    pending = ""  # chunks may end mid-line
    async for chunk in client.tail_job_logs(job_id):
        *lines, pending = (pending + chunk).split("\n")
        for line in lines:
            await handle(line)
    await handle(pending)
    return marked


def _task_logger():
    import logging

    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # outside a Prefect run (e.g. called from a script)
        return logging.getLogger("posttrain.ray_job")


def main(payload: str) -> int:
    """The job's entry point, inside the cluster."""
    from engine.logs import show_on_stderr
    from tasks.stage_lock import open_runtime

    show_on_stderr()  # the job's output is followed into the task's log
    try:
        stage, cfg, inputs = decode_payload(payload)
        result = stage(open_runtime(cfg, os.environ.get("PREFECT_API_URL")), *inputs)
    except PosttrainError as exc:
        print(USER_ERROR_MARK + str(exc), flush=True)
        return 2
    print(RESULT_MARK + result.model_dump_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
