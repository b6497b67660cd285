"""What a user sees of a run in MLflow beyond its params and metrics: the experiment's kind (the model-training view),
the source and commit of the code, the dataset it trained on, and the machine's system metrics."""

from __future__ import annotations

import subprocess
import time

from engine.caching import code_version
from engine.config import PipelineConfig, TrackingConfig
from engine.tracking import SOURCE_ROOT, Tracker


def test_a_stage_run_names_its_source_commit_dataset_and_system_metrics(tmp_path):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", system_metrics_every_s=0.2)
    tracker = Tracker(cfg, tmp_path / "artifacts")
    client = tracker.client
    assert client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    parent = tracker.start_pipeline(PipelineConfig(workdir=str(tmp_path), tracking=cfg), "sft-1")
    stage = tracker.start_stage(parent.group_id, "sft", {"sft": {"max_steps": 2}})
    stage.log_dataset("openai/gsm8k:main", "ab" * 32, "s3://bucket/datasets/abab", {"train_rows": 7.0}, "training")
    deadline = time.monotonic() + 30
    while not client.get_run(stage.run_id).data.metrics.get("system/cpu_utilization_percentage"):
        assert time.monotonic() < deadline, "no system metrics reached MLflow"
        time.sleep(0.2)
    stage.finish()
    parent.finish()

    run = client.get_run(stage.run_id)
    assert run.data.tags["mlflow.source.name"] == "posttrain" and run.data.tags["mlflow.source.type"] == "JOB"
    assert run.data.tags["posttrain.code_version"] == code_version()
    head = subprocess.run(["git", "-C", str(SOURCE_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert run.data.tags.get("mlflow.source.git.commit") == (head.stdout.strip() if head.returncode == 0 else None)
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    (used,) = run.inputs.dataset_inputs
    assert used.dataset.name == "openai/gsm8k:main" and used.dataset.digest == ("ab" * 32)[:36]
    assert '"s3://bucket/datasets/abab"' in used.dataset.source and used.dataset.profile == '{"train_rows": 7.0}'
    assert {(t.key, t.value) for t in used.tags} == {("mlflow.data.context", "training")}


def test_a_kind_chosen_in_the_ui_is_kept(tmp_path):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="mine")
    first = Tracker(cfg, tmp_path / "artifacts")
    first.client.set_experiment_tag(first.experiment_id, "mlflow.experimentKind", "finetuning")
    again = Tracker(cfg, tmp_path / "artifacts")
    assert again.client.get_experiment(again.experiment_id).tags["mlflow.experimentKind"] == "finetuning"
