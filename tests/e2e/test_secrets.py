"""A secret planted in the config reaches none of what a run writes: not MLflow's database or artifacts, not the
store (committed configs, checkpoints), not the run's output, not the Prefect server's record of the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.e2e.test_sft_cli import summary_of

pytestmark = pytest.mark.slow

SECRET = "hf_PLANTED0123456789secret"


def files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.timeout(900)  # services 300, 600
def test_a_planted_secret_is_on_no_surface(tmp_path, services):
    args = ["run", "sft", "--json", "--set", "policy.world_size=1", "--set", "sft.max_steps=4"]
    args += ["--set", "sft.checkpoint_every=2", "--set", f"ray.job_runtime_env.env_vars.HF_TOKEN={SECRET}"]
    result = run_cli(args, cwd=tmp_path, env=services.prefect_env)
    summary = summary_of(result)
    assert summary["stages"]["sft"]["artifact"]
    assert SECRET not in result.stdout + result.stderr
    workdir = tmp_path / ".posttrain"
    assert (workdir / "mlflow.db").exists() and list((workdir / "store").rglob("posttrain_config.yaml"))
    assert files_holding(workdir, SECRET.encode()) == []  # MLflow db and artifacts, the store, caches

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: services.api}):
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(summary["run_id"])
    assert run.state.is_completed() and SECRET not in str(run.parameters)
    assert run.parameters["overrides"]["sft.max_steps"] == 4  # the other overrides are recorded
