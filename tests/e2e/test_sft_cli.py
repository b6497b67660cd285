"""`posttrain run sft` end to end, as a user runs it: a Prefect flow, FSDP2 ranks on Ray, the store, MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from engine.config import StorageConfig
from engine.storage import ArtifactStore
from tests.conftest import POSTTRAIN, run_cli
from tests.tracker_files import tensorboard_scalars, wandb_history, wandb_home, wandb_records, wandb_run

pytestmark = pytest.mark.slow


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def stage_runs(workdir: Path, stage: str = "sft", experiment: str | None = None) -> tuple:
    """The MLflow client and the stage's runs, oldest first, of a run in ``workdir`` (its default workdir
    ``.posttrain`` unless the run set ``workdir`` to the folder itself, as the recipe tests do)."""
    db = workdir / ".posttrain" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db if db.exists() else workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment or "posttrain")
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`posttrain.stage` = '{stage}'", order_by=["start_time ASC"]
    )
    return client, runs


def loss_curve(client, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}


def check_committed_run(summary: dict, store: ArtifactStore, steps: int, checkpoint_every: int) -> None:
    sft = summary["stages"]["sft"]
    assert summary["status"] == "completed" and sft["cached"] is False
    metrics = sft["metrics"]
    assert metrics["val_loss_last"] <= 0.5 * metrics["val_loss_first"], metrics
    assert store.is_committed(sft["artifact"]) and store.verify(sft["artifact"])
    prefix = store.key_of(sft["artifact"]).rsplit("/", 1)[0]
    expected = [f"{prefix}/checkpoints/step_{s:06d}" for s in range(checkpoint_every, steps, checkpoint_every)]
    assert store.list(f"{prefix}/checkpoints") == expected
    model_dir = store.download(sft["artifact"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "posttrain_config.yaml"} <= {
        p.name for p in model_dir.iterdir()
    }


@pytest.mark.timeout(1500)  # services 300, 2 x 600
def test_tiny_sft_default_config_local_store(tmp_path, services):
    sinks = ["--set", "tracking.sinks=[mlflow,tensorboard,wandb]", "--set", "tracking.wandb_mode=offline"]
    env = {**services.prefect_env, **wandb_home(tmp_path)}
    result = run_cli(["run", "sft", "--json", *sinks], cwd=tmp_path, env=env)
    summary = summary_of(result)
    store = ArtifactStore(f"file://{tmp_path}/.posttrain/store", tmp_path / "cache")
    check_committed_run(summary, store, steps=120, checkpoint_every=40)

    client, runs = stage_runs(tmp_path)
    assert len(runs) == 1
    stage = runs[0]
    assert stage.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
    assert [used.dataset.name for used in client.get_run(stage.info.run_id).inputs.dataset_inputs] == ["synthetic"]
    losses = loss_curve(client, stage.info.run_id)
    assert len(losses) == 120
    # the same curve in TensorBoard's event files and in the offline W&B run, grouped under the MLflow parent run
    assert summary["tracking"]["mlflow"] == summary["mlflow_run_id"]
    board = tensorboard_scalars(Path(summary["tracking"]["tensorboard"]).parent / "sft")["train/loss"]
    assert board.keys() == losses.keys() and all(abs(board[s] - losses[s]) < 1e-5 * abs(losses[s]) for s in losses)
    wandb_runs = [wandb_records(r / "files") for r in (tmp_path / ".posttrain/tracking/wandb").glob("offline-run-*")]
    (sft_run,) = [r for r in wandb_runs if wandb_run(r).job_type == "sft"]
    assert wandb_run(sft_run).run_group == summary["mlflow_run_id"]
    assert wandb_history(sft_run)["train/loss"] == losses
    assert stage.data.params["sft.max_steps"] == "120"
    assert "posttrain.progress - sft: step 120/120, loss=" in result.stderr and "\r" not in result.stderr  # not a tty
    # the running stage's position, on the flow run's page in the Prefect UI
    assert progress_artifacts(services.api, summary["run_id"]) == {"sft-progress": (100.0, "sft: step 120/120")}

    again = summary_of(run_cli(["run", "sft", "--json"], cwd=tmp_path, env=services.prefect_env))
    assert again["stages"]["sft"]["cached"] is True
    assert again["stages"]["sft"]["artifact"] == summary["stages"]["sft"]["artifact"]
    # in the Prefect UI a cache hit is a completed state named Cached, not a run
    assert task_states(services.api, summary["run_id"])["train_sft"] == "Completed"
    assert task_states(services.api, again["run_id"]) == {"prepare_model": "Cached", "prepare_data": "Cached",
                                                          "train_sft": "Cached"}  # fmt: skip
    assert progress_artifacts(services.api, again["run_id"]) == {}  # nothing ran


def task_states(api: str, flow_run_id: str) -> dict[str, str]:
    """The final state name of each task of a flow run, by task name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert all(run.state.is_completed() for run in runs)
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}  # names are "train_sft-31c"


def progress_artifacts(api: str, flow_run_id: str) -> dict[str, tuple[float, str]]:
    """The progress artifacts of a flow run: key -> (percent, description) as last updated."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    only = ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])
    )
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return {a.key: (a.data, a.description) for a in client.read_artifacts(artifact_filter=only)}


@pytest.mark.extended
@pytest.mark.timeout(900)  # services 300, 600
def test_tiny_sft_on_s3_store(tmp_path, s3_endpoint, s3_bucket, services):
    root = f"s3://{s3_bucket}/posttrain"
    result = run_cli(
        [
            "run",
            "sft",
            "--json",
            "--set",
            f"storage.root={root}",
            "--set",
            f"storage.endpoint_url={s3_endpoint}",
            "--set",
            "sft.max_steps=40",
            "--set",
            "sft.checkpoint_every=20",
        ],
        cwd=tmp_path,
        env=services.prefect_env,
    )
    summary = summary_of(result)
    assert summary["stages"]["sft"]["artifact"].startswith(root)
    store = ArtifactStore.from_config(StorageConfig(root=root, endpoint_url=s3_endpoint), tmp_path)
    check_committed_run(summary, store, steps=40, checkpoint_every=20)
    assert not (tmp_path / ".posttrain/store").exists()


@pytest.mark.extended
@pytest.mark.timeout(900)  # services 300, 2 x 300
def test_tiny_sft_on_gs_and_az_stores_with_storage_options(tmp_path, object_store, services):
    """gs:// (gcsfs) and az:// (adlfs), reached with storage.options, whose credential is masked on every surface."""
    root, options = f"{object_store.scheme}://{object_store.bucket}/posttrain", object_store.options
    args = ["run", "sft", "--json", "--set", f"storage.root={root}", "--set", f"storage.options={json.dumps(options)}"]
    args += ["--set", "sft.max_steps=20", "--set", "sft.checkpoint_every=10", "--set", "policy.world_size=1"]
    summary = summary_of(run_cli(args, cwd=tmp_path, env=services.prefect_env))
    assert summary["stages"]["sft"]["artifact"].startswith(root)
    store = ArtifactStore.from_config(StorageConfig(root=root, options=options), tmp_path)
    check_committed_run(summary, store, steps=20, checkpoint_every=10)
    assert not (tmp_path / ".posttrain/store").exists()
    params = stage_runs(tmp_path)[0].get_run(summary["mlflow_run_id"]).data.params  # the pipeline run's config
    logged = {key.removeprefix("storage.options."): value for key, value in params.items() if "options." in key}
    assert logged == {key: "***" if key in ("token", "connection_string") else value for key, value in options.items()}

    again = summary_of(run_cli(args, cwd=tmp_path, env=services.prefect_env))  # found in the store by its key
    assert (
        again["stages"]["sft"]["cached"] and again["stages"]["sft"]["artifact"] == summary["stages"]["sft"]["artifact"]
    )


RESUME_ARGS = ["--set", "sft.max_steps=30", "--set", "sft.checkpoint_every=10", "--set", "sft.val_every=10"]


@pytest.mark.extended
@pytest.mark.timeout(1500)  # 600 + 300 + 600
def test_sigkill_then_resume_continues_the_same_curve(tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir(), killed_dir.mkdir()
    reference = summary_of(run_cli(["run", "sft", "--json", *RESUME_ARGS], cwd=reference_dir))

    proc = subprocess.Popen(
        [POSTTRAIN, "run", "sft", "--json", *RESUME_ARGS],
        cwd=killed_dir,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = killed_dir / ".posttrain/store/stages/sft"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("*/checkpoints/step_000010/MANIFEST.json")):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # an upload cut before its manifest: must be ignored by resume
    (stage_dir,) = list(checkpoints.iterdir())
    partial = stage_dir / "checkpoints/step_000025/20990101T000000-cut"
    partial.mkdir(parents=True)
    (partial / "trainer_state.json").write_text("{broken")

    resumed = summary_of(run_cli(["run", "sft", "--json", *RESUME_ARGS], cwd=killed_dir))
    client, runs = stage_runs(killed_dir)
    resumed_from = int(runs[-1].data.tags["posttrain.resumed_from_step"])
    assert resumed_from in (10, 20)

    ref_client, ref_runs = stage_runs(reference_dir)
    want = loss_curve(ref_client, ref_runs[-1].info.run_id)
    got = loss_curve(client, runs[-1].info.run_id)
    assert sorted(got) == list(range(resumed_from + 1, 31))
    for step, value in got.items():
        assert value == pytest.approx(want[step], abs=1e-5), step
    for key in ("val_loss_first", "val_loss_last", "train_loss_last"):
        assert resumed["stages"]["sft"]["metrics"][key] == pytest.approx(
            reference["stages"]["sft"]["metrics"][key], abs=1e-5
        )
