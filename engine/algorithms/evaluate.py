"""Held-out evaluation: greedy pass@1 of the SFT model and of the final model, and the plots people
would rather see than read (accuracy before/after, the RL reward curve)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.algorithms.rollouts import greedy_accuracy
from engine.config import PipelineConfig
from engine.data.datasets import read_jsonl
from engine.environments.router import EnvironmentRouter, environment_specs
from engine.generation.group import GenerationGroup
from engine.weight_sync import load_saved_weights


def held_out_accuracies(cfg: PipelineConfig, model_dirs: list[Path], rows: list[dict]) -> list[float]:
    """Greedy pass@1 of each model on ``rows``. One generation engine serves them all: it starts on the first
    model and each later one's weights are swapped in, since an engine start costs more than the evaluation
    itself on small models. The models share the first one's architecture and tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dirs[0])
    generation = GenerationGroup(cfg.generation, str(model_dirs[0]), seed=cfg.seed)
    router = EnvironmentRouter(environment_specs(cfg.grpo.environment, cfg.grpo.max_rollout_turns))
    try:
        accuracies = []
        for version, model_dir in enumerate(model_dirs):
            if version:
                load_saved_weights(generation, model_dir, version)
            accuracies.append(
                greedy_accuracy(
                    generation,
                    router,
                    tokenizer,
                    rows,
                    cfg.evaluate.max_new_tokens,
                    cfg.grpo.max_rollout_turns,
                    cfg.data.system_prompt,
                )
            )
        return accuracies
    finally:
        generation.shutdown()
        router.shutdown()


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
    cfg: PipelineConfig, sft_model_dir: Path, final_model_dir: Path, dataset_dir: Path, out_dir: Path
) -> dict[str, float]:
    rows = read_jsonl(dataset_dir / "val.jsonl")[: cfg.evaluate.size]
    accuracy = dict(zip(("sft", "final"), held_out_accuracies(cfg, [sft_model_dir, final_model_dir], rows)))
    history_file = final_model_dir / "history.jsonl"
    history = [json.loads(line) for line in history_file.read_text().splitlines()] if history_file.exists() else []
    plot_results(out_dir, accuracy, history)
    metrics = {"accuracy_sft": accuracy["sft"], "accuracy_final": accuracy["final"], "eval_prompts": float(len(rows))}
    (out_dir / "metrics.json").write_text(json.dumps(metrics))
    return metrics
