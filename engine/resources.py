"""What a stage's worker groups reserve on the Ray cluster, as Ray bundles by role.

One home for the sizes two checks compare against: a stage's preflight against the connected cluster, and the
cloud deployments' pod GPU counts against the recipes they run (tests/unit/test_deployment_files.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import GRPOConfig, PipelineConfig

Bundle = dict[str, float]
Groups = dict[str, tuple[int, Bundle]]  # role -> (workers, one worker's bundle)


def bundle_of(cpus: float, gpus: float) -> Bundle:
    """One worker's reservation; GPUs only where asked for (a zero entry would not fit a GPU-less node)."""
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def trainers(cfg: PipelineConfig) -> tuple[int, Bundle]:
    return cfg.policy.world_size, bundle_of(1.0, cfg.policy.gpus_per_worker)


def generators(cfg: PipelineConfig) -> tuple[int, Bundle]:
    return cfg.generation.num_workers, bundle_of(1.0, cfg.generation.gpus_per_worker)


def rl_groups(cfg: PipelineConfig, g: GRPOConfig, teacher: bool) -> Groups:
    """The groups a GRPO (or distillation) stage holds at once; a frozen copy of the policy's size for the KL
    reference (LoRA uses the policy's own base), the reward model, the teacher and PPO's critic."""
    groups: Groups = {"policy": trainers(cfg), "generation": generators(cfg)}
    if g.loss.kl_beta and not g.lora.enabled:
        groups["reference"] = trainers(cfg)
    if g.reward_model_weight > 0:
        groups["reward_model"] = trainers(cfg)
    if teacher:
        groups["teacher"] = trainers(cfg)
    if g.advantage_estimator == "gae":
        groups["critic"] = trainers(cfg)
    return groups


def stage_groups(cfg: PipelineConfig, stage: str) -> Groups:
    """``stage``: sft, reward_model, dpo, grpo, distill or evaluate."""
    if stage in ("sft", "reward_model", "dpo"):
        return {"policy": trainers(cfg)}
    if stage == "grpo":
        return rl_groups(cfg, cfg.grpo, teacher=False)
    if stage == "distill":
        from engine.algorithms.distill import loop_settings

        return rl_groups(cfg, loop_settings(cfg), teacher=True)
    if stage == "evaluate":  # a DPO evaluation's frozen policy groups start after the generation group stops
        return {"generation": generators(cfg)}
    raise ValueError(f"unknown stage {stage!r}")


def gpus(groups: Groups) -> float:
    return sum(count * bundle.get("GPU", 0.0) for count, bundle in groups.values())


def peak_gpus(cfg: PipelineConfig, stages: list[str]) -> float:
    """The GPUs a pipeline of ``stages`` holds at its busiest: what a single pod running Ray must have."""
    return max(gpus(stage_groups(cfg, stage)) for stage in stages)
