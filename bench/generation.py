"""Generation throughput, vLLM vs HF, and refit time, at three tiny-model sizes.

    .venv/bin/python -m bench.generation            # writes the 'generation' section of bench/RESULTS.md

Both backends run in the same process tree, one Ray actor each, alternating rounds (A B A B) on the same
prompts (64 prompts x 8 samples x 32 new tokens, temperature 1.0), so the ratio is measured under the same
machine load. Refit: the FSDP2 trainer (2 ranks) pushes its full weights into the vLLM worker.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.results import write_section
from engine import cluster
from engine.config import GenerationConfig, RayConfig, TinyModelConfig, load_config
from engine.data.chat import tokenize_prompt
from engine.generation.group import GenerationGroup, refit
from engine.generation.interfaces import SamplingParams
from engine.models.tiny import make_tiny_model

SIZES = {
    "0.4M": TinyModelConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=256),
    "2.6M": TinyModelConfig(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=8, intermediate_size=512),
    "19M": TinyModelConfig(hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=8, intermediate_size=1280),
}
SAMPLING = SamplingParams(n=8, temperature=1.0, max_tokens=32, seed=0)


def throughput(group: GenerationGroup, prompts: list[list[int]]) -> float:
    started = time.perf_counter()
    out = group.generate(prompts, SAMPLING)
    elapsed = time.perf_counter() - started
    return sum(len(c.token_ids) for samples in out for c in samples) / elapsed


def bench_size(label: str, tiny: TinyModelConfig, rounds: int, workdir: Path) -> dict:
    from transformers import AutoTokenizer

    from engine.policy.group import start_policy_group

    model_dir = make_tiny_model(workdir / label, tiny)
    params = sum(
        p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir).parameters()
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenize_prompt(tokenizer, [{"role": "user", "content": f"What is {a}+{99 - a}?"}]) for a in range(64)]
    groups = {
        backend: GenerationGroup(GenerationConfig(backend=backend, threads_per_worker=2), str(model_dir))
        for backend in ("vllm", "hf")
    }
    speeds: dict[str, list[float]] = {"vllm": [], "hf": []}
    for backend, group in groups.items():  # warm-up
        group.generate(prompts[:4], SAMPLING)
    for _ in range(rounds):
        for backend, group in groups.items():
            speeds[backend].append(throughput(group, prompts))
    groups["hf"].shutdown()

    cfg = load_config(None, {"policy.world_size": 2})
    policy = start_policy_group(cfg, model_dir, cfg.sft.optimizer, total_steps=10, pad_id=tokenizer.pad_token_id)
    refits = [refit(policy.group, groups["vllm"], version=v + 1) for v in range(3)]
    policy.shutdown()
    groups["vllm"].shutdown()
    vllm_tps, hf_tps = statistics.median(speeds["vllm"]), statistics.median(speeds["hf"])
    return {
        "size": label,
        "params": params,
        "vllm_tps": vllm_tps,
        "hf_tps": hf_tps,
        "ratio": vllm_tps / hf_tps,
        "refit_s": statistics.median(r["refit/seconds"] for r in refits),
        "refit_mb": refits[0]["refit/bytes"] / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    args = parser.parse_args()
    cluster.connect(RayConfig(num_cpus=6))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.sizes:
            rows.append(bench_size(label, SIZES[label], args.rounds, Path(tmp)))
            print(rows[-1], flush=True)
    table = [
        "| model | parameters | vLLM tok/s | HF tok/s | vLLM / HF | refit s (median of 3) | refit MB |",
        "|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['size']} | {r['params'] / 1e6:.2f} M | {r['vllm_tps']:.0f} | {r['hf_tps']:.0f} | {r['ratio']:.2f}x "
        f"| {r['refit_s']:.3f} | {r['refit_mb']:.1f} |"
        for r in rows
    ]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, vLLM 0.32.0 (fp32, CPU)"
    write_section(
        "generation",
        "Generation throughput and refit",
        ".venv/bin/python -m bench.generation",
        machine,
        "\n".join(table)
        + f"\n\n64 prompts x 8 samples x up to 32 new tokens, temperature 1.0; {args.rounds} alternating rounds per "
        "backend, median. Each backend is one Ray actor with 2 threads. Refit: 2 FSDP2 ranks -> 1 vLLM worker "
        "through the Ray object store, names/shapes checked before vLLM's in-place reload.",
    )


if __name__ == "__main__":
    main()
