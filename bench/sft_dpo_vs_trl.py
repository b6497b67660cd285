"""SFT tokens/s vs TRL's SFTTrainer, DPO step time vs TRL's DPOTrainer, and our SFT's model FLOPs utilisation.

    .venv/bin/python -m bench.sft_dpo_vs_trl          # builds TRL's venv on first use; writes bench/RESULTS.md

For each model size our `sft` / `dpo` flows (the CLI, as users run them) and TRL's trainers run alternately
(ours, TRL, ours, TRL) on the same model, rows, batch size, sequence limit and optimizer settings; step times are
medians after the first WARMUP steps. Tokens are non-padding input tokens. MFU = achieved training FLOP/s (6 x
parameters + 12 x layers x hidden x sequence length, per token) over the machine's measured matmul FLOP/s in the
same dtype (two threads, [2048, 1024] x [1024, 1024] through F.linear).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.grpo_vs_trl import POSTTRAIN, REPO, SIZES, WARMUP, after_warmup, our_layout
from bench.results import write_section
from bench.trl_env import trl_python

SFT = {"batch_size": 64, "lr": 2e-3, "max_seq_len": 256}
DPO = {"batch_size": 32, "lr": 1e-4, "beta": 0.1, "sft_weight": 1.0, "max_seq_len": 256}
SFT_BEFORE_DPO = 20  # DPO starts from a briefly trained SFT model (its steps are not timed)


def run_ours(workdir: Path, flow: str, tiny: dict, steps: int, salt: int, extra: dict | None = None) -> dict:
    """One `posttrain run sft|dpo`; ``salt`` changes the validation size so the stage reruns."""
    stage = "sft" if flow == "sft" else "dpo"
    spec = SFT if flow == "sft" else DPO
    overrides = {
        "workdir": str(workdir),
        "sft.max_steps": steps if flow == "sft" else SFT_BEFORE_DPO,
        f"{stage}.max_steps": steps,
        f"{stage}.val_every": steps,
        f"{stage}.checkpoint_every": steps,
        f"{stage}.val_size": 32 + salt,
        f"{stage}.batch_size": spec["batch_size"],
        f"{stage}.max_seq_len": spec["max_seq_len"],
        f"{stage}.optimizer.lr": spec["lr"],
        f"{stage}.optimizer.warmup_steps": 0,
        f"{stage}.optimizer.schedule": "constant",
        **({"dpo.beta": DPO["beta"], "dpo.sft_weight": DPO["sft_weight"]} if flow == "dpo" else {}),
        **{f"model.tiny.{k}": v for k, v in tiny.items()},
        **(extra or {}),
    }
    config = "grpo_tiny" if flow == "sft" else "dpo_tiny"
    args = [POSTTRAIN, "run", flow, "--config", config, "--json"]
    args += [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    started = time.perf_counter()
    out = subprocess.run(args, cwd=workdir, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return {"summary": summary, "wall": time.perf_counter() - started, "metrics": stage_metrics(workdir, stage)}


def stage_metrics(workdir: Path, stage: str) -> dict[str, list[float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    experiment = client.get_experiment_by_name("posttrain")
    run = client.search_runs(
        [experiment.experiment_id], f"tags.`posttrain.stage` = '{stage}'", order_by=["start_time DESC"], max_results=1
    )[0]
    return {
        key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        for key in ("timing/step", "train/tokens")
    }


def run_trl(python: str, mode: str, workdir: Path, summary: dict, steps: int, tag: str) -> dict:
    from engine.storage import ArtifactStore

    store = ArtifactStore(f"file://{workdir}/store", workdir / "cache")
    model_stage = "model" if mode == "sft" else "sft"
    spec = {
        **(SFT if mode == "sft" else DPO),
        "model_dir": str(store.download(summary["stages"][model_stage]["artifact"])),
        "train_jsonl": str(store.download(summary["stages"]["data"]["artifact"]) / "train.jsonl"),
        "output_dir": str(workdir / f"trl-{mode}-{tag}"),
        "max_steps": steps,
        "threads": os.cpu_count() or 1,
    }
    spec_path = workdir / f"trl-{mode}-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    out = subprocess.run(
        [python, "-m", "bench.trl_sft_dpo", mode, str(spec_path)], cwd=REPO, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def trl_tokens_per_second(result: dict) -> float:
    """From TRL's cumulative ``num_tokens`` log and the per-step wall times, after warm-up."""
    steps = result["steps"]
    seen = [s["num_tokens"] for s in steps]
    per_step = [b - a for a, b in zip([0.0] + seen[:-1], seen)]
    rates = [tokens / s["seconds"] for tokens, s in zip(per_step, steps)]
    return after_warmup(rates)


def ours_tokens_per_second(metrics: dict) -> float:
    return after_warmup([t / s for t, s in zip(metrics["train/tokens"], metrics["timing/step"])])


def matmul_flops(dtype_name: str, rows: int = 2048, size: int = 1024, repeats: int = 10) -> float:
    """The machine's measured dense matmul FLOP/s in one dtype with the benchmark's thread count, through
    ``F.linear`` as the models call it (on CPUs without bf16 units, bf16 ``a @ b`` takes a ~10x slower path)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, dtype_name)
    x, weight = torch.randn(rows, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    F.linear(x, weight)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        F.linear(x, weight)
        times.append(time.perf_counter() - started)
    return 2 * rows * size * size / min(times)  # the peak: the best of the repeats


def training_flops_per_token(model_dir: Path, sequence_length: float) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return 6 * parameters + 12 * config.num_hidden_layers * config.hidden_size * sequence_length


def bench_size(label: str, python: str, steps: int, rounds: int, root: Path, peaks: dict) -> dict:
    from engine.storage import ArtifactStore

    tiny, _ = SIZES[label]
    workdir = root / label.split()[0]
    workdir.mkdir(parents=True)
    sft_ours, sft_trl, dpo_ours, dpo_trl = [], [], [], []
    for salt in range(rounds):
        sft_ours.append(run_ours(workdir, "sft", tiny, steps, salt))
        sft_trl.append(run_trl(python, "sft", workdir, sft_ours[0]["summary"], steps, str(salt)))
        dpo_ours.append(run_ours(workdir, "dpo", tiny, steps, salt))
        dpo_trl.append(run_trl(python, "dpo", workdir, dpo_ours[0]["summary"], steps, str(salt)))
        print(label, "sft", ours_tokens_per_second(sft_ours[-1]["metrics"]), trl_tokens_per_second(sft_trl[-1]))
    # bf16 matmuls are ~5x slower than fp32 on CPUs without bf16 units: the bf16 row is run at the tiny size only
    bf16 = run_ours(workdir, "sft", tiny, steps, rounds, {"policy.precision": "bf16"}) if not tiny else None
    store = ArtifactStore(f"file://{workdir}/store", workdir / "cache")
    model_dir = store.download(sft_ours[0]["summary"]["stages"]["model"]["artifact"])
    metrics = sft_ours[0]["metrics"]
    sequences = SFT["batch_size"]
    mean_length = statistics.median(metrics["train/tokens"]) / sequences
    flops_per_token = training_flops_per_token(model_dir, mean_length)
    fp32_rate = statistics.median(ours_tokens_per_second(o["metrics"]) for o in sft_ours)
    bf16_rate = ours_tokens_per_second(bf16["metrics"]) if bf16 else float("nan")
    return {
        "label": label,
        "sft_ours": fp32_rate,
        "sft_trl": statistics.median(trl_tokens_per_second(t) for t in sft_trl),
        "dpo_ours": statistics.median(after_warmup(o["metrics"]["timing/step"]) for o in dpo_ours),
        "dpo_trl": statistics.median(after_warmup([s["seconds"] for s in t["steps"]]) for t in dpo_trl),
        "mfu_fp32": fp32_rate * flops_per_token / peaks["float32"],
        "mfu_bf16": bf16_rate * flops_per_token / peaks["bfloat16"],  # nan where not run
        "bf16_rate": bf16_rate,
        "flops_per_token": flops_per_token,
    }


def _share(value: float) -> str:
    return "not run" if value != value else f"{value:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    args = parser.parse_args()
    python = trl_python()
    peaks = {name: matmul_flops(name) for name in ("float32", "bfloat16")}
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_size(label, python, args.steps, args.rounds, Path(tmp), peaks) for label in args.sizes]
    table = [
        "| model | SFT tok/s ours | SFT tok/s TRL | ours / TRL | DPO s/step ours | DPO s/step TRL | ours / TRL "
        "| SFT MFU fp32 | SFT MFU bf16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['label']} | {r['sft_ours']:.0f} | {r['sft_trl']:.0f} | {r['sft_ours'] / r['sft_trl']:.2f}x "
            f"| {r['dpo_ours']:.2f} | {r['dpo_trl']:.2f} | {r['dpo_ours'] / r['dpo_trl']:.2f}x "
            f"| {r['mfu_fp32']:.1%} | {_share(r['mfu_bf16'])} |"
        )
    import torch

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, TRL 1.16.0 (its own venv)"
    notes = (
        f"SFT: {SFT['batch_size']} sequences a step, lr {SFT['lr']} constant; DPO: {DPO['batch_size']} pairs a step, "
        f"beta {DPO['beta']}, sigmoid + NLL on chosen (weight {DPO['sft_weight']}), reference logprobs computed once "
        f"before training by both; {args.steps} steps per run, {args.rounds} alternating rounds, median after "
        f"{WARMUP} warm-up steps. Ours: {our_layout()}; TRL: one process, 2 threads.\n\n"
        f"Measured matmul peak (2 threads): fp32 {peaks['float32'] / 1e9:.1f} GFLOP/s, bf16 "
        f"{peaks['bfloat16'] / 1e9:.1f} GFLOP/s. "
        + " ".join(
            f"{r['label']}: {r['flops_per_token'] / 1e6:.1f} MFLOP per trained token"
            + (f", bf16 SFT {r['bf16_rate']:.0f} tok/s." if r["bf16_rate"] == r["bf16_rate"] else ".")
            for r in rows
        )
    )
    write_section(
        "sft_dpo_vs_trl",
        "SFT throughput and DPO step time vs TRL, SFT model FLOPs utilisation",
        ".venv/bin/python -m bench.sft_dpo_vs_trl",
        machine,
        "\n".join(table) + "\n\n" + notes,
    )


if __name__ == "__main__":
    main()
