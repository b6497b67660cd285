"""`profile.steps`: torch profiler traces of exactly those steps, taken in the trainer ranks and generation workers
(real Ray actors), attached to the stage's MLflow run."""

from __future__ import annotations

import gzip
import json

from engine.algorithms.sft import sft_loss
from engine.config import GenerationConfig, ProfileConfig, TrackingConfig
from engine.generation.group import GenerationGroup
from engine.generation.interfaces import SamplingParams
from engine.profiling import StepTraces
from engine.tracking import Tracker
from tests.integration.conftest import BATCH
from tests.integration.test_fsdp2 import make_policy

OPTIMIZER_STEP = "Optimizer.step#AdamW.step"  # the profiler's name for one optimizer step


def trace_events(path) -> list[dict]:
    return json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]


def test_the_chosen_steps_are_traced_in_every_worker_and_attached(ray_local, tiny_model_dir, examples, tmp_path):
    data, pad = examples
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), tmp_path / "artifacts")
    run = tracker.start_stage(None, "grpo", {})
    policy = make_policy(tiny_model_dir, pad, world_size=2, token_budget=100_000)
    generation = GenerationGroup(GenerationConfig(backend="hf"), tiny_model_dir)
    try:
        traces = StepTraces(ProfileConfig(steps=[2, 3], ranks=[0, 1, 5]), run, "grpo", policy, generation)
        for step in range(1, 5):
            traces.before(step)
            generation.generate([data[0].input_ids[:8]], SamplingParams(max_tokens=4, seed=step))
            policy.train(data[(step - 1) % 3 * BATCH : ((step - 1) % 3 + 1) * BATCH], sft_loss)
            traces.after(step)
        assert not traces.active
    finally:
        policy.shutdown()
        generation.shutdown()
    run.finish()

    names = {a.path for a in tracker.client.list_artifacts(run.run_id, "profile/grpo")}
    expected = {f"{name}_steps2-3.json.gz" for name in ("trainer_rank0", "trainer_rank1", "generation_worker0")}
    assert names == {f"profile/grpo/{name}" for name in expected}  # rank 5 is not in a 2-rank group
    (tmp_path / "got").mkdir()
    tracker.client.download_artifacts(run.run_id, "profile/grpo", str(tmp_path / "got"))
    for rank in (0, 1):
        events = trace_events(tmp_path / "got" / "grpo" / f"trainer_rank{rank}_steps2-3.json.gz")
        assert sum(event.get("name") == OPTIMIZER_STEP for event in events) == 2  # steps 2 and 3, not 1 or 4
    generated = trace_events(tmp_path / "got" / "grpo" / "generation_worker0_steps2-3.json.gz")
    assert any(event.get("name") == "aten::linear" for event in generated)


def test_a_loop_that_ends_inside_the_range_still_attaches_what_it_traced(tmp_path):
    class Group:  # a trainer group's profiling surface, nothing else
        def __init__(self):
            self.started: list[int] = []

        def start_profile(self, ranks):
            self.started = list(ranks)

        def stop_profile(self, ranks):
            return {rank: b"trace" for rank in self.started}

    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), tmp_path / "artifacts")
    run = tracker.start_stage(None, "sft", {})
    traces = StepTraces(ProfileConfig(steps=[3, 9]), run, "sft", Group())
    for step in range(1, 6):  # a 5-step stage, or a resume: the range starts, the loop ends first
        traces.before(step)
        traces.after(step)
    traces.close(5)
    run.finish()
    assert [a.path for a in tracker.client.list_artifacts(run.run_id, "profile/sft")] == [
        "profile/sft/trainer_rank0_steps3-5.json.gz"
    ]
