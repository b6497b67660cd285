"""The supervised loop (SFT, reward model, DPO) without a cluster: the batches it trains, when it validates and
checkpoints, what it exports, and an exact resume from its checkpoint."""

from __future__ import annotations

import json

import pytest

from engine.algorithms.sft import sft_loss
from engine.algorithms.supervised import LoopSpec, StepSampler, run_loop
from engine.config import load_config
from engine.data.chat import TokenizedExample
from engine.storage import ArtifactStore
from tests.unit.algorithms.fakes import FakePolicy, RecordingRun

PREFIX = "stages/sft/k"


def spec(max_steps: int = 5) -> LoopSpec:
    train = [TokenizedExample([1, 2, 3 + i], [0, 1, 1]) for i in range(7)]
    return LoopSpec(
        name="sft",
        train=train,
        val=train[:2],
        loss_fn=sft_loss,
        validation=lambda sums: {"val/loss": sums["loss"]},
        summary=lambda history, last: {"val_loss_first": history[0]["val/loss"], "train_loss_last": last},
        optimizer=load_config().sft.optimizer,
        max_steps=max_steps,
        batch_size=3,
        val_every=2,
        checkpoint_every=2,
    )


def run(tmp_path, policy: FakePolicy, resume: str = "auto"):
    cfg = load_config(None, {"resume": resume, "workdir": str(tmp_path / "work")})
    store = ArtifactStore(f"file://{tmp_path}/store", tmp_path / "cache")
    recorded = RecordingRun()
    ref = run_loop(cfg, store, recorded, tmp_path, spec(), PREFIX, pad_id=0, policy=policy)
    return ref, store, recorded


def test_trains_validates_checkpoints_and_exports(tmp_path):
    policy = FakePolicy()
    ref, store, recorded = run(tmp_path, policy)
    sampler, examples = StepSampler(7, 3, seed=0), spec().train
    assert [[e.input_ids[-1] for e in batch] for batch in policy.trained] == [
        [examples[i].input_ids[-1] for i in sampler.indices(step)] for step in range(5)
    ]
    assert store.list(f"{PREFIX}/checkpoints") == [
        f"{PREFIX}/checkpoints/step_000002",
        f"{PREFIX}/checkpoints/step_000004",
    ]
    state = json.loads((store.download(f"{PREFIX}/checkpoints/step_000004") / "trainer_state.json").read_text())
    assert (
        state["step"] == 4 and state["data_position"] == 12 and [v["step"] for v in state["val_history"]] == [0, 2, 4]
    )
    assert [step for step, metrics in sorted(recorded.metrics.items()) if "val/loss" in metrics] == [0, 2, 4, 5]
    assert sorted(recorded.metrics) == [0, 1, 2, 3, 4, 5] and recorded.metrics[3]["train/tokens"] == 9.0
    assert ref.uri.endswith(f"{PREFIX}/model") and ref.metrics["steps"] == 5.0
    assert ref.metrics["train_loss_last"] == pytest.approx(1 / 5) and ref.metrics["val_loss_first"] == 2.0
    exported = store.download(ref.uri)
    assert json.loads((exported / "config.json").read_text()) == {"steps_done": 5}
    assert "sft:" in (exported / "posttrain_config.yaml").read_text()


def test_resume_continues_from_the_newest_checkpoint_with_the_same_batches(tmp_path):
    first = FakePolicy()
    run(tmp_path, first)
    resumed = FakePolicy()
    ref, _, recorded = run(tmp_path, resumed)
    assert recorded.tags["posttrain.resumed_from_step"] == "4" and len(resumed.loaded) == 1
    assert resumed.trained == first.trained[4:]  # step 5's batch again, and nothing before it
    assert sorted(recorded.metrics) == [5] and ref.metrics["val_loss_first"] == 2.0  # history came with it

    fresh = FakePolicy()
    _, _, recorded = run(tmp_path, fresh, resume="never")
    assert fresh.loaded == [] and len(fresh.trained) == 5 and "posttrain.resumed_from_step" not in recorded.tags


def test_a_named_checkpoint_resumes_only_a_run_of_its_config_and_its_own_stage(tmp_path, caplog):
    from engine.errors import ConfigError

    run(tmp_path, FakePolicy())
    checkpoint = f"file://{tmp_path}/store/{PREFIX}/checkpoints/step_000004"

    def resumed_with(**overrides):
        cfg = load_config(None, {"resume": checkpoint, "workdir": str(tmp_path / "work"), **overrides})
        store = ArtifactStore(f"file://{tmp_path}/store", tmp_path / "cache")
        policy, recorded = FakePolicy(), RecordingRun()
        run_loop(cfg, store, recorded, tmp_path, spec(), "stages/sft/other-key", pad_id=0, policy=policy)
        return policy, recorded

    policy, recorded = resumed_with(**{"sft.max_steps": 8, "sft.val_every": 3})  # may change: how long, how often
    assert recorded.tags["posttrain.resumed_from_step"] == "4" and len(policy.trained) == 1
    with pytest.raises(
        ConfigError,
        match=r"resume: .*step_000004 was trained with another config: "
        r"sft.optimizer.lr \(0.002 -> 0.005\); only sft.checkpoint_every, sft.max_steps",
    ):
        resumed_with(**{"sft.optimizer.lr": 0.005})
    grpo_checkpoint = checkpoint.replace("stages/sft/", "stages/grpo/")
    cfg = load_config(None, {"resume": grpo_checkpoint, "workdir": str(tmp_path / "work")})
    store = ArtifactStore(f"file://{tmp_path}/store", tmp_path / "cache")
    with caplog.at_level("INFO", logger="posttrain.checkpointing"):
        fresh = FakePolicy()
        run_loop(cfg, store, RecordingRun(), tmp_path, spec(), "stages/sft/third-key", pad_id=0, policy=fresh)
    assert fresh.loaded == [] and len(fresh.trained) == 5  # another stage's checkpoint: this stage starts afresh
    assert "sft starts from step 0: its config differs from the 1 run(s) with checkpoints" in caplog.text


def test_a_run_resumed_from_a_named_checkpoint_is_committed_under_its_own_key(tmp_path):
    from engine import stages

    class Tracker:
        def start_stage(self, parent, name, params):
            stage_run = RecordingRun()
            stage_run.run_id, stage_run.finish = None, lambda status: None
            stage_run.log_dataset = lambda *dataset: None
            return stage_run

    prefixes = []

    def body(run, prefix):
        prefixes.append(prefix)
        return stages.ArtifactRef(uri=f"file://{tmp_path}/x", digest="d")

    store = ArtifactStore(f"file://{tmp_path}/store", tmp_path / "cache")
    checkpoint = f"file://{tmp_path}/store/stages/sft/abc/checkpoints/step_000004"
    for resume in ("auto", checkpoint, checkpoint.replace("/sft/", "/grpo/")):
        cfg = load_config(None, {"resume": resume, "workdir": str(tmp_path / "work"), "cache": False})
        data = stages.ArtifactRef(uri=f"file://{tmp_path}/data", digest="d")
        stages._run_stage(stages.Runtime(cfg, store, Tracker()), "sft", {"a": 1}, {"data": "d"}, None, body, data)
    fresh, resumed, other_stage = prefixes
    assert resumed != fresh and other_stage == fresh  # a resume of another stage does not touch this key
