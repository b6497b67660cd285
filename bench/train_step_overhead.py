"""The training part of a GRPO step against a bare forward/backward/AdamW loop on the same shapes.

    .venv/bin/python -m bench.train_step_overhead       # writes its section of bench/RESULTS.md

Ours: the FSDP2 rank's ``train_step`` with ``GRPOLoss`` (forward, the loss with its metrics, backward, grad
clipping, AdamW, the scheduler) plus the controller's planning of the micro-batches (``plan_step``). Bare: the same
model, one padded batch built beforehand, the token logprobs and a policy-gradient loss, backward, grad clipping and
AdamW, nothing else. Both run in this process with two threads, in blocks (ours, bare, ours, bare), on the same
batches, shaped like the tiny GRPO step's (32 prompts x 8 samples; prompts of 20-26 tokens, responses of 2-7). The
Ray call around our step is left out: as separate processes the two sides disturb each other's timings (an idle
process's threads still spin when the other starts) more than the call costs.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.grpo_vs_trl import SIZES
from bench.results import write_section

PROMPTS, SAMPLES, STEPS, WARMUP, ROUNDS = 32, 8, 6, 2, 2


def grpo_shaped_batch(rng: random.Random, vocab_size: int) -> list:
    from engine.data.chat import TokenizedExample

    examples = []
    for _ in range(PROMPTS):
        prompt = [rng.randrange(3, vocab_size) for _ in range(rng.randint(20, 26))]
        advantage = rng.uniform(-1, 1)
        for _ in range(SAMPLES):
            response = [rng.randrange(3, vocab_size) for _ in range(rng.randint(2, 7))]
            examples.append(
                TokenizedExample(
                    prompt + response,
                    [0] * len(prompt) + [1] * len(response),
                    token_values={"generation_logprobs": [0.0] * len(prompt) + [-1.0] * len(response)},
                    scalars={"advantage": advantage},
                )
            )
    return examples


class BareLoop:
    def __init__(self, model_dir: Path, lr: float):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.config.use_cache = False
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)

    def step(self, examples: list, pad_id: int) -> float:
        from engine.data.batching import collate
        from engine.models.logprobs import token_logprobs_from_logits

        batch = collate(examples, pad_id)  # built before the clock starts: the bare side plans nothing
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logprobs = token_logprobs_from_logits(logits, batch["input_ids"])
        mask = batch["loss_mask"]
        loss = -(logprobs * batch["advantage"][:, None] * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return time.perf_counter() - started


def bench_size(label: str, root: Path) -> dict:
    from transformers import AutoTokenizer

    from bench.gpu_check import free_loopback_port
    from engine.algorithms.losses import GRPOLoss
    from engine.config import TinyModelConfig, load_config
    from engine.data.batching import plan_step
    from engine.models.tiny import make_tiny_model
    from engine.policy.fsdp2 import FSDP2PolicyWorker

    tiny, _ = SIZES[label]
    model_dir = make_tiny_model(root / label.split()[0], TinyModelConfig(**tiny))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id
    cfg = load_config("grpo_tiny")
    rng = random.Random(0)
    batches = [grpo_shaped_batch(rng, len(tokenizer)) for _ in range(STEPS)]
    bare = BareLoop(model_dir, cfg.grpo.optimizer.lr)
    trainer = FSDP2PolicyWorker(
        0, 1, str(model_dir), cfg.policy.model_dump(), cfg.grpo.optimizer.model_dump(), ROUNDS * STEPS, cfg.seed
    )
    trainer.init_distributed("127.0.0.1", free_loopback_port())
    loss = GRPOLoss(cfg.grpo.loss)
    ours_s: list[float] = []
    bare_s: list[float] = []
    try:
        for _ in range(ROUNDS):
            for i, examples in enumerate(batches):
                started = time.perf_counter()
                plans, tokens = plan_step(examples, 1, cfg.policy.micro_batch_tokens, pad_id)
                sequences = sum(1 for e in examples if any(e.loss_mask[1:]))
                trainer.train_step(plans[0], loss, {"tokens": float(tokens), "sequences": float(sequences)})
                if i >= WARMUP:
                    ours_s.append(time.perf_counter() - started)
            for i, examples in enumerate(batches):
                seconds = bare.step(examples, pad_id)
                if i >= WARMUP:
                    bare_s.append(seconds)
    finally:
        torch.distributed.destroy_process_group()
    ours, bare_median = statistics.median(ours_s), statistics.median(bare_s)
    return {"label": label, "ours": ours, "bare": bare_median}


def table(rows: list[dict]) -> str:
    lines = ["| model | ours s | bare loop s | ours / bare |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['ours']:.3f} | {r['bare']:.3f} | {r['ours'] / r['bare']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny (0.5 M)", "19 M"], choices=list(SIZES))
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_size(label, Path(tmp)) for label in args.sizes]
    print(table(rows))
    notes = (
        f"\n\n{PROMPTS} prompts x {SAMPLES} samples a step, fp32, 2 threads; {ROUNDS} rounds of {STEPS} steps a side "
        f"(ours, then bare), median over the steps after the first {WARMUP} of each block. Ours: the FSDP2 rank's "
        "step (one rank, as configs/grpo_tiny.yaml runs it) and the planning of its micro-batches, in this process."
    )
    write_section(
        "train_step_overhead",
        "The GRPO training step vs a bare loop",
        ".venv/bin/python -m bench.train_step_overhead",
        f"{platform.machine()}, 2 cores, torch {torch.__version__}",
        table(rows) + notes,
    )


if __name__ == "__main__":
    main()
