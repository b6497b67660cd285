"""GRPO step time, ours vs TRL's GRPOTrainer, on the same model, prompts and settings; where our step's time
goes; and the fixed cost of a pipeline run.

    .venv/bin/python -m bench.grpo_vs_trl          # builds TRL's venv on first use; writes bench/RESULTS.md

For each model size: our `grpo` flow (the CLI, as users run it) prepares the data and the SFT model, then GRPO
runs alternately with TRL from that same SFT model (ours, TRL, ours, TRL), each for the same number of steps;
step times are medians after the first WARMUP steps. TRL generates with transformers' `generate` (its vLLM path
needs CUDA); both use the machine's two cores (ours: the config's FSDP2 ranks + 1 vLLM worker; TRL: one process,
2 threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results import write_section
from bench.trl_env import trl_python

REPO = Path(__file__).resolve().parents[1]
POSTTRAIN = str(Path(sys.executable).parent / "posttrain")
WARMUP = 2
TIMING_KEYS = ("timing/step", "timing/generation", "timing/logprobs", "timing/training", "timing/refit")
GRPO = {"prompts_per_step": 32, "generations_per_prompt": 8, "max_new_tokens": 6, "temperature": 1.0, "lr": 1e-4}
SIZES = {  # model.tiny overrides on top of configs/grpo_tiny.yaml, and how long its SFT warm-up runs
    "tiny (0.5 M)": ({}, 400),
    "2.6 M": ({"hidden_size": 256, "num_layers": 4, "num_heads": 8, "num_kv_heads": 8, "intermediate_size": 512}, 60),
    "19 M": (
        {"hidden_size": 512, "num_layers": 6, "num_heads": 8, "num_kv_heads": 8, "intermediate_size": 1280},
        60,
    ),
}


def our_layout(config: str = "grpo_tiny") -> str:
    """How our trainer uses the cores under ``config``, for the tables' notes: e.g. '1 FSDP2 rank (2 threads)'."""
    from engine.config import load_config

    policy = load_config(config).policy
    threads = f"{policy.threads_per_worker} thread{'s' if policy.threads_per_worker > 1 else ''}"
    if policy.world_size == 1:
        return f"1 FSDP2 rank ({threads})"
    return f"{policy.world_size} FSDP2 ranks ({threads} each)"


def run_ours(
    workdir: Path,
    tiny: dict,
    sft_steps: int,
    steps: int,
    salt: int,
    grpo: dict = GRPO,
    backend: str = "vllm",
    extra: dict | None = None,
    keys: tuple[str, ...] = TIMING_KEYS,
) -> dict:
    """One `posttrain run grpo` generating with ``backend``; ``salt`` varies a GRPO-only setting so GRPO reruns
    while SFT stays cached; ``extra``: further overrides (dotted keys); ``keys``: the per-step metrics returned."""
    overrides = {
        "workdir": str(workdir),
        "generation.backend": backend,
        "sft.max_steps": sft_steps,
        "reward_model.max_steps": 2,
        "grpo.max_steps": steps,
        "grpo.val_every": steps,
        "grpo.checkpoint_every": steps,
        "grpo.val_size": 32 + salt,
        **{f"grpo.{k}": v for k, v in grpo.items() if k != "lr"},
        "grpo.optimizer.lr": grpo["lr"],
        **{f"model.tiny.{k}": v for k, v in tiny.items()},
        **(extra or {}),
    }
    args = [POSTTRAIN, "run", "grpo", "--json"] + [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    started = time.perf_counter()
    out = subprocess.run(args, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return {"summary": summary, "wall": wall, "timings": grpo_timings(workdir, keys)}


def grpo_timings(workdir: Path, keys: tuple[str, ...] = TIMING_KEYS) -> dict[str, list[float]]:
    """Per-step metrics (``keys``, the step timings by default) of the newest grpo stage run in this workdir's
    MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("posttrain")
    run = client.search_runs(
        [experiment.experiment_id], "tags.`posttrain.stage` = 'grpo'", order_by=["start_time DESC"], max_results=1
    )[0]
    return {
        key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        for key in keys
    }


def run_trl(
    python: str, workdir: Path, summary: dict, steps: int, tag: str, grpo: dict = GRPO, extra: dict | None = None
) -> dict:
    """TRL's GRPOTrainer from our run's SFT model and training rows; ``extra`` adds runner keys (a time budget,
    a folder to save the final model in)."""
    from engine.storage import ArtifactStore

    store = ArtifactStore(f"file://{workdir}/store", workdir / "cache")
    spec = {
        **grpo,
        **(extra or {}),
        "model_dir": str(store.download(summary["stages"]["sft"]["artifact"])),
        "train_jsonl": str(store.download(summary["stages"]["data"]["artifact"]) / "train.jsonl"),
        "output_dir": str(workdir / f"trl-{tag}"),
        "max_steps": steps,
        "threads": os.cpu_count() or 1,
        "seed": 0,
    }
    spec_path = workdir / f"trl-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    out = subprocess.run([python, "-m", "bench.trl_grpo", str(spec_path)], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def fixed_costs(workdir: Path, tiny: dict, sft_steps: int, steps: int, backend: str) -> float:
    """Wall time of a run whose every stage is cached (the first round's ``backend`` run again): Prefect, MLflow and
    process start-up and teardown."""
    return run_ours(workdir, tiny, sft_steps, steps, salt=0, backend=backend)["wall"]


def after_warmup(values: list[float]) -> float:
    return statistics.median(values[WARMUP:] if len(values) > WARMUP + 2 else values)


def bench_size(label: str, python: str, steps: int, rounds: int, root: Path, backends: list[str]) -> list[dict]:
    """One row per generation backend of ours, each against the TRL runs of the same rounds."""
    tiny, sft_steps = SIZES[label]
    workdir = root / label.split()[0]
    workdir.mkdir(parents=True)
    ours: dict[str, list[dict]] = {backend: [] for backend in backends}
    trl = []
    for salt in range(rounds):
        for backend in backends:
            ours[backend].append(run_ours(workdir, tiny, sft_steps, steps, salt, backend=backend))
            print(label, backend, after_warmup(ours[backend][-1]["timings"]["timing/step"]), flush=True)
        trl.append(run_trl(python, workdir, ours[backends[0]][0]["summary"], steps, tag=str(salt)))
        print(label, "trl", after_warmup([s["seconds"] for s in trl[-1]["steps"]]), flush=True)
    trl_step = statistics.median(after_warmup([s["seconds"] for s in t["steps"]]) for t in trl)
    fixed = fixed_costs(workdir, tiny, sft_steps, steps, backends[0])
    rows = []
    for backend, runs in ours.items():
        parts = {k: statistics.median(after_warmup(o["timings"][k]) for o in runs) for k in runs[0]["timings"]}
        rows.append(
            {
                "label": label,
                "backend": backend,
                "ours": statistics.median(after_warmup(o["timings"]["timing/step"]) for o in runs),
                "trl": trl_step,
                "parts": parts,
                "fixed": fixed,
                "pipeline_wall": runs[-1]["wall"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", default=["tiny (0.5 M)", "19 M"])
    parser.add_argument("--generation", nargs="+", default=["vllm", "hf"], help="our generation backends")
    args = parser.parse_args()
    python = trl_python()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            row
            for label in args.sizes
            for row in bench_size(label, python, args.steps, args.rounds, Path(tmp), args.generation)
        ]
    table = [
        "| model | our generation | ours s/step | TRL s/step | ours / TRL | generation | logprobs | training | refit "
        "| other |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["parts"]
        step = p["timing/step"]
        other = step - sum(p[k] for k in ("timing/generation", "timing/logprobs", "timing/training", "timing/refit"))
        shares = [p[k] / step for k in ("timing/generation", "timing/logprobs", "timing/training", "timing/refit")]
        table.append(
            f"| {r['label']} | {r['backend']} | {r['ours']:.2f} | {r['trl']:.2f} | {r['ours'] / r['trl']:.2f}x | "
            + " | ".join(f"{s:.0%}" for s in shares)
            + f" | {other / step:.0%} |"
        )
    fixed = "\n".join(
        f"- {r['label']}: a run with every stage cached takes {r['fixed']:.1f} s of wall time (process start, "
        f"Prefect's temporary server, MLflow, teardown); the last uncached GRPO run took {r['pipeline_wall']:.1f} s."
        for r in rows
        if r["backend"] == args.generation[0]
    )
    import torch

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, TRL 1.16.0 (its own venv)"
    write_section(
        "grpo_vs_trl",
        "GRPO step time vs TRL, step breakdown, fixed costs",
        ".venv/bin/python -m bench.grpo_vs_trl",
        machine,
        "\n".join(table)
        + f"\n\n{GRPO['prompts_per_step']} prompts x {GRPO['generations_per_prompt']} generations, up to "
        f"{GRPO['max_new_tokens']} new tokens, temperature 1.0, lr {GRPO['lr']} constant, no KL, clip 0.2, "
        f"token-level loss, unscaled group advantages; {args.steps} steps per run, {args.rounds} alternating rounds "
        f"(ours, TRL, ours, TRL; each round runs ours once per generation backend), median step after {WARMUP} "
        f"warm-up steps. Ours: {our_layout()} + 1 generation worker (vLLM, the default, or our transformers "
        f"backend, `generation.backend=hf`); TRL: one process, 2 threads, transformers' `generate`. Shares are of "
        f"our median step.\n\n" + fixed,
    )


if __name__ == "__main__":
    main()
