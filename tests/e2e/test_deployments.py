"""The path users take: `posttrain server up`, the README's `prefect deploy` commands, `prefect deployment run
grpo-pipeline/local`, a worker picks the run up, and the results land in the store (S3 on 127.0.0.1), MLflow and
Prefect; then the Prefect UI, in headless Chromium, shows the run and its summary."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import REPO, require_tool
from tests.e2e.conftest import prefect_task_logs

pytestmark = pytest.mark.slow

PREFECT = str(Path(sys.executable).parent / "prefect")
SCREENSHOTS = REPO / "test-artifacts"
TINY = {
    "generation.backend": "hf",  # the deployment is the subject; vLLM's start-up (twice a run) is the default run's
    "sft.max_steps": 30,
    "reward_model.max_steps": 6,
    "grpo.max_steps": 4,
    "grpo.val_every": 4,
    "grpo.checkpoint_every": 4,
    "grpo.val_size": 16,
    "evaluate.size": 16,
}


def prefect(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PREFECT, *args], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )


def client_for(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        return get_client(sync_client=True)


def flow_run_id(output: str) -> str:
    match = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert match, output
    return match.group(1)


def readme_prefect_commands() -> list[list[str]]:
    """The README's `prefect deploy` and `prefect work-pool create` lines, in its order, as written."""
    lines = [line.split("  #")[0].strip() for line in (REPO / "README.md").read_text().splitlines()]
    pattern = re.compile(r"(\.venv/bin/)?prefect (--no-prompt deploy|work-pool create) ")
    return [shlex.split(line)[1:] for line in lines if pattern.match(line)]


@pytest.fixture(scope="module")
def deployed(services):
    """The README's commands after `posttrain server up`: the local deployments first (all that a fresh local server
    can take), then the cloud pools and their deployments."""
    commands = readme_prefect_commands()
    assert commands[0] == ["--no-prompt", "deploy", "--name", "local"] and len(commands) == 6, commands
    for args in commands:
        done = prefect(args, services.env, timeout=600)
        assert done.returncode == 0, f"prefect {' '.join(args)}: " + done.stdout[-3000:] + done.stderr[-3000:]
    return services


def run_on_worker(services, deployment: str, params: dict, worker_env: dict, while_running=None) -> str:
    """`prefect deployment run` with the flat parameters as the README gives them (`-p config=grpo_tiny
    -p overrides='{...}'`), then one `prefect worker start --run-once` that executes it; the flow run id.
    ``while_running(run_id)`` is called once a stage of the run is under way."""
    flat = [arg for key, value in params.items() for arg in ("-p", f"{key}={as_param(value)}")]
    started = prefect(["deployment", "run", deployment, *flat], services.env)
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = flow_run_id(started.stdout)
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "local", "--type", "process", "--run-once"],
        cwd=REPO,
        env={**os.environ, **services.env, **worker_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if while_running is not None:
        wait_for_a_running_stage(services.api, run_id, worker)
        while_running(run_id)
    stdout, stderr = worker.communicate(timeout=1500)
    assert worker.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return run_id


def as_param(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def wait_for_a_running_stage(api: str, run_id: str, worker: subprocess.Popen, timeout_s: float = 600) -> None:
    import time

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    with client_for(api) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            if any(run.name.startswith("train_sft") and run.state and run.state.is_running() for run in runs):
                return
            assert worker.poll() is None and time.monotonic() < deadline, "the run never reached its SFT stage"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def completed_run(deployed, s3_endpoint, tmp_path_factory):
    import boto3

    bucket = "deployment-test"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    overrides = {
        **TINY,
        "storage.root": f"s3://{bucket}/runs",
        "storage.endpoint_url": s3_endpoint,
        "workdir": str(tmp_path_factory.mktemp("flow-workdir")),
        "tracking.registered_model": "tiny-grpo",
    }
    restarts = []

    def restart_the_prefect_server(run_id: str) -> None:
        """Mid-SFT, the server stops and starts again on its database, as an upgrade or a crash would have it."""
        from urllib.parse import urlparse

        from flows import services

        port = urlparse(deployed.api).port
        assert services.stop_service(deployed.workdir, "prefect-server")
        services.start_prefect_server(deployed.workdir, services.Ports(prefect=port))
        restarts.append(run_id)

    params = {"config": "grpo_tiny", "overrides": overrides}
    run_id = run_on_worker(deployed, "grpo-pipeline/local", params, {}, while_running=restart_the_prefect_server)
    assert restarts == [run_id]
    return SimpleNamespace(id=run_id, bucket=bucket, endpoint=s3_endpoint)


@pytest.mark.timeout(2100)  # services 300, deploy 1800
def test_the_readme_deploy_commands_register_every_deployment(deployed):
    expected = set()
    for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]:
        expected.add((d["entrypoint"].split(":")[1].replace("_", "-"), d["name"]))
    with client_for(deployed.api) as client:
        got = {(client.read_flow(d.flow_id).name, d.name) for d in client.read_deployments()}
        schema = client.read_deployments()[0].parameter_openapi_schema
    assert got == expected
    assert set(schema["properties"]) == {"config", "overrides", "resume"}  # flat: the UI's run form
    assert "dotted keys" in schema["properties"]["overrides"]["description"]


@pytest.mark.timeout(3900)  # services 300, deploy 1800, run 1800
def test_grpo_pipeline_deployment_runs_on_a_worker(completed_run, deployed):
    """The run completes through a restart of the Prefect server (``completed_run``), and its final state, task
    states, artifacts, committed models, MLflow runs and registered versions are all recorded."""
    from mlflow.tracking import MlflowClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from engine.config import StorageConfig
    from engine.storage import ArtifactStore

    with client_for(deployed.api) as client:
        run = client.read_flow_run(completed_run.id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    assert run.state.is_completed(), run.state
    logs = prefect_task_logs(deployed.api, str(run.id))
    # posttrain's own lines are in the task's log of the UI, the progress as lines (no bar off a terminal)
    assert any(log.name == "posttrain.progress" and "sft: step 30/30" in log.message for log in logs)
    assert run.name.startswith("grpo-pipeline · grpo_tiny · ")
    by_key = {a.key: a for a in artifacts}
    assert {"grpo-pipeline-summary", "model-sft", "model-grpo"} <= set(by_key)
    summary = by_key["grpo-pipeline-summary"].data
    assert "# grpo-pipeline: completed" in summary and "| grpo | ran |" in summary

    store = ArtifactStore.from_config(
        StorageConfig(root=f"s3://{completed_run.bucket}/runs", endpoint_url=completed_run.endpoint), "/unused"
    )
    for stage in ("sft", "grpo"):
        uri = re.search(rf"\| {stage} \| ran \| `(s3://[^`]+)` \|", summary).group(1)
        assert store.is_committed(uri), f"{stage} artifact not committed: {uri}"

    mlflow = MlflowClient(tracking_uri=deployed.env["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name("posttrain")
    parents = mlflow.search_runs([experiment.experiment_id], "tags.`posttrain.pipeline` = 'grpo-pipeline'")
    assert len(parents) == 1
    metrics = parents[0].data.metrics
    assert {"grpo/reward_mean_last", "evaluate/accuracy_final", "sft/val_loss_last"} <= set(metrics)
    versions = mlflow.search_model_versions("name='tiny-grpo'")  # each committed model, in the model registry
    assert sorted(v.tags["posttrain.stage"] for v in versions) == ["grpo", "sft"]
    assert all(store.is_committed(v.source) for v in versions)


@pytest.mark.timeout(4200)  # services 300, deploy 1800, run 1800, 300
def test_a_bad_parameter_fails_before_any_stage_starts(deployed):
    rejected = prefect(
        ["deployment", "run", "grpo-pipeline/local", "--params", json.dumps({"overrides": [1]})],
        deployed.env,
    )
    assert rejected.returncode != 0 and "overrides" in rejected.stdout + rejected.stderr  # schema check

    bad = {"config": "grpo_tiny", "overrides": {"grpo.max_stepz": 3}}
    run_id = run_on_worker(deployed, "grpo-pipeline/local", bad, {})
    with client_for(deployed.api) as client:
        run = client.read_flow_run(run_id)
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert run.state.is_failed()
    assert "unknown config key 'grpo.max_stepz' (did you mean 'grpo.max_steps'?)" in run.state.message
    assert tasks == []


@pytest.mark.timeout(4100)  # services 300, deploy 1800, run 1800, browser
def test_prefect_ui_shows_the_run_and_its_summary(completed_run, deployed):
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(exist_ok=True)
    with client_for(deployed.api) as client:
        name = client.read_flow_run(completed_run.id).name
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=require_tool(
                shutil.which("chromium"), "chromium", "run `make browser` (Debian's chromium)"
            ),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{deployed.ui}/runs/flow-run/{completed_run.id}")
            page.get_by_text(name).first.wait_for(timeout=60_000)
            page.get_by_text("Completed").first.wait_for(timeout=30_000)
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("grpo-pipeline-summary").first.wait_for(timeout=30_000)
            page.screenshot(path=str(SCREENSHOTS / "prefect-flow-run.png"))
            page.get_by_text("grpo-pipeline-summary").first.click()
            page.get_by_text("grpo-pipeline: completed").first.wait_for(timeout=30_000)
            page.screenshot(path=str(SCREENSHOTS / "prefect-summary-artifact.png"), full_page=True)
        finally:
            browser.close()
    assert (SCREENSHOTS / "prefect-flow-run.png").stat().st_size > 10_000


@pytest.mark.timeout(1200)  # services 300, lock waits 840
def test_two_runs_of_one_stage_take_turns(services):
    """The stage lock (a Prefect global concurrency limit per store + stage key) admits one holder at a time, and
    another stage key is not blocked. Ordered by events, not by timings: Prefect's client may delay one
    acquisition in a process while another of the same process waits."""
    import threading
    import time

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.stage_lock import prefect_stage_lock

    root, stage, other = "s3://bucket/runs", "stages/sft/abc", "stages/sft/def"
    held, release = threading.Event(), threading.Event()
    released_at: list[float] = []

    def first_run() -> None:
        with temporary_settings({PREFECT_API_URL: services.api}):
            with prefect_stage_lock(root, stage, timeout_s=120):
                held.set()
                release.wait(timeout=300)
                released_at.append(time.monotonic())

    holder = threading.Thread(target=first_run)
    holder.start()
    try:
        assert held.wait(timeout=120)
        with temporary_settings({PREFECT_API_URL: services.api}):
            with prefect_stage_lock(root, other, timeout_s=120):
                assert not released_at  # another stage key: granted while the first run holds its own
            with pytest.raises(TimeoutError):
                with prefect_stage_lock(root, stage, timeout_s=3):
                    pytest.fail("the same stage key was granted while the first run held it")
            release.set()
            with prefect_stage_lock(root, stage, timeout_s=120):
                granted_at = time.monotonic()  # granted once the first run has let go
    finally:
        release.set()
        holder.join(timeout=300)
    assert released_at and granted_at >= released_at[0]
