"""Asynchronous vs synchronous GRPO in the same run: samples per second, step time, how much of the generation
the training hides, and held-out accuracy after the same number of samples.

    .venv/bin/python -m bench.async_grpo          # writes bench/RESULTS.md

Per size: one SFT (cached across the runs), then `posttrain run grpo` synchronous, asynchronous (one step ahead,
the default threads: both roles 2 threads on 2 cores) and asynchronous with 1 thread per role.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

from bench.grpo_vs_trl import GRPO, SIZES, TIMING_KEYS, WARMUP, after_warmup, run_ours
from bench.results import write_section

KEYS = (*TIMING_KEYS, "async/generation_seconds")
AHEAD = {"grpo.async.enabled": True, "grpo.async.queue_size": 1, "grpo.async.max_staleness": 1}
MODES = {
    "synchronous": {},
    "asynchronous": AHEAD,
    "asynchronous, 1 thread per role": {**AHEAD, "policy.threads_per_worker": 1, "generation.threads_per_worker": 1},
}
SFT_STEPS = {"tiny (0.5 M)": 800, "19 M": 60}  # the tiny default's SFT (accuracy ~0.2); 19 M: timing only
VAL_SIZE = 256


def measure(workdir: Path, label: str, steps: int, extra: dict) -> dict:
    tiny, _ = SIZES[label]
    result = run_ours(
        workdir, tiny, SFT_STEPS[label], steps, salt=0, extra={**extra, "grpo.val_size": VAL_SIZE}, keys=KEYS
    )
    timings = result["timings"]
    step = after_warmup(timings["timing/step"])
    sampled = timings["async/generation_seconds"] or timings["timing/generation"]  # sync: all of it is waited for
    hidden = [1 - waited / total for waited, total in zip(timings["timing/generation"], sampled)]
    metrics = result["summary"]["stages"]["grpo"]["metrics"]
    return {
        "step": step,
        "samples_per_s": GRPO["prompts_per_step"] * GRPO["generations_per_prompt"] / step,
        "generation": after_warmup(sampled),
        "training": after_warmup(timings["timing/training"]),
        "hidden": statistics.median(hidden[WARMUP:]),
        "accuracy": (metrics["val_accuracy_first"], metrics["val_accuracy_last"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24, help="GRPO steps per run (the tiny size passes 0.97 by 20)")
    parser.add_argument("--sizes", nargs="+", default=list(SFT_STEPS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.sizes:
            workdir = Path(tmp) / label.split()[0]
            workdir.mkdir()
            for mode, extra in MODES.items():
                rows.append((label, mode, measure(workdir, label, args.steps, extra)))
                print(label, mode, rows[-1][2], flush=True)
    table = [
        "| model | mode | s/step | samples/s | vs sync | generation s | training s | generation hidden | "
        "held-out accuracy (start -> end) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sync = {label: r["step"] for label, mode, r in rows if mode == "synchronous"}
    for label, mode, r in rows:
        first, last = r["accuracy"]
        table.append(
            f"| {label} | {mode} | {r['step']:.2f} | {r['samples_per_s']:.0f} | {sync[label] / r['step']:.2f}x | "
            f"{r['generation']:.2f} | {r['training']:.2f} | {r['hidden']:.0%} | {first:.2f} -> {last:.2f} |"
        )
    import torch

    write_section(
        "async_grpo",
        "Asynchronous vs synchronous GRPO",
        ".venv/bin/python -m bench.async_grpo",
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "\n".join(table)
        + f"\n\n{GRPO['prompts_per_step']} prompts x {GRPO['generations_per_prompt']} generations, up to "
        f"{GRPO['max_new_tokens']} new tokens, {args.steps} GRPO steps per run after "
        + " / ".join(f"{steps} ({label})" for label, steps in SFT_STEPS.items())
        + " SFT steps (cached between a size's runs; the short 19 M SFT leaves a model that answers none right, so "
        "accuracy says nothing there); 1 FSDP2 rank + 1 vLLM worker. Asynchronous: the generator samples step s+1 "
        "with the weights of step s while step s trains (`grpo.async.queue_size=1`), with truncated importance "
        f"sampling (is_max 2, the default for off-policy data). s/step: median after {WARMUP} warm-up steps; "
        "vs sync: the synchronous step time over this row's; generation s: sampling a step's episodes (wherever it "
        "ran); generation hidden: the share of it the trainer did not wait for; held-out accuracy: greedy pass@1 on "
        f"{VAL_SIZE} held-out prompts before GRPO and after the same number of samples.",
    )


if __name__ == "__main__":
    main()
