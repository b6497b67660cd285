"""A synthetic task with verifiable answers: "What is 37+45?" -> "82".

Small enough that a 0.5 M-parameter model learns it on two CPU cores. The demonstrations can come from a
teacher who often rounds its answers (``rounded_answer_rate``): SFT copies that habit, an exact verifier
does not reward it, which leaves RL room to improve on SFT. Each problem carries wrong-answer variants, so
the same data yields preference pairs (correct vs wrong) for reward models and DPO. Train and validation
problems are disjoint by construction.
"""

from __future__ import annotations

import operator
import random
from typing import Any

from engine.config import SyntheticDataConfig
from engine.errors import ConfigError

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _wrong_answers(rng: random.Random, answer: int, count: int) -> list[str]:
    wrong: set[int] = set()
    while len(wrong) < count:
        offset = rng.choice([-1, 1]) * rng.choice([1, 2, 10, rng.randint(3, 20)])
        wrong.add(answer + offset)
    return [str(w) for w in sorted(wrong)]


def problem_row(a: int, op: str, b: int, rng: random.Random, num_wrong: int) -> dict[str, Any]:
    answer = _OPS[op](a, b)
    return {
        "prompt": f"What is {a}{op}{b}?",
        "answer": str(answer),
        "wrong_answers": _wrong_answers(rng, answer, num_wrong),
    }


def make_arithmetic(cfg: SyntheticDataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, validation rows), disjoint, deterministic in ``cfg.seed``."""
    low, high = 10 ** (cfg.digits - 1), 10**cfg.digits - 1
    span = high - low + 1
    needed = cfg.num_train + cfg.num_val
    available = span * span * len(cfg.operations)
    if needed > available:
        raise ConfigError(
            f"data.synthetic asks for {needed} problems but only {available} distinct {cfg.digits}-digit ones exist"
        )
    rng = random.Random(cfg.seed)
    seen: set[tuple[int, str, int]] = set()
    rows: list[dict[str, Any]] = []
    while len(rows) < needed:
        problem = (rng.randint(low, high), rng.choice(cfg.operations), rng.randint(low, high))
        if problem in seen:
            continue
        seen.add(problem)
        rows.append(problem_row(*problem, rng=rng, num_wrong=cfg.num_wrong_answers))
    train = rows[: cfg.num_train]
    _add_rounded_demonstrations(train, cfg)
    for row in train[: int(len(train) * cfg.tool_use_fraction)]:
        row["messages"] = tool_demonstration(row)
    return train, rows[cfg.num_train :]


def _add_rounded_demonstrations(train: list[dict[str, Any]], cfg: SyntheticDataConfig) -> None:
    """Give ``rounded_answer_rate`` of the demonstrations the teacher's estimate instead of the exact answer.

    Imitation copies the teacher's habit; an exact verifier does not reward it, which is the room GRPO has over
    SFT. The draw has its own random stream, so the problems themselves do not depend on the rate."""
    if not cfg.rounded_answer_rate:
        return
    rng = random.Random(f"rounded-{cfg.seed}")
    for row in train:
        if rng.random() < cfg.rounded_answer_rate:
            estimate = int(int(row["answer"]) / 10) * 10
            row["messages"] = [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": str(estimate)},
            ]


def normalized_rows(rows: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """The problems in posttrain's normalized form (``engine.data.formats``): the prompt, the teacher's
    demonstration as the completion, the exact answer, and a preference pair (the exact answer against one of the
    wrong ones, chosen by the row's index)."""
    out = []
    for index, row in enumerate(rows):
        prompt = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": row["prompt"]}
        ]
        demonstration = row.get("messages") or [{"role": "user"}, {"role": "assistant", "content": row["answer"]}]
        wrong = row["wrong_answers"][index % len(row["wrong_answers"])]
        out.append(
            {
                "prompt": prompt,
                "completion": demonstration[1:],
                "chosen": [{"role": "assistant", "content": row["answer"]}],
                "rejected": [{"role": "assistant", "content": wrong}],
                "answer": row["answer"],
                "columns": {"answer": row["answer"]},
            }
        )
    return out


def tool_demonstration(row: dict[str, Any]) -> list[dict[str, str]]:
    """The same problem solved through the calculator tool: call, tool answer, final answer."""
    expression = row["prompt"].removeprefix("What is ").removesuffix("?")
    return [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": f"<calc>{expression}</calc>"},
        {"role": "tool", "content": row["answer"]},
        {"role": "assistant", "content": row["answer"]},
    ]


def tokenizer_corpus(seed: int = 0, size: int = 4000) -> list[str]:
    """Text the tiny tokenizer is trained on: task prompts, answers and chat scaffolding."""
    rng = random.Random(seed)
    lines = []
    for _ in range(size):
        op = rng.choice(list(_OPS))
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(f"What is {a}{op}{b}? The answer is {_OPS[op](a, b)}.")
    lines += ["system", "user", "assistant", "tool", "<calc>", "</calc>", "Answer:", "You are a helpful assistant."]
    return lines
