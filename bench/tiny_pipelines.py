"""Wall time of the tiny pipelines on their defaults, from nothing, as a user runs them (the tests check what they
learn; how long they take is measured here, against targets).

    .venv/bin/python -m bench.tiny_pipelines       # writes bench/RESULTS.md

In one fresh folder: `posttrain run sft` (sft_tiny), `posttrain run grpo-pipeline` (grpo_tiny) and its all-cached
rerun, then `posttrain run dpo-pipeline` (dpo_tiny: its SFT stage is the GRPO pipeline's, cached).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from bench.grpo_vs_trl import POSTTRAIN
from bench.results import write_section

TARGETS = {  # seconds, or a share of the uncached run for the cached rerun
    "sft": 180.0,
    "grpo-pipeline": 600.0,
    "grpo-pipeline (all cached)": 0.2,
    "dpo-pipeline (SFT cached)": 300.0,
}


def timed(pipeline: str, workdir: Path) -> tuple[float, dict]:
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    started = time.perf_counter()
    out = subprocess.run([POSTTRAIN, "run", pipeline, "--json"], cwd=workdir, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return time.perf_counter() - started, json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sft, _ = timed("sft", workdir)
        grpo, summary = timed("grpo-pipeline", workdir)
        cached, _ = timed("grpo-pipeline", workdir)
        dpo, dpo_summary = timed("dpo-pipeline", workdir)
    measured = {
        "sft": (sft, f"{sft:.0f} s"),
        "grpo-pipeline": (grpo, f"{grpo:.0f} s"),
        "grpo-pipeline (all cached)": (cached / grpo, f"{cached:.1f} s ({cached / grpo:.2f} of the uncached run)"),
        "dpo-pipeline (SFT cached)": (dpo, f"{dpo:.0f} s"),
    }
    rows = ["| run | wall | target | met |", "|---|---|---|---|"]
    for name, (value, shown) in measured.items():
        target = TARGETS[name]
        limit = f"<= {target:.0%} of uncached" if target < 1 else f"<= {target:.0f} s"
        rows.append(f"| {name} | {shown} | {limit} | {'yes' if value <= target else 'no'} |")
    accuracy = summary["stages"]["evaluate"]["metrics"]
    dpo_accuracy = dpo_summary["stages"]["evaluate"]["metrics"]
    import torch

    write_section(
        "tiny_pipelines",
        "Tiny pipelines on their defaults: wall time",
        ".venv/bin/python -m bench.tiny_pipelines",
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "\n".join(rows) + f"\n\nStages of the GRPO pipeline: {', '.join(summary['stages'])}. Held-out greedy accuracy "
        f"{accuracy['accuracy_sft']:.3f} (SFT) -> {accuracy['accuracy_final']:.3f} (GRPO); DPO "
        f"{dpo_accuracy['accuracy_sft']:.3f} -> {dpo_accuracy['accuracy_final']:.3f}. Each run starts its own "
        "temporary Prefect server and embedded Ray, as `make run` does.",
    )


if __name__ == "__main__":
    main()
