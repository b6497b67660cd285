"""Group Relative Policy Optimization: the controller.

    for step in steps:
        prompts   = the step's prompts (a pure function of seed and step: exact resume)
        episodes  = n rollouts per prompt on the generator (multi-turn with tool environments)
        rewards   = verifier (1/0) * w_v + sigmoid(reward model) * w_rm
        A         = leave-one-out group advantages, normalized by the group's std where it has one
        loss      = clipped_pg_loss over generated tokens, divided by the step's global token count
        train one optimizer step, then refit the generator with the new weights
        every val_every: greedy pass@1 on held-out prompts; every checkpoint_every: checkpoint

What is kept from the paper and why: one gradient step per batch, so the old policy is the current one
(ratio = exp(logprob - logprob.detach()), which carries the gradient of the ratio while its value is 1);
the generator's own logprobs are compared with the trainer's every step (token_mult_prob_error) and can
correct the difference by importance sampling (loss.importance_sampling). A KL penalty to the SFT model
is optional (loss.kl_beta; a frozen reference worker group is started only then).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import ray
import torch
from tqdm import tqdm

from engine import checkpointing
from engine.algorithms.advantages import grpo_advantages
from engine.algorithms.losses import PolicyLossConfig, clipped_pg_loss
from engine.algorithms.rollouts import Episode, greedy_accuracy, new_episodes, run_rollouts
from engine.algorithms.supervised import StepSampler
from engine.config import PipelineConfig
from engine.data.batching import MicroBatch
from engine.data.datasets import read_jsonl
from engine.environments.reward_model import RewardModelEnv
from engine.environments.router import EnvironmentRouter, environment_specs
from engine.generation.group import GenerationGroup, refit
from engine.generation.interfaces import SamplingParams
from engine.policy.group import start_policy_group
from engine.storage import ArtifactRef, ArtifactStore
from engine.tracking import StageRun

HISTORY_FILE = "history.jsonl"


class GRPOLoss:
    """The per-micro-batch loss; metrics are returned as sums so ranks and micro-batches add up."""

    def __init__(self, cfg: PolicyLossConfig):
        self.cfg = cfg

    def __call__(self, logprobs: torch.Tensor, batch: MicroBatch, normalizers: dict[str, float]):
        mask = batch["loss_mask"]
        loss, metrics = clipped_pg_loss(
            logprobs,
            logprobs.detach(),
            batch["advantage"],
            mask,
            self.cfg,
            ref_logprobs=batch.get("reference_logprobs"),
            generation_logprobs=batch["generation_logprobs"],
            global_valid_tokens=normalizers["tokens"],
            global_valid_seqs=normalizers["sequences"],
        )
        valid = float(mask.sum())
        drift = torch.exp((logprobs.detach() - batch["generation_logprobs"]).abs())
        sums = {
            "clip_tokens": metrics["clip_fraction"] * valid,
            "entropy_sum": metrics["approx_entropy"] * valid,
            "token_mult_prob_error_sum": float(torch.where(mask.bool(), drift, 0.0).sum()),
            "valid_tokens": valid,
        }
        if "kl" in metrics:
            sums["kl_sum"] = metrics["kl"] * valid
        return loss, sums


def episode_rewards(episodes: list[Episode], cfg: PipelineConfig, reward_model: Any) -> torch.Tensor:
    rewards = torch.tensor([e.reward for e in episodes]) * cfg.grpo.verifier_weight
    if reward_model is not None:
        scores = ray.get(reward_model.step.remote([e.messages for e in episodes], [e.metadata for e in episodes]))
        rewards += torch.tensor(scores.rewards) * cfg.grpo.reward_model_weight
    return rewards


def _edge_mean(values: list[float], last: bool) -> float:
    """Mean of the first (or last) tenth of a curve: a steadier 'first'/'last' value than one step."""
    width = max(1, len(values) // 10)
    part = values[-width:] if last else values[:width]
    return sum(part) / len(part)


def summarize(history: list[dict[str, float]], val_history: list[list[float]]) -> dict[str, float]:
    rewards = [h["reward/mean"] for h in history]
    return {
        "reward_mean_first": _edge_mean(rewards, last=False),
        "reward_mean_last": _edge_mean(rewards, last=True),
        "token_mult_prob_error_median": statistics.median(h["token_mult_prob_error"] for h in history),
        "step_seconds_median": statistics.median(h["timing/step"] for h in history),
        "refit_seconds_median": statistics.median(h["timing/refit"] for h in history),
        "val_accuracy_first": val_history[0][1],
        "val_accuracy_last": val_history[-1][1],
        "steps": float(len(history)),
    }


def run_grpo(
    cfg: PipelineConfig,
    store: ArtifactStore,
    run: StageRun,
    init_model_dir: Path,
    dataset_dir: Path,
    stage_prefix: str,
    reward_model_dir: Path | None = None,
) -> ArtifactRef:
    from transformers import AutoTokenizer

    g = cfg.grpo
    tokenizer = AutoTokenizer.from_pretrained(init_model_dir)
    train_rows = read_jsonl(dataset_dir / "train.jsonl")
    val_rows = read_jsonl(dataset_dir / "val.jsonl")[: g.val_size]
    sampler = StepSampler(len(train_rows), g.prompts_per_step, cfg.seed)
    system_prompt = cfg.data.system_prompt

    policy = start_policy_group(cfg, init_model_dir, g.optimizer, g.max_steps, tokenizer.pad_token_id)
    reference = (
        start_policy_group(cfg, init_model_dir, g.optimizer, g.max_steps, tokenizer.pad_token_id)
        if g.loss.kl_beta > 0
        else None
    )
    generation = GenerationGroup(cfg.generation, str(init_model_dir), seed=cfg.seed)
    router = EnvironmentRouter(environment_specs(g.environment, g.max_rollout_turns))
    reward_model = None
    if g.reward_model_weight > 0:
        if reward_model_dir is None:
            raise ValueError("grpo.reward_model_weight > 0 needs a trained reward model")
        reward_model = ray.remote(RewardModelEnv).options(num_cpus=0).remote(str(reward_model_dir))

    def validate() -> float:
        return greedy_accuracy(
            generation, router, tokenizer, val_rows, g.max_new_tokens, g.max_rollout_turns, system_prompt
        )

    try:
        start, history, val_history = 0, [], []
        resume_dir = checkpointing.find_resume_checkpoint(store, stage_prefix, cfg.resume)
        if resume_dir is not None:
            policy.group.call("load_checkpoint", str(resume_dir))
            state = checkpointing.read_trainer_state(resume_dir)
            start, history, val_history = state["step"], state["history"], state["val_history"]
            checkpointing.restore_rng(state["rng"])
            refit(policy.group, generation, version=start)
            run.set_tags({"posttrain.resumed_from_step": str(start)})
        if not val_history:
            val_history.append([0, validate()])
            run.log_metrics({"val/accuracy": val_history[-1][1]}, step=0)

        progress = tqdm(range(start, g.max_steps), initial=start, total=g.max_steps, desc="grpo", unit="step")
        for step in progress:
            started = time.perf_counter()
            rows = [train_rows[i] for i in sampler.indices(step)]
            params = SamplingParams(
                temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_new_tokens, seed=cfg.seed * 100_003 + step
            )
            episodes = new_episodes(tokenizer, rows, g.generations_per_prompt, system_prompt)
            run_rollouts(episodes, generation, router, tokenizer, params, g.max_rollout_turns)
            generated = time.perf_counter()

            rewards = episode_rewards(episodes, cfg, reward_model)
            groups = torch.tensor([e.group for e in episodes])
            advantages = grpo_advantages(
                rewards, groups, leave_one_out=g.leave_one_out, normalize=g.normalize_advantages
            )
            keep = list(range(len(episodes)))
            if g.dynamic_sampling:
                spread = {int(gid) for gid in groups.unique() if rewards[groups == gid].std() > 0}
                keep = [i for i in keep if episodes[i].group in spread]
            examples = [episodes[i].example(advantage=float(advantages[i])) for i in keep]

            if reference is not None and examples:
                for example, ref in zip(examples, reference.forward(examples)):
                    example.token_values["reference_logprobs"] = [0.0] + ref.tolist()
            scored = time.perf_counter()
            stats = policy.train(examples, GRPOLoss(g.loss)) if examples else {}
            trained = time.perf_counter()
            refit_metrics = refit(policy.group, generation, version=step + 1)
            done = step + 1

            tokens = stats.get("valid_tokens", 0.0) or 1.0
            metrics = {
                "reward/mean": float(rewards.mean()),
                "reward/std": float(rewards.std()),
                "accuracy": sum(e.reward > 0.5 for e in episodes) / len(episodes),
                "response_length": sum(len(e.generated_tokens) for e in episodes) / len(episodes),
                "turns": sum(e.turns for e in episodes) / len(episodes),
                "tool_call_rate": sum(e.metadata.get("tool_calls", 0) > 0 for e in episodes) / len(episodes),
                "tool_correct_call_rate": sum(
                    e.metadata.get("tool_calls", 0) > 0 and e.metadata.get("tool_errors", 0) == 0 for e in episodes
                )
                / len(episodes),
                "kept_samples": float(len(examples)),
                "loss": stats.get("loss", 0.0),
                "grad_norm": stats.get("grad_norm", 0.0),
                "clip_fraction": stats.get("clip_tokens", 0.0) / tokens,
                "entropy": stats.get("entropy_sum", 0.0) / tokens,
                "token_mult_prob_error": stats.get("token_mult_prob_error_sum", tokens) / tokens,
                "kl": stats.get("kl_sum", 0.0) / tokens,
                "timing/generation": generated - started,
                "timing/logprobs": scored - generated,
                "timing/training": trained - scored,
                "timing/refit": refit_metrics["refit/seconds"],
                "refit/bytes": refit_metrics["refit/bytes"],
            }
            if done % g.val_every == 0 or done == g.max_steps:
                val_history.append([done, validate()])
                metrics["val/accuracy"] = val_history[-1][1]
            metrics["timing/step"] = time.perf_counter() - started
            history.append(metrics)
            run.log_metrics(metrics, step=done)
            progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{val_history[-1][1]:.2f}")

            if done % g.checkpoint_every == 0 and done < g.max_steps:
                state = {
                    "step": done,
                    "data_position": done * g.prompts_per_step,
                    "history": history,
                    "val_history": val_history,
                    "rng": checkpointing.capture_rng(),
                    "config": cfg.model_dump(mode="json"),
                }
                checkpointing.save_checkpoint(store, policy.group, stage_prefix, state)
        run.flush()

        history_text = "".join(json.dumps(h) + "\n" for h in history)
        return checkpointing.export_model(
            store,
            policy.group,
            init_model_dir,
            f"{stage_prefix}/model",
            cfg.to_yaml(),
            summarize(history, val_history),
            extra_files={HISTORY_FILE: history_text},
        )
    finally:
        policy.shutdown()
        if reference is not None:
            reference.shutdown()
        generation.shutdown()
        router.shutdown()
        if reward_model is not None:
            ray.kill(reward_model)
