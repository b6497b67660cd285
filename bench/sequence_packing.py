"""SFT tokens/s with sequence packing vs padded rows, on the same trainer, data and token budget.

    .venv/bin/python -m bench.sequence_packing        # writes its section of bench/RESULTS.md

Two FSDP2 groups on the same model (one rank, two threads each, as in configs/grpo_tiny.yaml) train on the same
batches, their steps interleaved (padded, packed, padded, ...) so that both see the same machine state. Lengths are
spread like instruction data (uniform over 32-256 tokens, the second half the target); tokens/s counts real tokens.
The first step's losses of the two sides are compared: packing must not change what is learned.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.grpo_vs_trl import SIZES
from bench.results import write_section

BATCH, MIN_LEN, MAX_LEN, TOKEN_BUDGET = 32, 32, 256, 4096


def varied_examples(count: int, vocab_size: int, seed: int) -> list:
    from engine.data.chat import TokenizedExample

    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        n = rng.randint(MIN_LEN, MAX_LEN)
        examples.append(
            TokenizedExample([rng.randrange(3, vocab_size) for _ in range(n)], [0] * (n // 2) + [1] * (n - n // 2))
        )
    return examples


def timed_step(group, batch) -> tuple[float, float]:
    from engine.algorithms.sft import sft_loss

    started = time.perf_counter()
    loss = group.train(batch, sft_loss)["loss"]
    return time.perf_counter() - started, loss


def bench_size(label: str, steps: int, root: Path) -> dict:
    from transformers import AutoTokenizer

    from engine.config import TinyModelConfig, load_config
    from engine.data.batching import plan_step
    from engine.models.tiny import make_tiny_model
    from engine.policy.group import start_policy_group

    tiny, _ = SIZES[label]
    model_dir = make_tiny_model(root / label.split()[0], TinyModelConfig(**tiny))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = varied_examples(BATCH * steps, len(tokenizer), seed=0)
    batches = [examples[s * BATCH : (s + 1) * BATCH] for s in range(steps)]
    groups = {}
    for packing in (False, True):
        overrides = {"policy.micro_batch_tokens": TOKEN_BUDGET, "policy.sequence_packing": packing}
        cfg = load_config("grpo_tiny", overrides)
        groups[packing] = start_policy_group(cfg, model_dir, cfg.sft.optimizer, steps, tokenizer.pad_token_id)
    times: dict[bool, list[float]] = {False: [], True: []}
    first_loss = {}
    try:
        for batch in batches:
            for packing, group in groups.items():
                seconds, loss = timed_step(group, batch)
                times[packing].append(seconds)
                first_loss.setdefault(packing, loss)
    finally:
        for group in groups.values():
            group.shutdown()
    real_tokens = statistics.mean(sum(len(e) for e in batch) for batch in batches)
    computed = {}
    for packing in (False, True):
        plans, _ = plan_step(batches[0], 1, TOKEN_BUDGET, tokenizer.pad_token_id, packing=packing)
        key = "packed_input_ids" if packing else "input_ids"
        computed[packing] = (len(plans[0]), sum(mb[key].numel() for mb in plans[0]))
    medians = {packing: statistics.median(values[1:]) for packing, values in times.items()}
    return {
        "label": label,
        "real_tokens": real_tokens,
        "padded": (real_tokens / medians[False], *computed[False]),
        "packed": (real_tokens / medians[True], *computed[True]),
        "loss_diff": abs(first_loss[True] - first_loss[False]),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | padded tok/s | packed tok/s | packed / padded | micro-batches per step (padded / packed) "
        "| tokens computed per step (padded / packed) | first-step loss diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        (pad_speed, pad_batches, pad_tokens), (pack_speed, pack_batches, pack_tokens) = r["padded"], r["packed"]
        lines.append(
            f"| {r['label']} | {pad_speed:.0f} | {pack_speed:.0f} | {pack_speed / pad_speed:.2f}x "
            f"| {pad_batches} / {pack_batches} | {pad_tokens} / {pack_tokens} | {r['loss_diff']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["2.6 M", "19 M"], choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_size(label, args.steps, Path(tmp)) for label in args.sizes]
    print(table(rows))
    machine = f"{platform.machine()}, {torch.get_num_threads()} cores, torch {torch.__version__}"
    notes = (
        f"\n\n{BATCH} sequences a step, lengths uniform over {MIN_LEN}-{MAX_LEN} tokens (about "
        f"{rows[0]['real_tokens']:.0f} real tokens a step), micro_batch_tokens {TOKEN_BUDGET}, SFT loss, fp32; "
        f"{args.steps} steps per side, interleaved, median after the first. 1 FSDP2 rank (2 threads) per side. "
        "Tokens computed: rows x row length over the step's micro-batches (what the model runs on). The padded "
        "path already groups sequences of similar length (longest first), so it pads little; packing removes part "
        "of the rest (rows as long as the longest sequence leave gaps), and the gain follows the tokens computed."
    )
    write_section(
        "sequence_packing",
        "Sequence packing: SFT tokens/s, packed vs padded rows",
        ".venv/bin/python -m bench.sequence_packing",
        machine,
        table(rows) + notes,
    )


if __name__ == "__main__":
    main()
