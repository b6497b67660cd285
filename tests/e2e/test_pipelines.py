"""grpo-pipeline and dpo-pipeline end to end through the `posttrain` CLI: learning, caching, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.conftest import POSTTRAIN, run_cli
from tests.e2e.test_sft_cli import stage_runs, summary_of

pytestmark = pytest.mark.slow

SMALL = [
    "--set",
    "sft.max_steps=30",
    "--set",
    "reward_model.max_steps=10",
    "--set",
    "grpo.max_steps=8",
    "--set",
    "grpo.val_every=4",
    "--set",
    "grpo.checkpoint_every=4",
    "--set",
    "evaluate.size=32",
    "--set",
    "grpo.val_size=32",
]


def metric_curve(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_grpo_pipeline_tiny_defaults(tmp_path):
    """The main job on its defaults: every stage runs in under 10 minutes, the reward model separates right from
    wrong answers, GRPO raises the reward and held-out accuracy by at least 0.15 over the SFT model (which copied
    its teacher's rounded answers), generator and trainer agree, and a second run is all cache hits."""
    started = time.monotonic()
    first = summary_of(run_cli(["run", "grpo-pipeline", "--json"], cwd=tmp_path, timeout=1200))
    wall = time.monotonic() - started
    stages = first["stages"]
    assert set(stages) == {"model", "data", "sft", "reward_model", "grpo", "evaluate"}
    assert wall < 600, f"the tiny grpo-pipeline took {wall:.0f}s"
    assert stages["sft"]["metrics"]["val_loss_last"] <= 0.5 * stages["sft"]["metrics"]["val_loss_first"]
    assert stages["reward_model"]["metrics"]["val_pairwise_accuracy"] >= 0.8
    grpo = stages["grpo"]["metrics"]
    assert grpo["token_mult_prob_error_median"] < 1.05
    assert grpo["reward_mean_last"] > grpo["reward_mean_first"], grpo
    accuracy = stages["evaluate"]["metrics"]
    assert 0.0 <= accuracy["accuracy_sft"] <= 1.0 and 0.0 <= accuracy["accuracy_final"] <= 1.0
    assert accuracy["accuracy_final"] >= accuracy["accuracy_sft"] + 0.15, accuracy

    client, runs = stage_runs(tmp_path, "evaluate")
    artifacts = {a.path for a in client.list_artifacts(runs[-1].info.run_id, "plots")}
    assert artifacts == {"plots/accuracy.png", "plots/reward_curve.png"}

    started = time.monotonic()
    again = summary_of(run_cli(["run", "grpo-pipeline", "--json"], cwd=tmp_path, timeout=600))
    assert all(stage["cached"] for stage in again["stages"].values()), again["stages"]
    assert time.monotonic() - started < wall / 5


def test_changing_the_grpo_learning_rate_reruns_grpo_and_evaluate_only(tmp_path):
    summary_of(run_cli(["run", "grpo-pipeline", "--json", *SMALL], cwd=tmp_path))
    changed = summary_of(
        run_cli(["run", "grpo-pipeline", "--json", *SMALL, "--set", "grpo.optimizer.lr=2e-4"], cwd=tmp_path)
    )
    cached = {name: stage["cached"] for name, stage in changed["stages"].items()}
    assert cached == {"model": True, "data": True, "sft": True, "reward_model": True, "grpo": False, "evaluate": False}


def test_grpo_pipeline_on_the_megatron_backend(tmp_path):
    """policy.backend=megatron at TP=2 (two ranks) is the only change: every stage trains on Megatron-core, the
    vLLM refit from Megatron's weights reproduces the trainer's logprobs, and SFT follows the loss curve of the
    default FSDP2 trainer (one rank)."""
    megatron = ["--set", "policy.backend=megatron", "--set", "policy.megatron.tensor_parallel=2"]
    megatron += ["--set", "policy.world_size=2", "--set", "policy.threads_per_worker=1"]
    summary = summary_of(run_cli(["run", "grpo-pipeline", "--json", *SMALL, *megatron], cwd=tmp_path))
    stages = summary["stages"]
    assert not any(stages[name]["cached"] for name in ("sft", "reward_model", "grpo", "evaluate"))
    assert stages["grpo"]["metrics"]["token_mult_prob_error_median"] < 1.05
    assert stages["grpo"]["metrics"]["steps"] == 8
    fsdp2 = summary_of(run_cli(["run", "sft", "--config", "grpo_tiny", "--json", *SMALL], cwd=tmp_path))
    assert fsdp2["stages"]["sft"]["artifact"] != stages["sft"]["artifact"]  # the backend is part of the cache key

    client, runs = stage_runs(tmp_path, "sft")
    assert [run.data.params["policy.backend"] for run in runs] == ["megatron", "fsdp2"]
    on_megatron, on_fsdp2 = (metric_curve(client, run.info.run_id, "train/loss") for run in runs)
    assert sorted(on_megatron) == sorted(on_fsdp2) == list(range(1, 31))
    for step, loss in on_fsdp2.items():
        assert on_megatron[step] == pytest.approx(loss, abs=1e-4), step


def test_kill_in_the_middle_of_grpo_then_resume_matches(tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir(), killed_dir.mkdir()
    reference = summary_of(run_cli(["run", "grpo-pipeline", "--json", *SMALL], cwd=reference_dir))

    proc = subprocess.Popen(
        [POSTTRAIN, "run", "grpo-pipeline", "--json", *SMALL],
        cwd=killed_dir,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = killed_dir / ".posttrain/store/stages/grpo"
    deadline = time.monotonic() + 600
    while not list(checkpoints.glob("*/checkpoints/step_000004/MANIFEST.json")):
        assert proc.poll() is None, "the run ended before its first GRPO checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    resumed = summary_of(run_cli(["run", "grpo-pipeline", "--json", *SMALL], cwd=killed_dir))
    assert resumed["stages"]["sft"]["cached"] and not resumed["stages"]["grpo"]["cached"]
    client, runs = stage_runs(killed_dir, "grpo")
    assert int(runs[-1].data.tags["posttrain.resumed_from_step"]) == 4
    ref_client, ref_runs = stage_runs(reference_dir, "grpo")
    for key in ("reward/mean", "loss"):
        want = metric_curve(ref_client, ref_runs[-1].info.run_id, key)
        got = metric_curve(client, runs[-1].info.run_id, key)
        assert sorted(got) == list(range(5, 9))
        for step, value in got.items():
            assert value == pytest.approx(want[step], abs=1e-5), (key, step)
    for key in ("reward_mean_last", "val_accuracy_last"):
        assert resumed["stages"]["grpo"]["metrics"][key] == pytest.approx(reference["stages"]["grpo"]["metrics"][key])
    assert resumed["stages"]["evaluate"]["metrics"] == reference["stages"]["evaluate"]["metrics"]


def test_dpo_pipeline_runs_and_caches_reference_logprobs(tmp_path):
    """dpo-pipeline end to end on small step counts; the reference logprobs are computed once and kept in
    the store, so a DPO rerun with another learning rate reuses them."""
    small = [*SMALL, "--set", "dpo.max_steps=6", "--set", "dpo.val_size=32"]
    first = summary_of(run_cli(["run", "dpo-pipeline", "--json", *small], cwd=tmp_path))
    assert set(first["stages"]) == {"model", "data", "sft", "dpo", "evaluate"}
    assert 0.0 <= first["stages"]["dpo"]["metrics"]["val_preference_accuracy"] <= 1.0
    reference = tmp_path / ".posttrain/store/cache/dpo_reference"
    committed = sorted(p.parent.name for p in reference.glob("*/MANIFEST.json"))
    assert len(committed) == 2  # train and val splits
    stamps = {p: p.stat().st_mtime for p in reference.glob("*/MANIFEST.json")}
    second = summary_of(
        run_cli(["run", "dpo-pipeline", "--json", *small, "--set", "dpo.optimizer.lr=1e-5"], cwd=tmp_path)
    )
    assert second["stages"]["sft"]["cached"] and not second["stages"]["dpo"]["cached"]
    assert {p: p.stat().st_mtime for p in reference.glob("*/MANIFEST.json")} == stamps


def test_dpo_pipeline_tiny_defaults(tmp_path):
    """The DPO pipeline on its defaults: held-out preference accuracy >= 0.8, and greedy accuracy no worse
    than SFT's."""
    summary = summary_of(run_cli(["run", "dpo-pipeline", "--json"], cwd=tmp_path, timeout=1200))
    assert summary["stages"]["dpo"]["metrics"]["val_preference_accuracy"] >= 0.8
    accuracy = summary["stages"]["evaluate"]["metrics"]
    assert accuracy["accuracy_final"] >= accuracy["accuracy_sft"]


def test_tool_use_pipeline_runs_multi_turn_episodes(tmp_path):
    """The calculator config end to end on small step counts: the SFT model, half of whose demonstrations
    call the tool, does call it during GRPO, and episodes take more than one turn."""
    summary = summary_of(
        run_cli(
            ["run", "grpo-pipeline", "--config", "grpo_tool_tiny", "--json", *SMALL, "--set", "sft.max_steps=150"],
            cwd=tmp_path,
            timeout=1200,
        )
    )
    assert summary["status"] == "completed"
    client, runs = stage_runs(tmp_path, "grpo")
    run_id = runs[-1].info.run_id
    assert max(metric_curve(client, run_id, "tool_call_rate").values()) > 0.1
    assert max(metric_curve(client, run_id, "turns").values()) > 1.0
