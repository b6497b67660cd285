"""grpo-pipeline and dpo-pipeline end to end through the `posttrain` CLI: learning, caching, resume, the reward model
as a reward, tool use, the Megatron backend.

The main job runs once on its defaults, from nothing (``default_run``); the tests that only need its data and SFT
model as inputs start from a copy of its store (``seeded_workdir``) and report to the session's Prefect server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import POSTTRAIN, run_cli
from tests.e2e.conftest import prefect_task_logs, seed
from tests.e2e.test_sft_cli import stage_runs, summary_of

pytestmark = pytest.mark.slow

# Tests about caching, resume, retries and rewards generate with transformers: it starts in seconds where a vLLM
# worker takes about 20 s a stage to import vLLM (twice a pipeline run: GRPO and evaluate). vLLM is the generator of
# the default run, the LoRA run, the recipes' vLLM checks and the integration tier.
HF_GENERATION = {"generation.backend": "hf"}

GRPO_SMALL = {
    **HF_GENERATION,
    "grpo.max_steps": 8,
    "grpo.val_every": 4,
    "grpo.checkpoint_every": 4,
    "grpo.val_size": 32,
    "evaluate.size": 32,
}


def settings(values: dict) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def metric_curve(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def cached(summary: dict) -> dict[str, bool]:
    return {name: stage["cached"] for name, stage in summary["stages"].items()}


@pytest.mark.timeout(1800)  # the default run (1200) and its rerun (600)
def test_grpo_pipeline_tiny_defaults(default_run):
    """The main job on its defaults: SFT copies its teacher's rounded answers, GRPO with the exact verifier removes
    the habit, generator and trainer agree on every sampled token, and a second run is all cache hits."""
    stages = default_run.summary["stages"]
    assert set(stages) == {"model", "data", "sft", "grpo", "evaluate"}  # no reward model: grpo_tiny gives it no weight
    sft = stages["sft"]["metrics"]
    assert sft["val_loss_last"] <= 0.4, sft  # measured 0.25-0.27 (5.65 at step 0)
    grpo = stages["grpo"]["metrics"]
    assert grpo["token_mult_prob_error_median"] <= 1.001, grpo  # measured 1.0000002
    assert grpo["reward_mean_last"] >= 0.8 and grpo["reward_mean_last"] >= grpo["reward_mean_first"] + 0.3, grpo
    accuracy = stages["evaluate"]["metrics"]
    assert accuracy["accuracy_final"] >= 0.9, accuracy  # measured 0.99 (0.19 after SFT)
    assert accuracy["accuracy_final"] >= accuracy["accuracy_sft"] + 0.5, accuracy

    client, runs = stage_runs(default_run.workdir, "evaluate")
    artifacts = {a.path for a in client.list_artifacts(runs[-1].info.run_id, "plots")}
    assert artifacts == {"plots/accuracy.png", "plots/reward_curve.png"}

    again = summary_of(run_cli(["run", "grpo-pipeline", "--json"], cwd=default_run.workdir, timeout=600))
    assert all(stage["cached"] for stage in again["stages"].values()), again["stages"]
    assert {name: stage["artifact"] for name, stage in again["stages"].items()} == {
        name: stage["artifact"] for name, stage in stages.items()
    }


@pytest.fixture(scope="module")
def small_grpo(default_run, services, tmp_path_factory):
    """GRPO_SMALL (8 steps, checkpoints at 4) from the default run's SFT model, in a folder of its own."""
    workdir = seed(tmp_path_factory.mktemp("small-grpo"), default_run)
    args = ["run", "grpo-pipeline", "--json", *settings(GRPO_SMALL)]
    return SimpleNamespace(
        workdir=workdir, args=args, summary=summary_of(run_cli(args, workdir, env=services.prefect_env))
    )


def stage_run(workdir, stage: str, summary: dict):
    """The MLflow run of ``stage`` within the pipeline run that produced ``summary``."""
    client, runs = stage_runs(workdir, stage)
    (run,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["mlflow_run_id"]]
    return client, run


@pytest.mark.extended
@pytest.mark.timeout(2700)  # services 300, default run 1200, 2 x 600
def test_changing_the_grpo_learning_rate_reruns_grpo_and_evaluate_only(small_grpo, services):
    first = small_grpo.summary
    assert cached(first) == {"model": True, "data": True, "sft": True, "grpo": False, "evaluate": False}
    lower = [*small_grpo.args, "--set", "grpo.optimizer.lr=2e-4"]
    changed = summary_of(run_cli(lower, small_grpo.workdir, env=services.prefect_env))
    assert cached(changed) == {"model": True, "data": True, "sft": True, "grpo": False, "evaluate": False}
    assert changed["stages"]["grpo"]["artifact"] != first["stages"]["grpo"]["artifact"]


@pytest.mark.extended
@pytest.mark.timeout(3000)  # services 300, default run 1200, 600 + 600 + 600
def test_kill_in_the_middle_of_grpo_then_resume_matches(small_grpo, default_run, tmp_path, services):
    """SIGKILL after GRPO's first checkpoint, then the same command: it resumes at step 4 and the curve from there
    equals an uninterrupted run's. (The killed run reports to a temporary Prefect server: its stage lock would hold
    for a minute on a real one; the resumed run reports to the real one, whose task log says it resumed.)"""
    killed_dir, args, reference = seed(tmp_path / "killed", default_run), small_grpo.args, small_grpo.summary
    proc = subprocess.Popen(
        [POSTTRAIN, *args], cwd=killed_dir, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = killed_dir / ".posttrain/store/stages/grpo"
    deadline = time.monotonic() + 600
    while not list(checkpoints.glob("*/checkpoints/step_000004/MANIFEST.json")):
        assert proc.poll() is None, "the run ended before its first GRPO checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    result = run_cli(args, cwd=killed_dir, env=services.prefect_env)
    resumed = summary_of(result)
    assert resumed["stages"]["sft"]["cached"] and not resumed["stages"]["grpo"]["cached"]
    assert "posttrain.checkpointing - grpo resumes from step 4" in result.stderr  # said where the user looks
    logs = prefect_task_logs(services.api, resumed["run_id"])  # and in the Prefect UI, in the grpo task's log
    assert [log.name for log in logs if "grpo resumes from step 4" in log.message] == ["posttrain.checkpointing"]
    client, run = stage_run(killed_dir, "grpo", resumed)
    assert int(run.data.tags["posttrain.resumed_from_step"]) == 4
    ref_client, ref_run = stage_run(small_grpo.workdir, "grpo", reference)
    for key in ("reward/mean", "loss"):
        want = metric_curve(ref_client, ref_run.info.run_id, key)
        got = metric_curve(client, run.info.run_id, key)
        assert sorted(got) == list(range(5, 9))
        for step, value in got.items():
            assert value == pytest.approx(want[step], abs=1e-5), (key, step)
    for key in ("reward_mean_last", "val_accuracy_last"):
        assert resumed["stages"]["grpo"]["metrics"][key] == pytest.approx(reference["stages"]["grpo"]["metrics"][key])
    assert resumed["stages"]["evaluate"]["metrics"] == reference["stages"]["evaluate"]["metrics"]


@pytest.mark.extended
@pytest.mark.timeout(3000)  # services 300, default run 1200, 600 + 600
def test_a_trainer_rank_killed_mid_grpo_is_retried_from_its_checkpoint(small_grpo, default_run, tmp_path, services):
    """The trainer's process dies after GRPO's first checkpoint (SIGKILL, as an out-of-memory kill does): the stage
    fails as an infrastructure fault, Prefect retries it, and the retry resumes from step 4 to the uninterrupted
    run's result."""
    workdir = seed(tmp_path / "rank-lost", default_run)
    args = [*small_grpo.args, "--set", "orchestration.retry_delay_s=1"]
    proc = subprocess.Popen(
        [POSTTRAIN, *args],
        cwd=workdir,
        env={**os.environ, **services.prefect_env},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = workdir / ".posttrain/store/stages/grpo"
    deadline = time.monotonic() + 600
    while not list(checkpoints.glob("*/checkpoints/step_000004/MANIFEST.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "no GRPO checkpoint"
        time.sleep(0.2)
    trainers = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "FSDP2PolicyWorker"], capture_output=True, text=True)
    (pid,) = [int(p) for p in trainers.stdout.split()]
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    reference = small_grpo.summary["stages"]["grpo"]["metrics"]
    for key in ("reward_mean_last", "val_accuracy_last", "steps"):
        assert summary["stages"]["grpo"]["metrics"][key] == pytest.approx(reference[key]), key
    client, runs = stage_runs(workdir, "grpo")
    assert [run.info.status for run in runs] == ["FAILED", "FINISHED"]  # the killed attempt, then its retry
    assert runs[-1].data.tags["posttrain.resumed_from_step"] == "4"


GRPO_LORA = {
    "grpo.max_steps": 12,
    "grpo.val_every": 6,
    "grpo.checkpoint_every": 6,
    "grpo.val_size": 32,
    "evaluate.size": 64,
    "grpo.lora.rank": 16,
    "grpo.lora.export_adapter": True,
    "grpo.optimizer.lr": 1e-3,  # adapters want about 10x full fine-tuning's rate (measured: 1e-4 reaches 0.77 at 25)
    "grpo.loss.kl_beta": 0.01,  # the KL reference is then the base model under the adapters
}


def grpo_artifact_dir(workdir: Path, summary: dict) -> Path:
    """The local folder of the GRPO stage's committed model in ``workdir``'s store."""
    return workdir / ".posttrain/store" / summary["stages"]["grpo"]["artifact"].split("/store/", 1)[1]


def run_from_sft(default_run, services, tmp_path, overrides: dict) -> tuple[list[str], Path, dict]:
    """grpo-pipeline with ``overrides`` in a folder seeded with the default run's SFT model: its arguments, folder
    and summary."""
    args = ["run", "grpo-pipeline", "--json", *settings(overrides)]
    first_dir = seed(tmp_path / "first", default_run)
    return args, first_dir, summary_of(run_cli(args, first_dir, env=services.prefect_env))


def assert_accuracy_gain(summary: dict, gain: float) -> None:
    accuracy = summary["stages"]["evaluate"]["metrics"]
    assert accuracy["accuracy_final"] >= accuracy["accuracy_sft"] + gain, accuracy


def resume_from_step_6(default_run, services, tmp_path, args: list[str], first_dir, first: dict, keys) -> dict:
    """A folder holding only the first run's GRPO checkpoints (step 6 of 12) runs ``args`` again: it resumes at step
    6 and the curves of ``keys`` from there equal the first run's (1e-5). Returns the resumed run's summary."""
    client, run = stage_run(first_dir, "grpo", first)
    checkpoints = grpo_artifact_dir(first_dir, first).parent / "checkpoints"
    resumed_dir = seed(tmp_path / "resumed", default_run)
    shutil.copytree(
        checkpoints, resumed_dir / ".posttrain/store" / checkpoints.relative_to(first_dir / ".posttrain/store")
    )
    resumed = summary_of(run_cli(args, resumed_dir, env=services.prefect_env))
    resumed_client, resumed_run = stage_run(resumed_dir, "grpo", resumed)
    assert int(resumed_run.data.tags["posttrain.resumed_from_step"]) == 6
    for key in keys:
        want = metric_curve(client, run.info.run_id, key)
        got = metric_curve(resumed_client, resumed_run.info.run_id, key)
        assert sorted(got) == list(range(7, 13))
        for step, value in got.items():
            assert value == pytest.approx(want[step], abs=1e-5), (key, step)
    return resumed


@pytest.mark.extended
@pytest.mark.timeout(2700)  # services 300, default run 1200, 2 x 600
def test_lora_grpo_learns_and_resumes_exactly_from_its_adapter_checkpoint(default_run, services, tmp_path):
    """GRPO with LoRA adapters on the SFT model: held-out accuracy rises by >= 0.3 (measured 0.17 -> 0.92 in 12
    steps), the generator's logprobs match the trainer's after every refit of merged weights, the committed model
    holds the merged weights and the adapter alone. A folder holding only the first run's step-6 checkpoint
    (adapters and their optimizer state) resumes from it to the uninterrupted run's curve."""
    args, first_dir, first = run_from_sft(default_run, services, tmp_path, GRPO_LORA)
    assert first["stages"]["grpo"]["metrics"]["token_mult_prob_error_median"] <= 1.001
    assert_accuracy_gain(first, 0.3)
    client, run = stage_run(first_dir, "grpo", first)
    trainable, total = (int(run.data.params[f"model/{k}parameters"]) for k in ("trainable_", ""))
    assert 0 < trainable < total / 4
    (model_dir,) = grpo_artifact_dir(first_dir, first).glob("*/model.safetensors")
    adapter = json.loads((model_dir.parent / "adapter/adapter_config.json").read_text())
    assert adapter["r"] == 16 and (model_dir.parent / "adapter/adapter_model.safetensors").is_file()
    resumed = resume_from_step_6(default_run, services, tmp_path, args, first_dir, first, ("reward/mean", "loss", "kl"))
    assert resumed["stages"]["evaluate"]["metrics"] == first["stages"]["evaluate"]["metrics"]


GRPO_ASYNC = {
    **HF_GENERATION,
    "grpo.max_steps": 12,
    "grpo.val_every": 6,
    "grpo.checkpoint_every": 6,
    "grpo.val_size": 32,
    "evaluate.size": 64,
    "grpo.async.enabled": True,
}


@pytest.mark.extended
@pytest.mark.timeout(2700)  # services 300, default run 1200, 2 x 600
def test_async_grpo_learns_and_resumes_exactly_with_the_steps_sampled_ahead(default_run, services, tmp_path):
    """Asynchronous GRPO (one step ahead) on the SFT model: held-out accuracy rises by >= 0.5, every step after the
    first trains on episodes one step old, corrected by importance weights. A folder holding only the first run's
    step-6 checkpoint (which holds step 7's episodes, sampled with the weights of step 6) resumes to the
    uninterrupted run's curve."""
    args, first_dir, first = run_from_sft(default_run, services, tmp_path, GRPO_ASYNC)
    assert_accuracy_gain(first, 0.5)
    client, run = stage_run(first_dir, "grpo", first)
    assert metric_curve(client, run.info.run_id, "async/staleness") == {1: 0.0, **{s: 1.0 for s in range(2, 13)}}
    assert all(0.5 < w < 1.5 for w in metric_curve(client, run.info.run_id, "is_weight_mean").values())
    keys = ("reward/mean", "loss", "is_weight_mean")
    resumed = resume_from_step_6(default_run, services, tmp_path, args, first_dir, first, keys)
    assert resumed["stages"]["evaluate"]["metrics"] == first["stages"]["evaluate"]["metrics"]


GRPO_PPO = {**GRPO_ASYNC, "grpo.async.enabled": False, "grpo.advantage_estimator": "gae"}


@pytest.mark.extended
@pytest.mark.timeout(2700)  # services 300, default run 1200, 2 x 600
def test_ppo_with_a_critic_learns_and_resumes_exactly_with_its_critic(default_run, services, tmp_path):
    """PPO (GAE advantages from a learned critic) on the SFT model: held-out accuracy rises by >= 0.5 and the critic
    learns (its value loss ends below where it starts). A folder holding only the step-6 checkpoint (policy
    and critic) resumes to the uninterrupted run's curve, the critic's loss included."""
    args, first_dir, first = run_from_sft(default_run, services, tmp_path, GRPO_PPO)
    assert_accuracy_gain(first, 0.5)
    client, run = stage_run(first_dir, "grpo", first)
    value_loss = metric_curve(client, run.info.run_id, "critic/value_loss")
    assert value_loss[12] < value_loss[1], value_loss  # measured 0.24 -> 0.10 by step 12 on the defaults
    checkpoints = grpo_artifact_dir(first_dir, first).parent / "checkpoints"
    assert list(checkpoints.glob("step_000006/**/critic/*"))  # under the commit's upload prefix
    resume_from_step_6(
        default_run, services, tmp_path, args, first_dir, first, ("reward/mean", "loss", "critic/value_loss")
    )


DISTILL_SMALL = {**HF_GENERATION, "distill.val_size": 32, "evaluate.size": 64}


@pytest.mark.extended
@pytest.mark.timeout(2400)  # services 300, default run 1200, 600 + 2 x 120
def test_distill_pipeline_teaches_the_sft_model_the_grpo_models_answers(default_run, services, tmp_path):
    """distill-pipeline with the default run's GRPO model as the teacher: the student (the default SFT model, cached)
    gains >= 0.3 held-out accuracy (measured 0.18 -> 0.86) from the teacher's logprobs alone, and its reverse KL to
    the teacher falls. Without a teacher, or with one of another tokenizer, the run fails in one line."""
    from engine.config import TinyModelConfig
    from engine.models.tiny import make_tiny_model
    from tests.e2e.test_bad_input import assert_one_line_error

    workdir = seed(tmp_path / "distill", default_run)
    env = services.prefect_env
    missing = run_cli(["run", "distill-pipeline", *settings(DISTILL_SMALL)], workdir, env=env, timeout=120)
    assert_one_line_error(missing, "distill.teacher is required")
    assert not (workdir / ".posttrain/store/stages/distill").exists()

    store = default_run.summary["stages"]["grpo"]["artifact"].split("/store/", 1)[1]
    teacher = f"file://{workdir}/.posttrain/store/{store}"  # the seeded copy of the default run's GRPO model
    args = ["run", "distill-pipeline", "--json", *settings({**DISTILL_SMALL, "distill.teacher": teacher})]
    summary = summary_of(run_cli(args, workdir, env=env))
    assert cached(summary) == {"model": True, "data": True, "sft": True, "distill": False, "evaluate": False}
    distill = summary["stages"]["distill"]["metrics"]
    assert distill["token_mult_prob_error_median"] <= 1.001, distill
    accuracy = summary["stages"]["evaluate"]["metrics"]
    assert accuracy["accuracy_final"] >= accuracy["accuracy_sft"] + 0.3, accuracy
    client, run = stage_run(workdir, "distill", summary)
    kl = metric_curve(client, run.info.run_id, "distill/reverse_kl")
    assert kl[max(kl)] < kl[1], kl  # measured 0.47 -> 0.15

    other = make_tiny_model(tmp_path / "other-tokenizer", TinyModelConfig(vocab_size=300))
    args = ["run", "distill-pipeline", *settings({**DISTILL_SMALL, "distill.teacher": str(other)})]
    assert_one_line_error(run_cli(args, workdir, env=env), f"distill.teacher {other} has another tokenizer")


@pytest.mark.extended
@pytest.mark.timeout(2100)  # services 300, default run 1200, 600
def test_the_reward_model_learns_and_serves_as_a_reward(seeded_workdir, services):
    """grpo.reward_model_weight > 0 trains the reward model (stages.reward_model: auto) on the SFT model and adds
    sigmoid(its score) to the verifier's reward."""
    args = settings({**GRPO_SMALL, "grpo.reward_model_weight": 0.5})
    summary = summary_of(run_cli(["run", "grpo-pipeline", "--json", *args], seeded_workdir, env=services.prefect_env))
    assert cached(summary) == {
        "model": True,
        "data": True,
        "sft": True,
        "reward_model": False,
        "grpo": False,
        "evaluate": False,
    }
    rm = summary["stages"]["reward_model"]["metrics"]
    # the likelihood head starts from the SFT model, which already ranks about 98 % of the val pairs right (measured
    # 0.984 -> 0.977, one pair of 128): learning shows in the Bradley-Terry val loss (measured 0.0433 -> 0.0324)
    assert rm["val_pairwise_accuracy"] >= 0.9 and rm["val_loss_last"] <= 0.9 * rm["val_loss_first"], rm
    assert summary["stages"]["grpo"]["metrics"]["token_mult_prob_error_median"] <= 1.001
    client, runs = stage_runs(seeded_workdir, "grpo")
    rewards = metric_curve(client, runs[-1].info.run_id, "reward/reward_model")
    mean = metric_curve(client, runs[-1].info.run_id, "reward/mean")
    verifier = metric_curve(client, runs[-1].info.run_id, "reward/environment")
    assert sorted(rewards) == list(range(1, 9)) and all(0.0 < value < 1.0 for value in rewards.values())
    for step in rewards:  # the reward trained on is the weighted sum of the two
        assert mean[step] == pytest.approx(verifier[step] + 0.5 * rewards[step], abs=1e-5)


@pytest.mark.extended
@pytest.mark.timeout(3300)  # services 300, default run 1200, 1200 + 600
def test_dpo_pipeline_tiny_defaults_and_its_cached_reference(seeded_workdir, services):
    """DPO on its defaults from the shared SFT model: held-out preference accuracy >= 0.8, greedy accuracy no worse
    than SFT's. Then DPO alone (``sft_weight: 0``, so the NLL term cannot be what learns): the implicit reward
    margin rises from 0 and preference accuracy still reaches 0.8; and it reuses the reference logprobs the first
    run kept in the store."""
    env = services.prefect_env
    args = ["run", "dpo-pipeline", "--json", *settings(HF_GENERATION)]  # evaluate's greedy answers
    summary = summary_of(run_cli(args, seeded_workdir, timeout=1200, env=env))
    assert cached(summary) == {"model": True, "data": True, "sft": True, "dpo": False, "evaluate": False}
    assert summary["stages"]["dpo"]["metrics"]["val_preference_accuracy"] >= 0.8  # measured 0.906
    evaluation = summary["stages"]["evaluate"]["metrics"]
    assert evaluation["accuracy_final"] >= evaluation["accuracy_sft"], evaluation
    assert evaluation["preference_accuracy"] >= 0.8, evaluation

    reference = seeded_workdir / ".posttrain/store/cache/dpo_reference"
    stamps = {p: p.stat().st_mtime for p in reference.glob("*/MANIFEST.json")}
    assert len(stamps) == 2  # train and val splits
    alone = settings({"dpo.sft_weight": 0, "evaluate.size": 32})
    second = summary_of(run_cli([*args, *alone], seeded_workdir, env=env))
    assert second["stages"]["sft"]["cached"] and not second["stages"]["dpo"]["cached"]
    assert {p: p.stat().st_mtime for p in reference.glob("*/MANIFEST.json")} == stamps
    dpo = second["stages"]["dpo"]["metrics"]
    assert dpo["val_preference_accuracy"] >= 0.8, dpo  # measured 0.883
    client, run = stage_run(seeded_workdir, "dpo", second)
    margins = metric_curve(client, run.info.run_id, "val/reward_margin")
    assert margins[0] == pytest.approx(0.0, abs=1e-6) and margins[max(margins)] > 0.1, margins  # measured 0.247


@pytest.mark.extended
@pytest.mark.timeout(1500)  # services 300, 1200
def test_tool_use_pipeline_makes_correct_calls(tmp_path, services):
    """The calculator config on small step counts: the SFT model, half of whose demonstrations call the tool,
    calls it correctly during GRPO, the episodes that call it earn reward, and they take more than one turn."""
    args = ["run", "grpo-pipeline", "--config", "grpo_tool_tiny", "--json", *settings(GRPO_SMALL)]
    summary = summary_of(
        run_cli([*args, "--set", "sft.max_steps=150"], cwd=tmp_path, timeout=1200, env=services.prefect_env)
    )
    assert summary["status"] == "completed"
    client, runs = stage_runs(tmp_path, "grpo")
    run_id = runs[-1].info.run_id
    assert max(metric_curve(client, run_id, "tool_call_rate").values()) > 0.1
    assert max(metric_curve(client, run_id, "tool_correct_call_rate").values()) > 0.1
    assert max(metric_curve(client, run_id, "tool_reward").values()) > 0.1
    assert max(metric_curve(client, run_id, "turns").values()) > 1.0
