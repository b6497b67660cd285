"""TensorBoard and W&B (offline) receive what MLflow does: the runs are read back from the files each tool wrote."""

from __future__ import annotations

from pathlib import Path

from engine.config import PipelineConfig, TrackingConfig
from engine.tracking import Tracker
from tests.tracker_files import tensorboard_scalars, wandb_config, wandb_history, wandb_home, wandb_records, wandb_run

LOSSES = {step: 1.0 / step for step in range(1, 13)}


def test_tensorboard_and_wandb_runs_hold_the_metrics_mlflow_holds(tmp_path, monkeypatch):
    for name, value in wandb_home(tmp_path).items():
        monkeypatch.setenv(name, value)
    cfg = TrackingConfig(
        uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        sinks=["mlflow", "tensorboard", "wandb"],
        dir=str(tmp_path / "tracking"),
        wandb_mode="offline",
        flush_every=5,
    )
    tracker = Tracker(cfg, tmp_path / "artifacts")
    parent = tracker.start_pipeline(PipelineConfig(workdir=str(tmp_path), tracking=cfg), "sft-1")
    stage = tracker.start_stage(parent.group_id, "sft", {"sft": {"max_steps": 12}, "hub": {"token": "hf_SECRET"}})
    for step, loss in LOSSES.items():
        stage.log_metrics({"train/loss": loss}, step=step)
    stage.log_metrics({"final/val_loss": 0.25}, step=0)
    stage.finish()
    parent.finish()

    mlflow = {m.step: m.value for m in tracker.client.get_metric_history(stage.run_id, "train/loss")}
    assert mlflow == LOSSES
    assert parent.group_id == parent.run_id  # MLflow's parent run id names the group in every sink

    board = tensorboard_scalars(Path(stage.links["tensorboard"]))
    assert board["train/loss"].keys() == mlflow.keys()
    assert all(abs(board["train/loss"][s] - mlflow[s]) < 1e-6 for s in mlflow)  # TensorBoard keeps float32
    assert Path(stage.links["tensorboard"]) == tmp_path / "tracking" / "tensorboard" / parent.run_id / "sft"

    records = wandb_records(Path(stage.links["wandb"]))
    assert wandb_history(records)["train/loss"] == mlflow
    config = wandb_config(records)
    assert config["sft.max_steps"] == "12" and config["hub.token"] == "***"
    run = wandb_run(records)
    assert run.run_group == parent.run_id and run.job_type == "sft"
    summary = {item.key: item.value_json for r in records if r.WhichOneof("record_type") == "summary"
               for item in r.summary.update}  # fmt: skip
    assert summary.get("final/val_loss") == "0.25"

    for written in (tmp_path / "tracking").rglob("*"):
        assert not written.is_file() or b"hf_SECRET" not in written.read_bytes(), written


def test_a_pipeline_without_mlflow_still_groups_its_stages(tmp_path):
    cfg = TrackingConfig(sinks=["tensorboard"], dir=str(tmp_path / "tracking"))
    tracker = Tracker(cfg, tmp_path / "artifacts")
    parent = tracker.start_pipeline(PipelineConfig(workdir=str(tmp_path), tracking=cfg), "grpo-1")
    stage = tracker.start_stage(parent.group_id, "grpo", {})
    stage.log_metrics({"train/reward_mean": 0.5}, step=1)
    stage.finish()
    parent.finish()
    assert tracker.client is None and parent.run_id is None and "mlflow" not in stage.links
    assert tensorboard_scalars(Path(stage.links["tensorboard"])) == {"train/reward_mean": {1: 0.5}}
    assert Path(stage.links["tensorboard"]).parent == Path(parent.links["tensorboard"]).parent
