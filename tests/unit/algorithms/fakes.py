"""Small in-process stand-ins for the worker groups a controller drives: scripted generation, environments
called in-process through the router's own routing, and a trainer group that records what it is asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from engine.config import GenerationConfig
from engine.data.chat import TokenizedExample
from engine.environments.interfaces import EnvStepResult
from engine.environments.router import merge_results, rows_by_task
from engine.generation.interfaces import Completion, SamplingParams
from engine.policy.shards import ShardSource, ShardTarget
from engine.storage import ManifestEntry

# reply(prompt_token_ids, row, call) -> (text, finish_reason): ``row`` counts (prompt, sample) pairs of the call
# (GRPO sends each episode as its own prompt, so row % generations_per_prompt is the sample's index)
Script = Callable[[list[int], int, int], tuple[str, str]]


class FakeGeneration:
    """Answers each (prompt, sample) with scripted text, tokenized here: token ids and logprobs come back exactly
    as a real engine returns them (the stop token included when the reply ends with a stop)."""

    def __init__(self, tokenizer, script: Script):
        self.tokenizer, self.script = tokenizer, script
        self.cfg = GenerationConfig(backend="hf", refit="object_store")  # refits arrive through update_weights
        self.calls: list[tuple[list[list[int]], SamplingParams]] = []
        self.versions: list[int] = []
        self.held: list[int] = []  # the weight version the generator held at each call
        self.die_at_call: int | None = None  # the call at which a worker "dies" (WorkerLost), once
        self.restarts = 0
        self.applies_adapters = False  # refits push full weights

    def restart(self) -> None:
        self.restarts += 1

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        from engine.generation.group import WorkerLost

        if self.die_at_call == len(self.calls):
            self.die_at_call = None
            raise WorkerLost("a generation worker died: killed by the test")
        call = len(self.calls)
        self.calls.append(([list(p) for p in prompts], params))
        self.held.append(self.versions[-1] if self.versions else 0)
        out, row = [], 0
        for prompt in prompts:
            samples = []
            for _ in range(params.n):
                text, finish = self.script(prompt, row, call)
                row += 1
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: params.max_tokens]
                if finish == "stop":
                    ids = ids + [self.tokenizer.eos_token_id]
                logprobs = [-0.01 * (k + 1) - 0.001 * call for k in range(len(ids))]  # distinct per position
                samples.append(Completion(ids, logprobs, finish, text))
            out.append(samples)
        return out

    def update_weights(self, manifest: list, buckets: list, version: int) -> None:
        self.versions.append(version)

    def shutdown(self) -> None:
        pass


class InProcessRouter:
    """The environment router's routing and merge over environment objects in this process."""

    def __init__(self, environments: dict[str, Any]):
        self.environments = environments

    def step(self, message_logs: list, metadata: list[dict[str, Any]]) -> EnvStepResult:
        by_task = rows_by_task(metadata, self.environments)
        parts = {
            task: self.environments[task].step([message_logs[r] for r in rows], [metadata[r] for r in rows])
            for task, rows in by_task.items()
        }
        return merge_results(len(message_logs), by_task, parts)

    def shutdown(self) -> None:
        pass


class FakePolicy:
    """A trainer group that records training calls and checkpoints; ``forward`` gives aligned logprobs."""

    def __init__(self, forward_value: Callable[[TokenizedExample, int], float] | None = None):
        self.trained: list[list[TokenizedExample]] = []
        self.loss_fns: list[Any] = []
        self.saved: list[ShardTarget] = []
        self.loaded: list[ShardSource] = []
        self.steps_done = 0
        self.forward_value = forward_value or (lambda example, position: -0.5)

    def train(self, examples: list[TokenizedExample], loss_fn, group_size: int = 1) -> dict[str, float]:
        self.trained.append(list(examples))
        self.loss_fns.append(loss_fn)
        self.steps_done += 1
        tokens = float(sum(sum(e.loss_mask[1:]) for e in examples))
        return {
            "loss": 1.0 / self.steps_done,
            "grad_norm": 0.5,
            "lr": 1e-3,
            "normalizer_tokens": tokens,
            "valid_tokens": tokens,
            "token_mult_prob_error_sum": tokens,
        }

    def evaluate(self, examples: list[TokenizedExample], loss_fn, group_size: int = 1) -> dict[str, float]:
        return {"loss": 2.0 / (1 + self.steps_done)}

    def forward(self, examples: list[TokenizedExample]) -> list[torch.Tensor]:
        return [
            torch.tensor([0.0] + [self.forward_value(e, t) for t in range(1, len(e))], dtype=torch.float32)
            for e in examples
        ]

    def weight_buckets(self, bucket_bytes: int):
        return [], [], 0

    def save_checkpoint(self, target: ShardTarget) -> list[ManifestEntry]:
        self.saved.append(target)
        return target.write(lambda folder: self._write(folder / "fake_shards.json"))

    def load_checkpoint(self, source: ShardSource) -> None:
        self.loaded.append(source)
        self.steps_done = json.loads((source.local() / "fake_shards.json").read_text())["steps_done"]

    def export(self, target: ShardTarget, dtype: str = "float32") -> list[ManifestEntry]:
        return target.write(lambda folder: self._write(folder / "config.json"))

    def _write(self, path: Path) -> None:
        path.write_text(json.dumps({"steps_done": self.steps_done}))

    def parameter_counts(self) -> dict[str, int]:
        return {"model/parameters": 1000, "model/trainable_parameters": 10}

    def shutdown(self) -> None:
        pass


class RecordingRun:
    """A stage run (``engine.tracking.StageRun``) that keeps what it is sent."""

    def __init__(self):
        self.metrics: dict[int, dict[str, float]] = {}
        self.tags: dict[str, str] = {}
        self.params: dict[str, Any] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.setdefault(step, {}).update(metrics)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def flush(self) -> None:
        pass
