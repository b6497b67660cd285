"""GRPO step time as the model and the number of generations per prompt grow (ours only).

    .venv/bin/python -m bench.grpo_scaling          # writes bench/RESULTS.md

Each point is one `posttrain run grpo` (a short SFT first, then GRPO); the median step after the warm-up steps,
with its generation and training shares. Model sizes at 8 generations per prompt; generations per prompt at the
tiny size.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from bench.grpo_vs_trl import GRPO, SIZES, WARMUP, after_warmup, our_layout, run_ours
from bench.results import write_section

SFT_STEPS = 20  # step time does not depend on how well the model answers, only on how long it answers
GENERATIONS = (4, 8, 16)


def point(root: Path, name: str, tiny: dict, generations: int, steps: int) -> dict:
    workdir = root / name
    workdir.mkdir(parents=True)
    grpo = {**GRPO, "generations_per_prompt": generations}
    timings = run_ours(workdir, tiny, SFT_STEPS, steps, salt=0, grpo=grpo)["timings"]
    step = after_warmup(timings["timing/step"])
    return {
        "step": step,
        "generation": after_warmup(timings["timing/generation"]) / step,
        "training": after_warmup(timings["timing/training"]) / step,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (tiny, _) in SIZES.items():
            rows.append((label, 8, point(Path(tmp), f"size-{len(rows)}", tiny, 8, args.steps)))
        for generations in GENERATIONS:
            if generations != 8:
                rows.append(
                    ("tiny (0.5 M)", generations, point(Path(tmp), f"gen-{generations}", {}, generations, args.steps))
                )
    table = ["| model | generations / prompt | s/step | generation | training |", "|---|---|---|---|---|"]
    for label, generations, r in sorted(rows, key=lambda row: (row[0] != "tiny (0.5 M)", row[1])):
        table.append(f"| {label} | {generations} | {r['step']:.2f} | {r['generation']:.0%} | {r['training']:.0%} |")
    import torch

    write_section(
        "grpo_scaling",
        "GRPO step time as model size and generations per prompt grow",
        ".venv/bin/python -m bench.grpo_scaling",
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "\n".join(table)
        + f"\n\n{GRPO['prompts_per_step']} prompts a step, up to {GRPO['max_new_tokens']} new tokens, {our_layout()} + "
        f"1 vLLM worker; {args.steps} steps per point, median after {WARMUP} warm-up steps.",
    )


if __name__ == "__main__":
    main()
