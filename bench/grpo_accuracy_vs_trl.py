"""Held-out accuracy that our GRPO and TRL's GRPOTrainer reach from the same SFT model in the same wall time.

    .venv/bin/python -m bench.grpo_accuracy_vs_trl     # builds TRL's venv on first use; writes bench/RESULTS.md

Our `grpo` flow runs the tiny pipeline's GRPO settings (configs/grpo_tiny.yaml) for its configured steps (or
`--steps`). The time its steps took (the training loop; Ray and vLLM start-up excluded, as TRL's model loading is)
becomes TRL's budget: GRPOTrainer runs the same settings from the same SFT model until its own steps have taken as
long. The SFT model and both final models are then scored by the pipeline's evaluator (greedy pass@1 on the
held-out prompts).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from bench.grpo_vs_trl import our_layout, run_ours, run_trl
from bench.results import write_section
from bench.trl_env import trl_python
from engine.config import PipelineConfig, load_config


def grpo_settings(cfg: PipelineConfig) -> dict:
    """The pipeline's GRPO settings in the form both runners take."""
    return {
        "prompts_per_step": cfg.grpo.prompts_per_step,
        "generations_per_prompt": cfg.grpo.generations_per_prompt,
        "max_new_tokens": cfg.grpo.max_new_tokens,
        "temperature": cfg.grpo.temperature,
        "lr": cfg.grpo.optimizer.lr,
    }


def held_out_accuracy(cfg: PipelineConfig, dataset_dir: Path, model_dirs: dict[str, Path]) -> dict[str, float]:
    from engine import cluster
    from engine.algorithms.evaluate import generation_metrics
    from engine.data.datasets import read_jsonl

    rows = read_jsonl(dataset_dir / "val.jsonl")[: cfg.evaluate.size]
    cluster.connect(cfg.ray)
    try:
        metrics = generation_metrics(cfg, list(model_dirs.values()), rows)
        return {name: values["accuracy"] for name, values in zip(model_dirs, metrics)}
    finally:
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="grpo_tiny")
    parser.add_argument("--steps", type=int, help="our GRPO steps (default: the config's grpo.max_steps)")
    args = parser.parse_args()
    python = trl_python()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cfg = load_config(args.config, {"workdir": str(workdir)})
        grpo = grpo_settings(cfg)
        steps = args.steps or cfg.grpo.max_steps
        ours = run_ours(workdir, {}, cfg.sft.max_steps, steps, salt=0, grpo=grpo)
        budget = sum(ours["timings"]["timing/step"])
        trl = run_trl(
            python,
            workdir,
            ours["summary"],
            steps * 20,
            tag="budget",
            grpo=grpo,
            extra={"time_budget_s": budget, "save_dir": str(workdir / "trl-model")},
        )
        from engine.storage import ArtifactStore

        store = ArtifactStore(cfg.storage.root, workdir / "cache")
        stages = ours["summary"]["stages"]
        accuracy = held_out_accuracy(
            cfg,
            store.download(stages["data"]["artifact"]),
            {
                "sft": store.download(stages["sft"]["artifact"]),
                "ours": store.download(stages["grpo"]["artifact"]),
                "trl": workdir / "trl-model",
            },
        )
    trl_seconds = sum(s["seconds"] for s in trl["steps"])
    table = [
        "| framework | GRPO steps | seconds in steps | held-out accuracy | change from SFT |",
        "|---|---|---|---|---|",
        f"| SFT model (start) | 0 | 0 | {accuracy['sft']:.3f} | |",
        f"| ours | {len(ours['timings']['timing/step'])} | {budget:.0f} | {accuracy['ours']:.3f} | "
        f"{accuracy['ours'] - accuracy['sft']:+.3f} |",
        f"| TRL GRPOTrainer | {len(trl['steps'])} | {trl_seconds:.0f} | {accuracy['trl']:.3f} | "
        f"{accuracy['trl'] - accuracy['sft']:+.3f} |",
    ]
    import torch

    write_section(
        "grpo_accuracy_vs_trl",
        "Held-out accuracy in the same wall time, ours vs TRL",
        ".venv/bin/python -m bench.grpo_accuracy_vs_trl" + (f" --steps {args.steps}" if args.steps else ""),
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, TRL 1.16.0 (its own venv)",
        "\n".join(table) + f"\n\n`{args.config}`'s GRPO settings for both: {grpo['prompts_per_step']} prompts x "
        f"{grpo['generations_per_prompt']} generations, up to {grpo['max_new_tokens']} new tokens, temperature "
        f"{grpo['temperature']}, lr {grpo['lr']} constant, no KL, clip 0.2, token-level loss, unscaled group "
        f"advantages; ours on {our_layout(args.config)} + {cfg.generation.num_workers} vLLM worker, TRL "
        "one process with transformers' generate. TRL stops once its steps have taken as long as ours did. "
        f"Accuracy: greedy pass@1 on {cfg.evaluate.size} held-out prompts, the same evaluator for all three models.",
    )


if __name__ == "__main__":
    main()
