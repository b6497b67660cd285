"""Held-out evaluation of the start model (SFT, or the base model) and the final model, on any dataset.

    generation   greedy pass@1 and mean reward, scored by what GRPO is scored by (the environments and the user's
                 reward functions, weighted as in ``grpo``; a reward model, a learned proxy, is left out); pass@k
                 with ``evaluate.samples`` > 1; rows no environment can score are counted (``unscored_rows``)
    preference   on preference data, the share of pairs where the final model prefers the chosen response more than
                 the start model does (DPO's implicit reward, with the start model as the reference)

and the plots people would rather see than read (accuracy before/after, the RL reward curve).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engine.algorithms.rewards import EpisodeRewards
from engine.algorithms.rollouts import new_episodes, run_rollouts
from engine.config import PipelineConfig
from engine.data.datasets import read_jsonl
from engine.data.preferences import pair_examples
from engine.environments.reward_functions import RewardFunctions
from engine.environments.router import EnvironmentRouter
from engine.generation.group import GenerationGroup
from engine.generation.interfaces import SamplingParams
from engine.models.loading import ModelSource, local_folder
from engine.weight_sync import load_saved_weights


def greedy_scores(
    generation: GenerationGroup,
    router: EnvironmentRouter,
    rewards: EpisodeRewards,
    tokenizer,
    rows: list[dict[str, Any]],
    max_new_tokens: int,
    max_turns: int,
    default_task: str,
) -> dict[str, float]:
    """Greedy pass@1: the share of scorable rows answered right (the environment's reward above 0.5), their mean
    reward (``rewards``: environment and reward functions) and how many rows nothing could score."""
    episodes = new_episodes(tokenizer, rows, 1, default_task)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, seed=0)
    run_rollouts(episodes, generation, router, tokenizer, params, max_turns)
    total, _, failed = rewards(episodes)
    scored = [
        (rewards.functions is not None or not e.metadata.get("unscored")) and not bad
        for e, bad in zip(episodes, failed)
    ]
    count = max(1, sum(scored))
    return {
        "accuracy": sum(e.reward > 0.5 for e, s in zip(episodes, scored) if s) / count,
        "reward_mean": float(sum(r for r, s in zip(total.tolist(), scored) if s)) / count,
        "unscored_rows": float(len(rows) - sum(scored)),
    }


def pass_at_k(
    generation: GenerationGroup,
    router: EnvironmentRouter,
    tokenizer,
    rows: list[dict[str, Any]],
    k: int,
    params: SamplingParams,
    max_turns: int,
    default_task: str,
) -> float:
    """The share of scorable rows of which at least one of ``k`` samples is right."""
    episodes = new_episodes(tokenizer, rows, k, default_task)
    run_rollouts(episodes, generation, router, tokenizer, params, max_turns)
    groups = [episodes[i * k : (i + 1) * k] for i in range(len(rows))]
    scorable = [group for group in groups if not group[0].metadata.get("unscored")]
    return sum(any(e.reward > 0.5 for e in group) for group in scorable) / max(1, len(scorable))


def generation_metrics(cfg: PipelineConfig, models: list[ModelSource | Path], rows: list[dict[str, Any]]) -> list[dict]:
    """Per model: greedy accuracy and mean reward over the scorable rows, pass@k, and the unscored count. One
    generation engine serves every model: it starts on the first and each later one's weights are swapped in (an
    engine start costs more than the evaluation itself on small models); the models share one tokenizer."""
    from transformers import AutoTokenizer

    g, e = cfg.grpo, cfg.evaluate
    tokenizer = AutoTokenizer.from_pretrained(local_folder(models[0]))
    functions = RewardFunctions(g.reward_functions, g.reward_timeout_s) if g.reward_functions else None
    router = EnvironmentRouter(g.environment_classes(), g.environment_timeout_s)
    generation = GenerationGroup(cfg.generation, models[0], seed=cfg.seed)
    rewards = EpisodeRewards(g.verifier_weight, functions, max_failed_groups=g.max_failed_groups)
    try:
        results = []
        for version, model in enumerate(models):
            if version:  # read here and pushed as a refit is
                load_saved_weights(generation, local_folder(model), version)
            turns = g.max_rollout_turns
            metrics = greedy_scores(
                generation, router, rewards, tokenizer, rows, e.max_new_tokens, turns, g.environment
            )
            if e.samples > 1:
                params = SamplingParams(temperature=e.temperature, max_tokens=e.max_new_tokens, seed=cfg.seed + 1)
                metrics[f"pass_at_{e.samples}"] = pass_at_k(
                    generation, router, tokenizer, rows, e.samples, params, turns, g.environment
                )
            results.append(metrics)
        return results
    finally:
        generation.shutdown()
        router.shutdown()
        if functions is not None:
            functions.shutdown()


def preference_accuracy(
    cfg: PipelineConfig, start: ModelSource | Path, final: ModelSource | Path, rows: list[dict[str, Any]]
) -> float:
    """The share of pairs whose implicit reward margin (final vs start logprobs, chosen vs rejected) is positive."""
    from transformers import AutoTokenizer

    from engine.policy.group import start_policy_group

    tokenizer = AutoTokenizer.from_pretrained(local_folder(start))
    examples = pair_examples(tokenizer, rows, cfg.dpo.max_seq_len, "validation")
    summed = []
    for model in (start, final):
        group = start_policy_group(cfg, model, None, 1, tokenizer.pad_token_id)  # frozen: forward passes only
        try:
            outputs = group.forward(examples)
        finally:
            group.shutdown()
        summed.append(
            torch.tensor(
                [float((out * torch.tensor(ex.loss_mask, dtype=out.dtype)).sum()) for out, ex in zip(outputs, examples)]
            )
        )
    margin = summed[1] - summed[0]  # log pi_final - log pi_start, per response
    return float(((margin[0::2] - margin[1::2]) > 0).float().mean())


def plot_results(out_dir: Path, accuracy: dict[str, float], history: list[dict[str, float]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(list(accuracy), list(accuracy.values()), color=["#999999", "#2a7ab9"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy (greedy)")
    for i, value in enumerate(accuracy.values()):
        ax.text(i, value + 0.02, f"{value:.2f}", ha="center")
    fig.tight_layout()
    paths.append(out_dir / "accuracy.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    if history:
        fig, ax = plt.subplots(figsize=(5, 3))
        steps = list(range(1, len(history) + 1))
        ax.plot(steps, [h["reward/mean"] for h in history], label="reward mean")
        val = [(s, h["val/accuracy"]) for s, h in zip(steps, history) if "val/accuracy" in h]
        if val:
            ax.plot(*zip(*val), marker="o", label="held-out accuracy")
        ax.set_xlabel("RL step")
        ax.legend()
        fig.tight_layout()
        paths.append(out_dir / "reward_curve.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def run_evaluate(
    cfg: PipelineConfig,
    start: ModelSource | Path,
    final: ModelSource | Path,
    dataset_dir: Path,
    out_dir: Path,
    start_name: str = "sft",
    preference: bool = False,
) -> dict[str, float]:
    rows = read_jsonl(dataset_dir / "val.jsonl")[: cfg.evaluate.size]
    metrics: dict[str, float] = {"eval_rows": float(len(rows))}
    scorable = [row for row in rows if "prompt" in row and ("answer" in row or cfg.grpo.reward_functions)]
    if scorable:  # no generation where nothing could score it (a preference dataset without answers)
        start_metrics, final_metrics = generation_metrics(cfg, [start, final], scorable)
        for name, values in ((start_name, start_metrics), ("final", final_metrics)):
            metrics.update({f"{key}_{name}": value for key, value in values.items() if key != "unscored_rows"})
        metrics["unscored_rows"] = final_metrics["unscored_rows"] + float(len(rows) - len(scorable))
        accuracy = {start_name: start_metrics["accuracy"], "final": final_metrics["accuracy"]}
    else:
        metrics["unscored_rows"] = float(len(rows))
        accuracy = {}
    pairs = [row for row in rows if "chosen" in row and "rejected" in row]
    if preference and pairs:
        metrics["preference_accuracy"] = preference_accuracy(cfg, start, final, pairs)
    history_file = local_folder(final) / "history.jsonl"
    history = [json.loads(line) for line in history_file.read_text().splitlines()] if history_file.exists() else []
    if accuracy:
        plot_results(out_dir, accuracy, history)
    (out_dir / "metrics.json").write_text(json.dumps(metrics))
    return metrics
