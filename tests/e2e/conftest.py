"""What the end-to-end tests share, so each expensive thing happens once per session:

- ``services``: one `posttrain server up` (a Prefect server and an MLflow server on 127.0.0.1) for the deployment
  tests, and the Prefect API the other CLI runs report to (``services.prefect_env``), instead of a temporary
  server started by every run;
- ``default_run``: the main job on its defaults, from nothing, as users run it (its own temporary Prefect
  server); its store, holding the tiny pipeline's data, model and 800-step SFT, seeds the tests that only need
  those as inputs (``seeded_workdir``): the stage cache finds them by key.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import free_port, run_cli


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    """`posttrain server up` (Prefect + MLflow on random ports, own PREFECT_HOME); `server down` stops them by PID."""
    workdir = tmp_path_factory.mktemp("services")
    env = {"PREFECT_HOME": str(workdir / "prefect-home")}
    ports = [str(free_port()), str(free_port())]
    up = run_cli(
        [
            "server",
            "up",
            "--workdir",
            str(workdir),
            "--prefect-port",
            ports[0],
            "--mlflow-port",
            ports[1],
            "--no-worker",
        ],
        cwd=workdir,
        env=env,
        timeout=300,
    )
    assert up.returncode == 0, up.stderr
    assert f"Prefect UI: http://127.0.0.1:{ports[0]}" in up.stdout
    api = f"http://127.0.0.1:{ports[0]}/api"
    env.update(PREFECT_API_URL=api, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{ports[1]}")
    pids = [int(p.read_text()) for p in (workdir / "services").glob("*.pid")]
    yield SimpleNamespace(
        workdir=workdir,
        env=env,
        prefect_env={"PREFECT_API_URL": api, "PREFECT_HOME": env["PREFECT_HOME"]},
        api=api,
        ui=f"http://127.0.0.1:{ports[0]}",
    )
    down = run_cli(["server", "down", "--workdir", str(workdir)], cwd=workdir, env=env)
    assert down.returncode == 0, down.stderr
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """`posttrain run grpo-pipeline --json` on the embedded defaults in a fresh folder: its summary, wall time and
    folder."""
    import time

    from tests.e2e.test_sft_cli import summary_of

    workdir = tmp_path_factory.mktemp("default-run")
    started = time.monotonic()
    summary = summary_of(run_cli(["run", "grpo-pipeline", "--json"], cwd=workdir, timeout=1200))
    return SimpleNamespace(summary=summary, wall=time.monotonic() - started, workdir=workdir)


def seed(folder: Path, default_run: SimpleNamespace) -> Path:
    """``folder`` with a copy of the default run's store (data, model, SFT, GRPO, evaluation): runs there reuse
    what their stage keys match and write everything else anew. MLflow's database is not copied."""
    shutil.copytree(default_run.workdir / ".posttrain" / "store", folder / ".posttrain" / "store")
    return folder


@pytest.fixture
def seeded_workdir(default_run, tmp_path) -> Path:
    return seed(tmp_path, default_run)


def prefect_task_logs(api: str, flow_run_id: str) -> list:
    """The log lines of a flow run's tasks, as the Prefect UI shows them, from the server at ``api``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    logs: list = []
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        while True:  # the server answers a page (200 lines) at a time
            only_this_run = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            page = client.read_logs(log_filter=only_this_run, offset=len(logs))
            logs += page
            if not page:
                break
    return [log for log in logs if log.task_run_id is not None]
