"""The Prefect API a `posttrain run` reports to: its own temporary server unless one is configured.

Each case runs in a fresh interpreter, as the CLI does: Prefect reads its settings once, at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tasks.prefect_api import TemporaryPrefectServer
from tests.conftest import REPO

PROBE = textwrap.dedent(
    """
    import json, os
    from tasks.prefect_api import prepare_prefect_api

    use_api = prepare_prefect_api(120)
    children = [int(pid) for task in os.listdir("/proc/self/task")
                for pid in open(f"/proc/self/task/{task}/children").read().split()]
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    from prefect.settings import get_current_settings
    from tasks.runner import has_prefect_server, prefect_api_env

    @flow
    def probe():
        with get_client(sync_client=True) as client:
            recorded = client.read_flow_run(flow_run.get_id()).name
        return {"api": get_current_settings().api.url, "recorded": recorded == flow_run.get_name(),
                "lock": has_prefect_server(), "job_env": prefect_api_env()}

    with use_api():
        result = probe()
    print(json.dumps({**result, "children": children}))
    """
)


def _run_probe(tmp_path) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_temporary_server_records_the_run_takes_no_locks_and_ends_with_the_process(tmp_path):
    result = _run_probe(tmp_path)
    assert result["api"].startswith("http://127.0.0.1:") and result["recorded"]
    # the stage lock and a Ray job's reporting need a server that outlives the run: not this one
    assert result["lock"] is False and result["job_env"] == {}
    assert len(result["children"]) == 1
    assert not os.path.exists(f"/proc/{result['children'][0]}")  # stopped and reaped at exit


def test_an_api_named_by_a_profile_is_used_and_the_temporary_server_stopped_at_once(tmp_path):
    team_server = TemporaryPrefectServer()  # a real Prefect API standing in for a team's server
    try:
        team_server.wait_ready(120)
        home = tmp_path / "prefect-home"
        home.mkdir()
        (home / "profiles.toml").write_text(
            f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{team_server.url}"\n'
        )
        result = _run_probe(tmp_path)
    finally:
        team_server.stop()
    assert result["api"] == team_server.url and result["recorded"]
    assert result["lock"] is True and result["job_env"] == {"PREFECT_API_URL": team_server.url}
    assert result["children"] == []
