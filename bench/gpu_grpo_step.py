"""One GRPO step on CUDA: the transformers generator and the FSDP2 trainer, on a GPU machine without Ray.

The device machine has torch and transformers but no Ray, so the workers are driven in-process through the
engine's Ray-free pieces, as the GRPO loop drives them through their groups: a tiny model is SFT-trained for a
few hundred steps (so that some sampled answers are right and the step has advantages to learn from) and
exported as the SFT stage exports it; then a fresh trainer and an ``HFGenerationWorker`` load that export,
``run_rollouts`` samples with the math verifier, ``estimate_advantages`` scores the groups, the trainer takes
one step on ``GRPOLoss`` and the refit pushes its weights to the generator through ``engine.weight_sync``'s
checked path (plain-list buckets instead of Ray object refs).

Checked: both workers on CUDA and the trainer's process group on NCCL; the trainer's logprobs of the sampled
tokens match the generator's before the step (mean exp|difference| <= 1.001); the step trains on rewards with
spread and its loss and grad norm are finite; after the refit the generator holds the trainer's weights
exactly and the logprobs of its new samples match the trainer's. Prints one JSON line; exits 1 when a check
fails, 2 without CUDA. ``--cpu`` runs the same on CPU (gloo), the smoke run before a GPU is at hand.

    python -m bench.gpu_grpo_step [--cpu]
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.gpu_check import free_loopback_port, sft_step_loss

SFT_STEPS, SFT_BATCH, SFT_LR, SFT_ROWS = 400, 128, 2e-3, 6000
PROMPTS, SAMPLES, MAX_NEW_TOKENS = 32, 8, 6


def _trainer(model_dir: Path, lr: float, total_steps: int):
    from engine.config import OptimizerConfig, PolicyConfig
    from engine.policy.fsdp2 import FSDP2PolicyWorker

    policy = PolicyConfig(world_size=1, micro_batch_tokens=100_000)
    optimizer = OptimizerConfig(lr=lr, warmup_steps=0)
    worker = FSDP2PolicyWorker(0, 1, str(model_dir), policy.model_dump(), optimizer.model_dump(), total_steps, seed=0)
    worker.init_distributed("127.0.0.1", free_loopback_port())
    return worker


def _sft_model(model_dir: Path, rows: list[dict], out: Path, tokenizer) -> Path:
    """The SFT stage in small: SFT_STEPS steps on the rows' exact answers, exported with the tokenizer."""
    import torch

    from engine.data.batching import plan_step
    from engine.data.chat import tokenize_example

    trainer = _trainer(model_dir, SFT_LR, SFT_STEPS)
    examples = [tokenize_example(tokenizer, r["prompt"], r["answer"], 64) for r in rows]  # text, as rollouts see it
    for step in range(SFT_STEPS):
        start = step * SFT_BATCH % (len(examples) - SFT_BATCH)
        plans, tokens = plan_step(examples[start : start + SFT_BATCH], 1, 100_000, tokenizer.pad_token_id)
        trainer.train_step(plans[0], sft_step_loss, {"tokens": float(tokens)})
    trainer.export_hf(str(out))
    tokenizer.save_pretrained(out)
    torch.distributed.destroy_process_group()
    return out


def _step_inputs(episodes, advantages, pad_id: int):
    """The trainer's micro-batches and the step's global normalizers, as ``PolicyGroup`` plans them for one rank."""
    from engine.data.batching import plan_step

    examples = [episode.example(advantage=float(a)) for episode, a in zip(episodes, advantages)]
    plans, tokens = plan_step(examples, 1, 100_000, pad_id)
    sequences = sum(1 for e in examples if any(e.loss_mask[1:]))
    return plans[0], {"tokens": float(tokens), "sequences": float(sequences)}


def run(use_cuda: bool) -> dict:
    import torch
    from transformers import AutoTokenizer

    from engine.algorithms.advantages import estimate_advantages
    from engine.algorithms.losses import GRPOLoss
    from engine.algorithms.rollouts import new_episodes, run_rollouts
    from engine.config import GRPOConfig, SyntheticDataConfig, TinyModelConfig
    from engine.data.synthetic import make_arithmetic
    from engine.environments.math_verifier import MathVerifierEnv
    from engine.generation.hf import HFGenerationWorker
    from engine.generation.interfaces import SamplingParams
    from engine.models.tiny import make_tiny_model
    from engine.weight_sync import manifest_of

    started = time.perf_counter()
    g = GRPOConfig()
    rows, prompts = make_arithmetic(SyntheticDataConfig(num_train=SFT_ROWS, num_val=PROMPTS))
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = make_tiny_model(work / "base", TinyModelConfig(intermediate_size=512))
        tokenizer = AutoTokenizer.from_pretrained(base)
        sft_dir = _sft_model(base, rows, work / "sft", tokenizer)
        result["sft_seconds"] = time.perf_counter() - started

        trainer = _trainer(sft_dir, g.optimizer.lr, 1)
        generator = HFGenerationWorker(str(sft_dir), dtype="float32", threads=2)
        result["devices"] = {"trainer": str(trainer.device), "generator": str(generator.device)}
        result["process_group"] = torch.distributed.get_backend()
        loss, environment = GRPOLoss(g.loss), MathVerifierEnv()

        def sample(seed: int):
            episodes = new_episodes(tokenizer, prompts, SAMPLES, "math")
            params = SamplingParams(temperature=1.0, max_tokens=MAX_NEW_TOKENS, seed=seed)
            return run_rollouts(episodes, generator, environment, tokenizer, params, max_turns=1)

        step_started = time.perf_counter()
        episodes = sample(seed=1)
        rewards = torch.tensor([e.reward for e in episodes])
        groups = torch.tensor([e.group for e in episodes])
        advantages = estimate_advantages(rewards, groups, g.advantage_estimator, g.normalize_advantages)
        batches, normalizers = _step_inputs(episodes, advantages, tokenizer.pad_token_id)
        stats = trainer.train_step(batches, loss, normalizers)
        weights = trainer.refit_weights()
        generator.update_weights(manifest_of(weights), [list(weights.items())], version=1)
        result["step_seconds"] = time.perf_counter() - step_started

        result["reward_mean"] = float(rewards.mean())
        result["groups_with_spread"] = sum(int(rewards[groups == gid].std() > 0) for gid in groups.unique())
        result["loss"], result["grad_norm"] = stats["loss_share"], stats["grad_norm"]
        result["token_mult_prob_error_before"] = stats["token_mult_prob_error_sum"] / stats["valid_tokens"]
        live = {name: p.detach().cpu() for name, p in generator.model.named_parameters()}
        result["refit_max_abs_diff"] = max(float((live[n] - w).abs().max()) for n, w in weights.items() if n in live)
        result["generator_version"] = generator.weight_version()
        after = sample(seed=2)
        batches, normalizers = _step_inputs(after, torch.zeros(len(after)), tokenizer.pad_token_id)
        checked = trainer.evaluate(batches, loss, normalizers)
        result["token_mult_prob_error_after"] = checked["token_mult_prob_error_sum"] / checked["valid_tokens"]
        torch.distributed.destroy_process_group()
    result["seconds"] = time.perf_counter() - started
    return result


def checks_of(result: dict, use_cuda: bool) -> dict[str, bool]:
    device, backend = ("cuda", "nccl") if use_cuda else ("cpu", "gloo")
    return {
        f"both_workers_on_{device}": all(d.startswith(device) for d in result["devices"].values()),
        f"process_group_{backend}": result["process_group"] == backend,
        "generator_matches_trainer_before_step": result["token_mult_prob_error_before"] <= 1.001,
        "rewards_have_spread": result["groups_with_spread"] > 0,
        "step_is_finite": math.isfinite(result["loss"]) and math.isfinite(result["grad_norm"]),
        "refit_delivers_the_trainer_weights": result["refit_max_abs_diff"] == 0.0 and result["generator_version"] == 1,
        "generator_matches_trainer_after_refit": result["token_mult_prob_error_after"] <= 1.001,
        "under_5_minutes": result["seconds"] < 300,
    }


def main() -> int:
    use_cuda = "--cpu" not in sys.argv
    if not use_cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA: every worker then picks the CPU
    import torch

    if use_cuda and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device (--cpu runs the CPU smoke run)"}))
        return 2
    result = run(use_cuda)
    checks = checks_of(result, use_cuda)
    device = torch.cuda.get_device_name() if use_cuda else "cpu"
    print(json.dumps({"device": device, "checks": checks, "result": result}))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
