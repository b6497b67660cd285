"""GRPO with LoRA adapters vs full fine-tuning at 19 M parameters, in one run: step time, trainable parameters,
checkpoint bytes, and the bytes and seconds of each refit (merged weights, or the adapter alone).

    .venv/bin/python -m bench.lora          # writes bench/RESULTS.md

Each variant is one `posttrain run grpo` from the same SFT model (run once, cached), 8 steps with a checkpoint at
step 4; step and refit times are medians after the warm-up steps.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from bench.grpo_vs_trl import GRPO, SIZES, after_warmup, our_layout, run_ours
from bench.results import write_section

SIZE = "19 M"
SFT_STEPS = 20  # step time and sizes do not depend on how well the model answers
LORA = {"grpo.lora.rank": 16, "grpo.lora.alpha": 32}
VARIANTS = {
    "full fine-tuning": {},
    "LoRA r=16, merged refit": {**LORA, "generation.lora_refit": "merged"},
    "LoRA r=16, adapter refit": {**LORA, "generation.lora_refit": "adapter"},
}


def grpo_run_numbers(workdir: Path) -> dict[str, float]:
    """The newest grpo stage run's parameter counts and median refit bytes (from this workdir's MLflow)."""
    import statistics

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("posttrain")
    (run,) = client.search_runs(
        [experiment.experiment_id], "tags.`posttrain.stage` = 'grpo'", order_by=["start_time DESC"], max_results=1
    )
    refit_bytes = [m.value for m in client.get_metric_history(run.info.run_id, "refit/bytes")]
    return {
        "parameters": float(run.data.params["model/parameters"]),
        "trainable": float(run.data.params["model/trainable_parameters"]),
        "refit_bytes": statistics.median(refit_bytes),
    }


def checkpoint_bytes(workdir: Path, grpo_artifact: str) -> int:
    stage_dir = workdir / "store" / grpo_artifact.split("/store/", 1)[1].rsplit("/model", 1)[0]
    return sum(f.stat().st_size for f in (stage_dir / "checkpoints").rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    tiny, _ = SIZES[SIZE]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name, overrides in VARIANTS.items():
            extra = {**overrides, "grpo.checkpoint_every": args.steps // 2}
            out = run_ours(workdir, tiny, SFT_STEPS, args.steps, salt=0, extra=extra)
            grpo = out["summary"]["stages"]["grpo"]
            numbers = grpo_run_numbers(workdir)
            rows.append(
                {
                    "name": name,
                    "step": after_warmup(out["timings"]["timing/step"]),
                    "generation": after_warmup(out["timings"]["timing/generation"]),
                    "training": after_warmup(out["timings"]["timing/training"]),
                    "refit": after_warmup(out["timings"]["timing/refit"]),
                    "checkpoint": checkpoint_bytes(workdir, grpo["artifact"]),
                    "error": grpo["metrics"]["token_mult_prob_error_median"],
                    **numbers,
                }
            )
    base = rows[0]
    table = [
        "| variant | s/step | generation s/step | training s/step | trainable parameters | checkpoint | refit bytes | "
        "refit s | token_mult_prob_error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['name']} | {r['step']:.2f} ({r['step'] / base['step']:.2f}x) | {r['generation']:.2f} | "
            f"{r['training']:.2f} | "
            f"{r['trainable'] / 1e6:.2f} M of {r['parameters'] / 1e6:.1f} M | {r['checkpoint'] / 2**20:.1f} MiB | "
            f"{r['refit_bytes'] / 2**20:.2f} MiB | {r['refit']:.3f} | {r['error']:.6f} |"
        )
    import torch

    write_section(
        "lora",
        "GRPO with LoRA vs full fine-tuning at 19 M parameters",
        ".venv/bin/python -m bench.lora",
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "\n".join(table)
        + f"\n\n{GRPO['prompts_per_step']} prompts x {GRPO['generations_per_prompt']} generations a step, "
        f"{our_layout()} + 1 vLLM worker; {args.steps} steps per variant from one SFT model; medians after the "
        "warm-up steps. LoRA on every linear layer (not the embeddings or the output layer), alpha 32; the checkpoint "
        "is the step-4 one (model or adapters, optimizer state, RNG); refit bytes are what one refit moves. An adapter "
        "refit moves a twentieth of the bytes, but vLLM then applies the adapters at every generated token (its CPU "
        "LoRA kernels), which costs far more here than the merged refit it saves: merged is the default.",
    )


if __name__ == "__main__":
    main()
