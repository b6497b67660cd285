"""Group Relative Policy Optimization: the controller.

    for step in steps:
        episodes  = collect(step)       n rollouts per prompt on the generator (multi-turn with tool environments);
                                        the step's prompts are a pure function of seed and step: exact resume
        examples  = score(episodes)     rewards = environment * w_v + sum of weighted reward functions
                                        + sigmoid(reward model) * w_rm [+ overlong penalty]; advantages
                                        (leave-one-out group baseline by default); groups without spread
                                        dropped (dynamic sampling)
        stats     = train(examples)     clipped_pg_loss over generated tokens / the step's global token count
        refit()                         the generator gets the new weights (also after a step with nothing to train)
        every val_every: greedy pass@1 on held-out prompts; every checkpoint_every: checkpoint

A generation worker lost mid-step (or a generation call past ``generation.request_timeout_s``) is restarted, given
the current weights, and the step's generation redone: a step's sampling is a pure function of seed and step, so
the curve is the uninterrupted one and no step is lost.

Asynchronous GRPO (``grpo.async``) samples ``queue_size`` steps ahead while the trainer trains, on the fixed
schedule of ``engine.algorithms.rollout_queue``: every episode is exactly ``queue_size`` weight versions old, the
loss corrects against the generator's logprobs (truncated importance sampling by default), and checkpoints store the
sampled but untrained steps. With one gradient step per batch the trainer's old policy is its current weights, so
``logprobs.detach()`` is the forward pass an old-policy ratio needs; the staleness lives between the generator's
logprobs and the trainer's, which the importance weights correct.

PPO (``advantage_estimator: gae``) adds a critic: a value head on a copy of the starting model whose per-token values
give GAE's advantages and returns; the critic steps toward the returns with PPO's clipped value loss before the
policy steps. ``ppo_epochs`` x ``minibatches`` updates a step (of whole prompt groups) take the old policy's logprobs
from a forward pass before the first, which is then no longer the trainer's current policy.

What is kept from the paper and why: one gradient step per batch by default, so the old policy is the current one
(ratio = exp(logprob - logprob.detach()), which carries the gradient of the ratio while its value is 1);
the generator's own logprobs are compared with the trainer's every step (token_mult_prob_error) and can
correct the difference by importance sampling (loss.importance_sampling). A KL penalty to the initial model
is optional (loss.kl_beta; a frozen reference group is started only then).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from engine import checkpointing, cluster, resources
from engine.algorithms.advantages import estimate_advantages, gae_advantages, overlong_penalty, whiten
from engine.algorithms.evaluate import greedy_scores
from engine.algorithms.losses import GRPOLoss, ValueLoss
from engine.algorithms.rewards import EpisodeRewards, RewardModelScorer
from engine.algorithms.rollout_queue import RolloutQueue
from engine.algorithms.rollouts import Episode, new_episodes, run_rollouts
from engine.algorithms.supervised import StepSampler
from engine.config import GRPOConfig, PipelineConfig
from engine.data.chat import TokenizedExample
from engine.data.datasets import read_jsonl
from engine.environments.reward_functions import RewardFunctions
from engine.environments.router import EnvironmentRouter
from engine.generation.group import GenerationGroup, WorkerLost
from engine.generation.interfaces import SamplingParams
from engine.logs import StepProgress
from engine.models.loading import ModelSource, check_same_tokenizer, local_folder
from engine.policy.group import BaseModelView, PolicyGroup, start_policy_group
from engine.profiling import StepTraces
from engine.storage import ArtifactRef, ArtifactStore
from engine.tracking import StageRun
from engine.weight_sync import refit

HISTORY_FILE = "history.jsonl"
ROLLOUT_QUEUE = "rollout_queue"  # a checkpoint's steps sampled ahead (asynchronous GRPO)
log = logging.getLogger("posttrain.grpo")
T = TypeVar("T")


@dataclass
class GRPORoles:
    """The workers a GRPO run drives, each reached only through its group's methods."""

    policy: PolicyGroup
    generation: GenerationGroup
    environments: EnvironmentRouter
    reference: PolicyGroup | BaseModelView | None = None  # frozen: the KL reference
    reward_model: RewardModelScorer | None = None
    reward_functions: RewardFunctions | None = None
    teacher: PolicyGroup | None = None  # frozen: the distillation teacher
    critic: PolicyGroup | None = None  # PPO's value model (advantage_estimator: gae), trained with the policy

    def shutdown(self) -> None:
        roles = (
            self.policy,
            self.critic,
            self.reference,
            self.teacher,
            self.reward_model,
            self.generation,
            self.environments,
        )
        for role in (*roles, self.reward_functions):
            if role is not None:
                role.shutdown()


@dataclass
class ScoredStep:
    rewards: torch.Tensor
    advantages: torch.Tensor
    kept: list[int]  # episodes trained on (dynamic sampling drops groups without spread)
    reward_parts: dict[str, float]  # the mean of each part of the reward (reward/<name>)


class GRPOLoop:
    """One GRPO run's step logic over its roles; ``step`` is what the loop repeats."""

    def __init__(
        self,
        cfg: GRPOConfig,
        seed: int,
        tokenizer,
        train_rows: list[dict[str, Any]],
        val_rows: list[dict[str, Any]],
        roles: GRPORoles,
    ):
        self.cfg, self.seed, self.tokenizer = cfg, seed, tokenizer
        self.train_rows, self.val_rows = train_rows, val_rows
        self.roles = roles
        self.sampler = StepSampler(len(train_rows), cfg.prompts_per_step, seed)
        self.loss = GRPOLoss(cfg.loss)
        self.rewards = EpisodeRewards(
            cfg.verifier_weight,
            roles.reward_functions,
            roles.reward_model,
            cfg.reward_model_weight,
            cfg.max_failed_groups,
        )
        ahead = cfg.async_.queue_size if cfg.lags else 0
        self.rollouts = RolloutQueue(self.collect, ahead, cfg.async_.max_staleness, cfg.max_steps)

    def collect(self, step: int) -> list[Episode]:
        """The step's prompts, each answered ``generations_per_prompt`` times (seeded by step: exact resume)."""
        g = self.cfg
        indices = self.sampler.indices(step)
        rows = [self.train_rows[i] for i in indices]
        params = SamplingParams(
            temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_new_tokens, seed=self.seed * 100_003 + step
        )
        episodes = new_episodes(self.tokenizer, rows, g.generations_per_prompt, g.environment, indices)
        return run_rollouts(
            episodes, self.roles.generation, self.roles.environments, self.tokenizer, params, g.max_rollout_turns
        )

    def score(self, episodes: list[Episode]) -> ScoredStep:
        """Rewards, group advantages, and which episodes are kept for training."""
        g = self.cfg
        rewards, parts, failed = self.rewards(episodes)
        if g.overlong_penalty is not None:  # DAPO: responses near the limit lose reward smoothly, not at a cliff
            lengths = torch.tensor([len(e.generated_tokens) for e in episodes])
            limit = g.max_new_tokens * g.max_rollout_turns
            penalty = overlong_penalty(lengths, limit, g.overlong_penalty.buffer, g.overlong_penalty.penalty)
            rewards = rewards + penalty.to(rewards.dtype)
            parts["reward/overlong_penalty"] = float(penalty.mean())
        groups = torch.tensor([e.group for e in episodes])
        if g.advantage_estimator == "gae":  # per token, from the critic's values (``examples``)
            advantages = torch.zeros_like(rewards)
        else:
            advantages = estimate_advantages(rewards, groups, g.advantage_estimator, g.normalize_advantages)
        lost = {e.group for e, bad in zip(episodes, failed) if bad}  # a group is trained whole or not at all
        kept = [i for i in range(len(episodes)) if episodes[i].group not in lost]
        if g.dynamic_sampling:
            spread = {int(gid) for gid in groups.unique() if rewards[groups == gid].std() > 0}
            kept = [i for i in kept if episodes[i].group in spread]
        return ScoredStep(rewards, advantages, kept, parts)

    def examples(self, episodes: list[Episode], scored: ScoredStep) -> list[TokenizedExample]:
        """Training examples of the kept episodes, with the reference model's logprobs where a KL term needs them."""
        examples = [episodes[i].example(advantage=float(scored.advantages[i])) for i in scored.kept]
        if self.roles.reference is not None and examples:
            for example, reference in zip(examples, self.roles.reference.forward(examples)):
                example.token_values["reference_logprobs"] = reference.tolist()  # aligned to the input ids
        return examples

    def _critic_advantages(self, examples: list[TokenizedExample], rewards: torch.Tensor) -> dict[str, float]:
        """PPO: the critic's values of every response token, GAE's per-token advantages (whitened with
        ``normalize_advantages``) and returns, put on the examples for both losses; returns the critic's metrics."""
        if not examples:
            return {}
        c = self.cfg.critic
        length = max(len(e) for e in examples)
        values = torch.zeros(len(examples), length)
        mask = torch.zeros(len(examples), length)
        for row, (example, value) in enumerate(zip(examples, self.roles.critic.forward(examples))):
            values[row, : len(example)] = value  # aligned to the input ids: value[t] is the state before token t
            mask[row, : len(example)] = torch.tensor(example.loss_mask, dtype=torch.float32)
        advantages, returns = gae_advantages(rewards, values, mask, c.gamma, c.lam)
        if self.cfg.normalize_advantages:
            advantages = whiten(advantages, mask)
        for row, example in enumerate(examples):
            del example.scalars["advantage"]
            size = len(example)
            example.token_values["advantage"] = advantages[row, :size].tolist()
            example.token_values["returns"] = returns[row, :size].tolist()
            example.token_values["old_values"] = values[row, :size].tolist()
        valid = mask.bool()
        explained = 1 - (returns - values)[valid].var() / returns[valid].var().clamp(min=1e-8)
        return {"critic/value_mean": float(values[valid].mean()), "critic/explained_variance": float(explained)}

    def _train_critic(self, updates: list[list[TokenizedExample]]) -> dict[str, float]:
        stats = merge_updates(
            [self.roles.critic.train(update, ValueLoss(self.cfg.critic.value_clip)) for update in updates]
        )
        return {"critic/value_loss": stats["loss"], "critic/grad_norm": stats["grad_norm"]}

    def _generating(self, version: int, work: Callable[[], T]) -> T:
        """``work`` on the generator; a lost generation worker is restarted with the weights of ``version`` and the
        work redone once (the same samples: they are seeded by step). Steps queued ahead on the lost generator are
        forgotten, to be sampled again when taken."""
        try:
            return work()
        except WorkerLost as lost:
            log.warning("%s; restarting the generation workers and redoing the step's generation", lost)
            self.rollouts.forget()
            self.roles.generation.restart()
            refit(self.roles.policy, self.roles.generation, version)
            return work()

    def _settle(self) -> None:
        """Wait until the generator is idle; one lost while sampling ahead is restarted (the refit that follows gives
        it the current weights) and the steps it lost are sampled again when taken."""
        if self.rollouts.settle():
            log.warning("a generation worker was lost while sampling ahead; restarting the generation workers")
            self.roles.generation.restart()

    def _updates(self, examples: list[TokenizedExample], groups: list[int]) -> list[list[TokenizedExample]]:
        """The step's optimizer updates: ``ppo_epochs`` passes over the examples, each in ``minibatches`` slices of
        whole prompt groups (one update of everything by default)."""
        if not examples:
            return []
        order = sorted(set(groups))
        size = -(-len(order) // self.cfg.minibatches)
        slices = [set(order[start : start + size]) for start in range(0, len(order), size)]
        minibatches = [[e for e, group in zip(examples, groups) if group in part] for part in slices]
        return [minibatch for _ in range(self.cfg.ppo_epochs) for minibatch in minibatches]

    def step(self, step: int) -> dict[str, float]:
        """take -> (sample ahead) -> score -> train -> refit; returns the step's metrics."""
        started = time.perf_counter()
        generated, dropped = self._generating(step, lambda: self.rollouts.take(step))  # sampled ahead, or now
        self.rollouts.prefetch(step)  # the generator samples the next steps while this one trains
        episodes = generated.episodes
        taken = time.perf_counter()
        scored = self.score(episodes)
        examples = self.examples(episodes, scored)
        critic_metrics = (
            self._critic_advantages(examples, scored.rewards[scored.kept]) if self.roles.critic is not None else {}
        )
        updates = self._updates(examples, [episodes[i].group for i in scored.kept])
        warming_up = self.roles.critic is not None and step < self.cfg.critic.warmup_steps
        policy_updates = [] if warming_up else updates
        if len(policy_updates) > 1:  # after the first update the trainer is no longer the old policy
            for example, logprobs in zip(examples, self.roles.policy.forward(examples)):
                example.token_values["prev_logprobs"] = logprobs.tolist()
        prepared = time.perf_counter()
        # the critic's updates toward the returns come before the policy's
        if self.roles.critic is not None and updates:
            critic_metrics.update(self._train_critic(updates))
        stats = merge_updates([self.roles.policy.train(update, self.loss) for update in policy_updates])
        trained = time.perf_counter()
        self._settle()
        settled = time.perf_counter()
        refit_metrics = refit(self.roles.policy, self.roles.generation, version=step + 1)
        self.rollouts.refitted(step + 1)
        metrics = {
            **episode_metrics(episodes, scored),
            **training_metrics(stats),
            **critic_metrics,
            "timing/generation": (taken - started) + (settled - trained),  # what the trainer waited for
            "timing/logprobs": prepared - taken,
            "timing/training": trained - prepared,
            "timing/refit": refit_metrics.pop("refit/seconds"),
            **refit_metrics,  # refit/bytes, and a broadcast's refit/transfer_seconds
        }
        if self.cfg.lags:
            metrics["async/staleness"] = float(step - generated.version)
            metrics["async/dropped"] = float(dropped)
            metrics["async/generation_seconds"] = generated.seconds  # sampling this step's episodes took
        return metrics

    def validate(self, step: int) -> dict[str, float]:
        """Greedy pass@1 and mean reward on the held-out prompts (the generator holds the weights of ``step``)."""
        g = self.cfg

        def score_held_out() -> dict[str, float]:
            return greedy_scores(
                self.roles.generation,
                self.roles.environments,
                self.rewards,
                self.tokenizer,
                self.val_rows,
                g.max_new_tokens,
                g.max_rollout_turns,
                g.environment,
            )

        scores = self._generating(step, score_held_out)
        return {"step": step, "val/accuracy": scores["accuracy"], "val/reward_mean": scores["reward_mean"]}


def episode_metrics(episodes: list[Episode], scored: ScoredStep) -> dict[str, float]:
    count = len(episodes)
    tool_calls = [e.metadata.get("tool_calls", 0) for e in episodes]
    tool_errors = [e.metadata.get("tool_errors", 0) for e in episodes]
    tool_rewards = [e.reward for e, calls in zip(episodes, tool_calls) if calls > 0]
    return {
        "reward/mean": float(scored.rewards.mean()),
        "reward/std": float(scored.rewards.std()),
        **scored.reward_parts,
        "accuracy": sum(e.reward > 0.5 for e in episodes) / count,
        "response_length": sum(len(e.generated_tokens) for e in episodes) / count,
        "turns": sum(e.turns for e in episodes) / count,
        "tool_call_rate": sum(calls > 0 for calls in tool_calls) / count,
        "tool_correct_call_rate": sum(c > 0 and err == 0 for c, err in zip(tool_calls, tool_errors)) / count,
        "tool_reward": sum(tool_rewards) / len(tool_rewards) if tool_rewards else 0.0,  # the env's, of tool users
        "kept_samples": float(len(scored.kept)),
    }


def merge_updates(updates: list[dict[str, float]]) -> dict[str, float]:
    """One step's statistics from its optimizer updates: sums add up, loss and grad norm are their mean, the
    learning rate the last one's."""
    merged: dict[str, float] = {}
    for stats in updates:
        for key, value in stats.items():
            merged[key] = merged.get(key, 0.0) + value
    for key in ("loss", "grad_norm"):
        if key in merged:
            merged[key] /= len(updates)
    if updates and "lr" in updates[-1]:
        merged["lr"] = updates[-1]["lr"]
    return merged


def training_metrics(stats: dict[str, float]) -> dict[str, float]:
    """Per-token means of the trainer's summed metrics (a step that trained nothing reports neutral values)."""
    tokens = stats.get("valid_tokens", 0.0) or 1.0
    metrics = {
        "loss": stats.get("loss", 0.0),
        "grad_norm": stats.get("grad_norm", 0.0),
        "clip_fraction": stats.get("clip_tokens", 0.0) / tokens,
        "entropy": stats.get("entropy_sum", 0.0) / tokens,
        "token_mult_prob_error": stats.get("token_mult_prob_error_sum", tokens) / tokens,
        "kl": stats.get("kl_sum", 0.0) / tokens,
    }
    if "is_weight_sum" in stats:  # the importance-sampling correction (loss.importance_sampling)
        metrics["is_weight_mean"] = stats["is_weight_sum"] / tokens
        metrics["is_oob_fraction"] = stats["is_oob_tokens"] / tokens
    return metrics


def _edge_mean(values: list[float], last: bool) -> float:
    """Mean of the first (or last) tenth of a curve: a steadier 'first'/'last' value than one step."""
    width = max(1, len(values) // 10)
    part = values[-width:] if last else values[:width]
    return sum(part) / len(part)


def summarize(history: list[dict[str, float]], val_history: list[dict[str, float]]) -> dict[str, float]:
    rewards = [h["reward/mean"] for h in history]
    return {
        "reward_mean_first": _edge_mean(rewards, last=False),
        "reward_mean_last": _edge_mean(rewards, last=True),
        "token_mult_prob_error_median": statistics.median(h["token_mult_prob_error"] for h in history),
        "step_seconds_median": statistics.median(h["timing/step"] for h in history),
        "refit_seconds_median": statistics.median(h["timing/refit"] for h in history),
        "val_accuracy_first": val_history[0]["val/accuracy"],
        "val_accuracy_last": val_history[-1]["val/accuracy"],
        "val_reward_mean_last": val_history[-1]["val/reward_mean"],
        "steps": float(len(history)),
    }


def train_loop(
    loop: GRPOLoop, store: ArtifactStore, run: StageRun, cfg: PipelineConfig, stage_prefix: str
) -> checkpointing.LoopState:
    """The steps from the resume point to ``max_steps``, with validation, metrics and checkpoints."""
    g = loop.cfg
    policy = loop.roles.policy
    companions = {"critic": loop.roles.critic} if loop.roles.critic is not None else {}
    state = checkpointing.resume(store, policy, stage_prefix, cfg, run, companions)
    run.log_params(policy.parameter_counts())
    loop.rewards.failed_groups = int(sum(h.get("reward/failed_groups", 0.0) for h in state.history))
    if state.step:
        refit(policy, loop.roles.generation, version=state.step)
    loop.rollouts.restore(state.extra.get(ROLLOUT_QUEUE, []), version=state.step)
    if not state.val_history:
        state.val_history.append(loop.validate(0))
        run.log_metrics({k: v for k, v in state.val_history[-1].items() if k != "step"}, step=0)
    stage = checkpointing.stage_of_prefix(stage_prefix)
    progress = StepProgress(state.step, g.max_steps, stage)
    traces = StepTraces(cfg.profile, run, stage, policy, loop.roles.generation)
    for step in progress:
        started = time.perf_counter()
        traces.before(step + 1)
        metrics = loop.step(step)
        traces.after(step + 1)
        state.step = step + 1
        if state.step % g.val_every == 0 or state.step == g.max_steps:
            state.val_history.append(loop.validate(state.step))
            metrics.update({k: v for k, v in state.val_history[-1].items() if k != "step"})
        metrics["timing/step"] = time.perf_counter() - started
        state.history.append(metrics)
        run.log_metrics(metrics, step=state.step)
        progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{state.val_history[-1]['val/accuracy']:.2f}")
        if state.step % g.checkpoint_every == 0 and state.step < g.max_steps:
            state.extra[ROLLOUT_QUEUE] = loop.rollouts.state()  # sampled ahead, not yet trained: resumed as they are
            samples = state.step * g.prompts_per_step
            checkpointing.checkpoint(store, policy, stage_prefix, cfg, state, samples, companions)
    traces.close(state.step)
    run.flush()
    return state


def _start_reference(
    cfg: PipelineConfig, g: GRPOConfig, model: ModelSource | Path, pad_id: int, policy: PolicyGroup
) -> PolicyGroup | BaseModelView:
    """The KL reference: with LoRA the policy's own base model (adapters disabled), else a frozen copy."""
    if g.lora.enabled:
        return policy.base_model()
    return start_policy_group(cfg, model, None, g.max_steps, pad_id)


def start_roles(
    cfg: PipelineConfig,
    g: GRPOConfig,
    init_model: ModelSource | Path,
    pad_id: int,
    rm_model: ModelSource | Path | None,
    teacher_model: ModelSource | Path | None = None,
    critic_model: ModelSource | Path | None = None,
) -> GRPORoles:
    """The run's workers under the loop's settings ``g``; ``teacher_model`` adds a frozen teacher (distillation);
    PPO's critic starts from ``critic_model``, else from the policy's model."""
    if g.reward_model_weight > 0 and rm_model is None:
        raise ValueError("grpo.reward_model_weight > 0 needs a trained reward model")
    started: list[Any] = []
    try:  # the user's code is loaded first: a bad name fails before any worker starts
        started.append(RewardFunctions(g.reward_functions, g.reward_timeout_s) if g.reward_functions else None)
        started.append(EnvironmentRouter(g.environment_classes(), g.environment_timeout_s))
        cluster.connect(cfg.ray)  # the whole stage fits, or it fails before a model loads
        cluster.check_fits(resources.rl_groups(cfg, g, teacher=teacher_model is not None))
        adapters = g.lora if cfg.generation.lora_refit == "adapter" and g.lora.enabled else None
        generation = GenerationGroup(cfg.generation, init_model, seed=cfg.seed, adapters=adapters, wait=False)
        started.append(generation)  # its engine loads while the trainers start
        updates = g.max_steps * g.ppo_epochs * g.minibatches  # what the learning-rate schedules count
        started.append(start_policy_group(cfg, init_model, g.optimizer, updates, pad_id, lora=g.lora))
        started.append(_start_reference(cfg, g, init_model, pad_id, started[-1]) if g.loss.kl_beta else None)
        started.append(RewardModelScorer.start(cfg, rm_model) if g.reward_model_weight > 0 else None)
        started.append(start_policy_group(cfg, teacher_model, None, g.max_steps, pad_id) if teacher_model else None)
        critic = g.advantage_estimator == "gae"  # PPO's value model
        critic_start = critic_model or init_model
        started.append(
            start_policy_group(cfg, critic_start, g.critic.optimizer, updates, pad_id, "value") if critic else None
        )
        generation.wait_started()
    except BaseException:
        for role in filter(None, started):
            role.shutdown()
        raise
    functions, environments, generation, policy, reference, reward_model, teacher, critic_group = started
    return GRPORoles(policy, generation, environments, reference, reward_model, functions, teacher, critic_group)


def run_grpo(
    cfg: PipelineConfig,
    store: ArtifactStore,
    run: StageRun,
    init_model: ModelSource | Path,
    dataset_dir: Path,
    stage_prefix: str,
    rm_model: ModelSource | Path | None = None,
    critic_model: ModelSource | Path | None = None,
) -> ArtifactRef:
    if critic_model is not None:
        check_same_tokenizer(init_model, critic_model, f"grpo.critic.model {cfg.grpo.critic.model or critic_model}")
    return run_policy_stage(
        cfg,
        cfg.grpo,
        GRPOLoop,
        store,
        run,
        init_model,
        dataset_dir,
        stage_prefix,
        rm_model,
        critic_model=critic_model,
    )


def run_policy_stage(
    cfg: PipelineConfig,
    g: GRPOConfig,
    loop_class: type[GRPOLoop],
    store: ArtifactStore,
    run: StageRun,
    init_model: ModelSource | Path,
    dataset_dir: Path,
    stage_prefix: str,
    rm_model: ModelSource | Path | None = None,
    teacher_model: ModelSource | Path | None = None,
    critic_model: ModelSource | Path | None = None,
) -> ArtifactRef:
    """Start the roles, run ``loop_class``'s steps under the settings ``g`` and commit the final model (GRPO, and
    distillation's variant of its loop)."""
    from transformers import AutoTokenizer

    init_dir = local_folder(init_model)  # the controller's copy: its tokenizer, and the export's
    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    train_rows = read_jsonl(dataset_dir / "train.jsonl")
    val_rows = read_jsonl(dataset_dir / "val.jsonl")[: g.val_size]
    roles = start_roles(cfg, g, init_model, tokenizer.pad_token_id, rm_model, teacher_model, critic_model)
    loop = None
    try:
        loop = loop_class(g, cfg.seed, tokenizer, train_rows, val_rows, roles)
        state = train_loop(loop, store, run, cfg, stage_prefix)
        return checkpointing.export_model(
            store,
            roles.policy,
            init_dir,
            f"{stage_prefix}/model",
            cfg,
            summarize(state.history, state.val_history),
            extra_files={HISTORY_FILE: "".join(json.dumps(h) + "\n" for h in state.history)},
        )
    finally:
        if loop is not None:
            loop.rollouts.close()
        roles.shutdown()
