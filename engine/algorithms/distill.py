"""On-policy distillation: GRPO's loop with a teacher in place of the reward.

    for step in steps:
        the student samples the step's prompts on the generator        (GRPO's collect)
        a frozen teacher scores every sampled token                     (a forward pass)
        advantage[t] = teacher logprob[t] - student logprob[t]         (per token: a reverse KL)
        train with the clipped policy loss, refit the generator

The environments still score the samples, for the logged accuracy; nothing is trained on the reward. Teacher and
student must share a tokenizer (checked before any worker starts).
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.algorithms.grpo import GRPOLoop, ScoredStep, run_policy_stage
from engine.algorithms.rollouts import Episode
from engine.config import AsyncGRPOConfig, GRPOConfig, PipelineConfig
from engine.data.chat import TokenizedExample
from engine.models.loading import ModelSource, check_same_tokenizer
from engine.storage import ArtifactRef, ArtifactStore
from engine.tracking import StageRun


def loop_settings(cfg: PipelineConfig) -> GRPOConfig:
    """GRPO's settings for the distillation loop: its prompts, environments and rewards (scored, logged), the
    distill section's steps, sampling, loss, optimizer and adapters; no reward model, no group filtering."""
    d = cfg.distill
    return cfg.grpo.model_copy(
        update={
            "max_steps": d.max_steps,
            "prompts_per_step": d.prompts_per_step,
            "generations_per_prompt": d.generations_per_prompt,
            "max_new_tokens": d.max_new_tokens,
            "temperature": d.temperature,
            "val_every": d.val_every,
            "val_size": d.val_size,
            "checkpoint_every": d.checkpoint_every,
            "loss": d.loss,
            "optimizer": d.optimizer,
            "lora": d.lora,
            "reward_model_weight": 0.0,
            "dynamic_sampling": False,
            "overlong_penalty": None,
            "async_": AsyncGRPOConfig(),  # synchronous: its cache key holds none of grpo.async
        }
    )


class DistillLoop(GRPOLoop):
    """GRPO's step with the teacher's per-token advantages in place of group-relative rewards."""

    def score(self, episodes: list[Episode]) -> ScoredStep:
        rewards, parts, _ = self.rewards(episodes)  # logged: how often the student is right
        return ScoredStep(rewards, torch.zeros(len(episodes)), list(range(len(episodes))), parts)

    def examples(self, episodes: list[Episode], scored: ScoredStep) -> list[TokenizedExample]:
        examples = super().examples(episodes, scored)
        gaps, tokens = 0.0, 0
        for example, teacher in zip(examples, self.roles.teacher.forward(examples)):
            del example.scalars["advantage"]
            student = example.token_values["generation_logprobs"]  # the sampler's: exactly the tokens' logprobs
            advantage = [(t - s) * m for t, s, m in zip(teacher.tolist(), student, example.loss_mask)]
            example.token_values["advantage"] = advantage  # aligned to the input ids, 0 off the response
            gaps, tokens = gaps - sum(advantage), tokens + sum(example.loss_mask)
        self.reverse_kl = gaps / max(1, tokens)
        return examples

    def step(self, step: int) -> dict[str, float]:
        metrics = super().step(step)
        return {**metrics, "distill/reverse_kl": self.reverse_kl}


def run_distill(
    cfg: PipelineConfig,
    store: ArtifactStore,
    run: StageRun,
    student: ModelSource | Path,
    teacher: ModelSource | Path,
    dataset_dir: Path,
    stage_prefix: str,
) -> ArtifactRef:
    check_same_tokenizer(student, teacher, f"distill.teacher {cfg.distill.teacher or teacher}")
    return run_policy_stage(
        cfg, loop_settings(cfg), DistillLoop, store, run, student, dataset_dir, stage_prefix, None, teacher
    )
