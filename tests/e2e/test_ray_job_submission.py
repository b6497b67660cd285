"""Job-submission mode against a real Ray head on 127.0.0.1 (`ray start --head`, stopped by PID): each stage's
controller runs in the cluster as a Ray job while the Prefect task follows its logs and returns its result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, run_cli
from tests.e2e.test_sft_cli import summary_of

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    gcs, dashboard, client = free_port(), free_port(), free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the jobs' `python`
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            "--num-cpus=4",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                break
        except OSError:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray dashboard did not come up"
            time.sleep(1)
    yield {"address": f"127.0.0.1:{gcs}", "dashboard": url}
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)  # a graceful stop took 34 s here, most of it waiting on idle workers
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)


def as_job(ray_head: dict, **overrides) -> list[str]:
    """`--set` arguments for job-submission mode on the test's cluster, plus the given overrides."""
    settings = {
        "ray.address": ray_head["address"],
        "ray.submission": "job",
        "ray.dashboard_url": ray_head["dashboard"],
        **overrides,
    }
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


@pytest.mark.timeout(1400)  # ray head 120, 2 x 600
def test_sft_stage_runs_as_a_ray_job(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    tiny = {"policy.world_size": 1, "sft.max_steps": 4, "sft.val_every": 2}
    out = run_cli(["run", "sft", "--json", *as_job(ray_head, **tiny)], cwd=tmp_path)
    summary = summary_of(out)
    assert summary["stages"]["sft"]["metrics"]["steps"] == 4
    assert not summary["stages"]["sft"]["cached"]

    jobs = JobSubmissionClient(ray_head["dashboard"]).list_jobs()
    stages = {job.metadata.get("posttrain.stage"): job for job in jobs if job.metadata}
    assert {"prepare_model", "prepare_data", "train_sft"} <= set(stages)
    assert all(job.status == JobStatus.SUCCEEDED for job in stages.values())
    logs = out.stdout + out.stderr
    assert f"submitted train_sft as Ray job {stages['train_sft'].submission_id}" in logs
    assert "sft:" in logs  # the job's own progress lines, followed by the task

    user_error = run_cli(["run", "sft", *as_job(ray_head, **{"model.name": "/nonexistent/model"})], cwd=tmp_path)
    assert user_error.returncode == 2 and "model folder not found: /nonexistent/model" in user_error.stderr
