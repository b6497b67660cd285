"""Generation throughput of our vLLM worker against raw vLLM and against transformers, and refit time, at three
tiny-model sizes.

    .venv/bin/python -m bench.generation            # writes the 'generation' section of bench/RESULTS.md

Our two backends and raw vLLM (one ``LLM.generate`` call with ``n`` samples per prompt and the sampled tokens'
logprobs, as a user of vLLM would write it, with our engine settings) each run as one Ray actor in the same kind of
bundle (the vLLM venv for both vLLM actors), in alternating rounds on the same prompts (64 prompts x 8 samples x 32
new tokens, temperature 1.0), so the ratios are measured under the same machine load. Refit: the FSDP2 trainer
(2 ranks) pushes its full weights into our vLLM worker.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from bench.results import write_section
from engine import cluster, worker_envs
from engine.config import GenerationConfig, RayConfig, TinyModelConfig, load_config
from engine.data.chat import tokenize_prompt
from engine.generation.group import GenerationGroup
from engine.generation.interfaces import SamplingParams
from engine.models.tiny import make_tiny_model
from engine.weight_sync import refit

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


class RawVLLM:
    """vLLM as its users call it, in a bundle like our worker's: one engine with our engine settings, one
    ``generate`` call per batch with ``n`` samples per prompt. Defined here, not in the engine: it reaches the vLLM
    venv pickled by value (that venv imports only ``engine`` from this checkout)."""

    def __init__(self, model_path: str, cfg: dict):
        from vllm import LLM

        torch.set_num_threads(cfg["threads_per_worker"])  # as our worker does: the engine keeps the count it finds
        self.llm = LLM(
            model=model_path,
            dtype=cfg["dtype"],
            enforce_eager=True,
            max_model_len=cfg["max_model_len"],
            kv_cache_memory_bytes=cfg["kv_cache_bytes"],
            enable_chunked_prefill=False,
            enable_prefix_caching=True,
            seed=0,
        )

    def tokens_per_second(self, prompts: list[list[int]], n: int, max_tokens: int) -> float:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        params = VLLMSamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=0, logprobs=0)
        started = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        return sum(len(sample.token_ids) for output in outputs for sample in output.outputs) / elapsed


def start_raw_vllm(cfg: GenerationConfig, model_dir: Path) -> tuple[cluster.VirtualCluster, object]:
    virtual = cluster.VirtualCluster("raw-vllm", 1, gpus_per_bundle=cfg.gpus_per_worker)
    options = virtual.actor_options(worker_envs.runtime_env(cfg.worker_env))
    ray.cloudpickle.register_pickle_by_value(sys.modules[RawVLLM.__module__])
    actor = ray.remote(RawVLLM).options(scheduling_strategy=virtual.strategy(0), **options)
    return virtual, actor.remote(str(model_dir), cfg.model_dump(mode="json"))


def bench_size(label: str, tiny: TinyModelConfig, rounds: int, workdir: Path) -> dict:
    from transformers import AutoTokenizer

    from engine.policy.group import start_policy_group

    model_dir = make_tiny_model(workdir / label, tiny)
    params = sum(
        p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir).parameters()
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenize_prompt(tokenizer, [{"role": "user", "content": f"What is {a}+{99 - a}?"}]) for a in range(64)]
    configs = {backend: GenerationConfig(backend=backend, threads_per_worker=2) for backend in ("vllm", "hf")}
    groups = {backend: GenerationGroup(cfg, model_dir) for backend, cfg in configs.items()}
    raw_bundle, raw = start_raw_vllm(configs["vllm"], model_dir)
    runs = {backend: (lambda group=group: throughput(group, prompts)) for backend, group in groups.items()}
    runs["raw"] = lambda: ray.get(raw.tokens_per_second.remote(prompts, SAMPLING.n, SAMPLING.max_tokens))
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for group in groups.values():  # warm-up
        group.generate(prompts[:4], SAMPLING)
    ray.get(raw.tokens_per_second.remote(prompts[:4], SAMPLING.n, SAMPLING.max_tokens))
    for _ in range(rounds):
        for name, run in runs.items():
            speeds[name].append(run())
    groups["hf"].shutdown()
    ray.kill(raw)
    raw_bundle.release()

    cfg = load_config(None, {"policy.world_size": 2})
    policy = start_policy_group(cfg, model_dir, cfg.sft.optimizer, total_steps=10, pad_id=tokenizer.pad_token_id)
    refits = [refit(policy, groups["vllm"], version=v + 1) for v in range(3)]
    policy.shutdown()
    groups["vllm"].shutdown()
    vllm_tps, raw_tps, hf_tps = (statistics.median(speeds[name]) for name in ("vllm", "raw", "hf"))
    return {
        "size": label,
        "params": params,
        "vllm_tps": vllm_tps,
        "raw_tps": raw_tps,
        "hf_tps": hf_tps,
        "of_raw": vllm_tps / raw_tps,
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
        "| model | parameters | our vLLM worker tok/s | raw vLLM tok/s | ours / raw | our HF worker tok/s "
        "| our vLLM / HF | refit s (median of 3) | refit MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table += [
        f"| {r['size']} | {r['params'] / 1e6:.2f} M | {r['vllm_tps']:.0f} | {r['raw_tps']:.0f} | {r['of_raw']:.2f}x "
        f"| {r['hf_tps']:.0f} | {r['ratio']:.2f}x | {r['refit_s']:.3f} | {r['refit_mb']:.1f} |"
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
        "backend, median. Each is one Ray actor with 2 torch threads (the same bundle and venv for both vLLM "
        "actors). Our vLLM worker sends one seeded request per sample (exact resume: a sample's seed depends on "
        "(seed, step, prompt, sample) only) and skips vLLM's detokenization unless stop strings need it, decoding "
        "the texts once; raw vLLM is one request per prompt with n=8, logprobs of the sampled tokens and vLLM's "
        "own detokenization. Refit: 2 FSDP2 ranks -> 1 vLLM worker by the default collective (a gloo broadcast of "
        "the weight buckets), names/shapes checked before vLLM's in-place reload.",
    )


if __name__ == "__main__":
    main()
