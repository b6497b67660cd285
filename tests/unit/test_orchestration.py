"""Our orchestration logic in isolation: retry policy, job payloads, the Jobs API address, run summaries."""

from __future__ import annotations

import pytest
from prefect.states import Failed

from engine import stages
from engine.config import PipelineConfig, load_config
from engine.errors import ConfigError, PosttrainError
from engine.storage import ArtifactRef
from flows.artifacts import artifact_key, summary_markdown
from tasks.ray_job import dashboard_url, decode_payload, encode_payload
from tasks.runner import retry_on_infrastructure_failure, stage_task_options


def test_user_errors_are_not_retried_infrastructure_failures_are():
    assert retry_on_infrastructure_failure(None, None, Failed(data=ConfigError("unknown key"))) is False
    assert retry_on_infrastructure_failure(None, None, Failed(data=RuntimeError("actor died"))) is True


def test_task_options_come_from_the_config():
    cfg = load_config(None, {"orchestration.retries": 3, "orchestration.stage_timeout_s": 60})
    options = stage_task_options(cfg)
    assert options["retries"] == 3 and options["timeout_seconds"] == 60
    assert options["retry_condition_fn"] is retry_on_infrastructure_failure


def test_job_payload_round_trip_makes_the_job_its_clusters_driver():
    cfg = load_config(
        None,
        {"ray.address": "ray://head:10001", "ray.submission": "job", "sft.max_steps": 7, "workdir": "/tmp/w"},
    )
    ref = ArtifactRef(uri="s3://bucket/stages/sft/abc/model", digest="d" * 16, metrics={"loss": 1.0})
    stage, decoded, inputs = decode_payload(encode_payload(stages.train_sft, cfg, [ref, None, "run-id"]))
    assert stage is stages.train_sft
    assert decoded.ray.address == "auto" and decoded.ray.submission == "driver"
    assert decoded.sft.max_steps == 7 and decoded.workdir == "/tmp/w"
    assert inputs == [ref, None, "run-id"]


def test_job_submission_needs_a_cluster():
    with pytest.raises(ConfigError, match="ray.submission|needs a running cluster"):
        load_config(None, {"ray.submission": "job"})


def test_jobs_api_address(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    base = {"ray.submission": "job"}
    explicit = load_config(None, {**base, "ray.address": "auto", "ray.dashboard_url": "http://127.0.0.1:8265"})
    assert dashboard_url(explicit) == "http://127.0.0.1:8265"
    assert dashboard_url(load_config(None, {**base, "ray.address": "ray://head.svc:10001"})) == "http://head.svc:8265"
    auto = load_config(None, {**base, "ray.address": "auto"})
    with pytest.raises(PosttrainError, match="ray.dashboard_url"):
        dashboard_url(auto)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.1:8265")
    assert dashboard_url(auto) == "http://10.0.0.1:8265"


def test_mlflow_tracking_uri_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert PipelineConfig().tracking.uri == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert PipelineConfig().tracking.uri.startswith("sqlite:///")


def test_summary_markdown_lists_every_stage():
    summary = {
        "pipeline": "grpo-pipeline",
        "status": "completed",
        "mlflow_run_id": "abc123",
        "tracking": {"mlflow": "abc123", "tensorboard": "/w/tracking/tensorboard/abc123/grpo-pipeline-1"},
        "wall_seconds": 12.5,
        "stages": {
            "sft": {"artifact": "s3://b/stages/sft/k/model", "cached": True, "metrics": {"val_loss_last": 0.25}},
            "grpo": {"artifact": "s3://b/stages/grpo/k/model", "cached": False, "metrics": {}},
        },
    }
    text = summary_markdown(summary, "grpo_tiny", "http://127.0.0.1:5000/#/experiments/1/runs/abc123", None)
    assert "# grpo-pipeline: completed" in text
    assert "| sft | cached | `s3://b/stages/sft/k/model` | val_loss_last=0.25 |" in text
    assert "| grpo | ran | `s3://b/stages/grpo/k/model` | - |" in text
    assert "[abc123](http://127.0.0.1:5000/#/experiments/1/runs/abc123)" in text
    assert "- TensorBoard run: `/w/tracking/tensorboard/abc123/grpo-pipeline-1`" in text
    assert "`abc123` (tracking URI `sqlite:///x.db`)" in summary_markdown(summary, "c", None, "sqlite:///x.db")


def test_artifact_keys_are_what_prefect_accepts():
    assert artifact_key("model", "reward_model") == "model-reward-model"
    assert artifact_key("grpo-pipeline", "summary") == "grpo-pipeline-summary"


def test_stage_lock_only_where_a_prefect_server_revokes_dead_holders(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.prefect_api import reporting_api_url
    from tasks.runner import has_prefect_server
    from tasks.stage_lock import open_runtime

    cfg = load_config(None, {"workdir": str(tmp_path), "tracking.enabled": False})
    with temporary_settings({PREFECT_API_URL: None}):
        assert not has_prefect_server()
        assert open_runtime(cfg, reporting_api_url()).lock("stages/sft/k").__class__.__name__ == "nullcontext"
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert has_prefect_server()
        assert open_runtime(cfg, reporting_api_url()).lock("stages/sft/k").__class__.__name__ != "nullcontext"


def test_a_stage_job_imports_no_prefect_unless_it_locks(tmp_path):
    """The in-cluster job path: decoding the payload and opening the stage's services need no Prefect."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from engine.config import load_config\n"
        f"cfg = load_config(None, {{'workdir': {str(tmp_path)!r}, 'tracking.enabled': False}})\n"
        "from tasks.ray_job import decode_payload, encode_payload\n"
        "from engine import stages\n"
        "from tasks.stage_lock import open_runtime\n"
        "stage, cfg, _ = decode_payload(encode_payload(stages.prepare_model, cfg, []))\n"
        "open_runtime(cfg, None)\n"
        "assert not any(m == 'prefect' or m.startswith('prefect.') for m in sys.modules), 'prefect imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_infrastructure_faults_are_retried_and_end_in_one_line_with_exit_1(monkeypatch, capsys):
    from engine.errors import InfrastructureError
    from engine.storage import StorageUnavailable
    from flows import cli

    stalled_store = Failed(data=StorageUnavailable("storage did not take x"))
    assert retry_on_infrastructure_failure(None, None, stalled_store) is True

    def stalled(args):
        raise InfrastructureError("storage did not take s3://bucket/runs/x: Read timeout\non endpoint")

    monkeypatch.setattr(cli, "cmd_config_show", stalled)
    assert cli.main(["config", "show"]) == 1
    assert capsys.readouterr().err == "error: storage did not take s3://bucket/runs/x: Read timeout on endpoint\n"
