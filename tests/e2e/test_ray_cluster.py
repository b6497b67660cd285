"""A real Ray head on 127.0.0.1 (`ray start --head`, stopped by PID) that declares two GPUs on this CPU machine.

Job-submission mode: each stage's controller runs in the cluster as a Ray job while the Prefect task follows its
logs and returns its result; its trainers reserve GPUs the cluster declares.
"""

from __future__ import annotations

import os
import re
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
            "--num-gpus=2",  # declared only: the actors that reserve one get its id, and train on CPU here
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


@pytest.mark.extended
@pytest.mark.timeout(1400)  # ray head 120, 2 x 600
def test_sft_stage_runs_as_a_ray_job_on_the_declared_gpus(ray_head, tmp_path):
    """Each stage runs as a Ray job; its two trainer ranks reserve one declared GPU each (Ray hands each its own
    ``CUDA_VISIBLE_DEVICES``); asking for more GPUs than the cluster has fails in one line before any worker starts."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    tiny = {"policy.world_size": 2, "policy.gpus_per_worker": 1, "sft.max_steps": 4, "sft.val_every": 2}
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
    placed = dict(re.findall(r"policy worker (\d) on node \w+, threads=\d+, CUDA_VISIBLE_DEVICES=(\S+)", logs))
    assert sorted(placed.values()) == ["0", "1"], logs[-3000:]  # one declared GPU each, none shared

    too_many = run_cli(["run", "sft", *as_job(ray_head, **{**tiny, "policy.gpus_per_worker": 2})], cwd=tmp_path)
    message = "policy 2 x {CPU 1, GPU 2} do not fit the Ray cluster (CPU 4, GPU 2 on 1 node(s)"
    assert too_many.returncode == 2 and message in too_many.stderr, too_many.stderr[-3000:]

    user_error = run_cli(["run", "sft", *as_job(ray_head, **{"model.name": "/nonexistent/model"})], cwd=tmp_path)
    assert user_error.returncode == 2 and "model folder not found: /nonexistent/model" in user_error.stderr
