"""The training loop shared by the offline stages (SFT, reward model, DPO).

    for step in steps:
        units = the step's examples (a pure function of seed and step: exact resume)
        train one optimizer step with the stage's loss (globally normalized)
        every val_every: evaluate; every checkpoint_every: checkpoint to the store
    export the final Hugging Face model to the store

A stage supplies its examples, its loss and how to read its validation numbers (a ``LoopSpec``); the
loop owns batching, resume, logging and the artifact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from engine import checkpointing
from engine.config import LoraConfig, OptimizerConfig, PipelineConfig
from engine.data.chat import TokenizedExample
from engine.logs import StepProgress
from engine.models.loading import ModelSource, local_folder
from engine.policy.group import PolicyGroup, start_policy_group
from engine.profiling import StepTraces
from engine.storage import ArtifactRef, ArtifactStore
from engine.tracking import StageRun


class StepSampler:
    """Which units a step trains on: epoch-wise permutations drawn from the seed.

    A pure function of (seed, step), so the data position of a resumed run is exact by construction.
    """

    def __init__(self, num_units: int, batch_size: int, seed: int):
        self.num_units, self.batch_size, self.seed = num_units, batch_size, seed

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_units, generator=generator).tolist()

    def indices(self, step: int) -> list[int]:
        start = step * self.batch_size
        out: list[int] = []
        while len(out) < self.batch_size:
            epoch, offset = divmod(start + len(out), self.num_units)
            take = min(self.batch_size - len(out), self.num_units - offset)
            out += self._permutation(epoch)[offset : offset + take]
        return out


@dataclass
class LoopSpec:
    name: str
    train: list[TokenizedExample]
    val: list[TokenizedExample]
    loss_fn: Callable
    validation: Callable[[dict[str, float]], dict[str, float]]  # evaluate() sums -> named val metrics
    summary: Callable[[list[dict[str, float]], float], dict[str, float]]  # (val history, last loss) -> metrics
    optimizer: OptimizerConfig
    max_steps: int
    batch_size: int  # units per step
    val_every: int
    checkpoint_every: int
    group_size: int = 1  # examples per unit (2: a chosen/rejected pair)
    model_kind: str = "causal_lm"
    lora: LoraConfig | None = None  # the stage's adapters (rank 0: full fine-tuning)


def _unit_examples(examples: list[TokenizedExample], units: list[int], size: int) -> list[TokenizedExample]:
    return [examples[u * size + k] for u in units for k in range(size)]


def run_loop(
    cfg: PipelineConfig,
    store: ArtifactStore,
    run: StageRun,
    model: ModelSource | Path,
    spec: LoopSpec,
    stage_prefix: str,
    pad_id: int,
    policy: PolicyGroup | None = None,
) -> ArtifactRef:
    """Train, checkpoint and export; returns the committed model's ref with the stage's metrics."""
    if policy is None:
        policy = start_policy_group(cfg, model, spec.optimizer, spec.max_steps, pad_id, spec.model_kind, spec.lora)
    try:
        return _train(cfg, store, run, model, spec, stage_prefix, policy)
    finally:
        policy.shutdown()


def _train(
    cfg: PipelineConfig,
    store: ArtifactStore,
    run: StageRun,
    model: ModelSource | Path,
    spec: LoopSpec,
    stage_prefix: str,
    policy: PolicyGroup,
) -> ArtifactRef:
    sampler = StepSampler(len(spec.train) // spec.group_size, spec.batch_size, cfg.seed)
    state = checkpointing.resume(store, policy, stage_prefix, cfg, run)
    run.log_params(policy.parameter_counts())

    def validate(step: int) -> dict[str, float]:
        metrics = spec.validation(policy.evaluate(spec.val, spec.loss_fn, spec.group_size))
        state.val_history.append({"step": step, **metrics})
        return metrics

    if not state.val_history and spec.val:
        run.log_metrics(validate(0), step=0)
    last_loss = float("nan")
    progress = StepProgress(state.step, spec.max_steps, spec.name)
    traces = StepTraces(cfg.profile, run, spec.name, policy)
    for step in progress:
        started = time.perf_counter()
        batch = _unit_examples(spec.train, sampler.indices(step), spec.group_size)
        traces.before(step + 1)
        stats = policy.train(batch, spec.loss_fn, spec.group_size)
        traces.after(step + 1)
        last_loss, state.step = stats["loss"], step + 1
        metrics = {f"train/{k}": stats[k] for k in ("loss", "grad_norm", "lr", "normalizer_tokens")}
        metrics["train/tokens"] = float(sum(len(example) for example in batch))  # non-padding input tokens
        metrics["timing/step"] = time.perf_counter() - started
        if spec.val and (state.step % spec.val_every == 0 or state.step == spec.max_steps):
            metrics.update(validate(state.step))
        run.log_metrics(metrics, step=state.step)
        progress.set_postfix(loss=f"{last_loss:.4f}")
        if state.step % spec.checkpoint_every == 0 and state.step < spec.max_steps:
            checkpointing.checkpoint(store, policy, stage_prefix, cfg, state, state.step * spec.batch_size)
    traces.close(state.step)
    run.flush()

    metrics = {**spec.summary(state.val_history, last_loss), "steps": float(spec.max_steps)}
    return checkpointing.export_model(store, policy, local_folder(model), f"{stage_prefix}/model", cfg, metrics)
