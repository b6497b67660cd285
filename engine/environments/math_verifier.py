"""Exact-answer rewards for arithmetic: the last number in the final reply must equal the reference."""

from __future__ import annotations

import re
from typing import Any

from engine.environments.interfaces import EnvStepResult, Message

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The last number in a reply (tool calls excluded), normalised ("082" -> "82", "5.0" -> "5")."""
    text = re.sub(r"<calc>.*?</calc>", " ", text, flags=re.S)
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    value = float(numbers[-1])
    return str(int(value)) if value.is_integer() else str(value)


def is_correct(reply: str, reference: str) -> bool:
    answer = extract_answer(reply)
    return answer is not None and answer == extract_answer(reference)


class MathVerifierEnv:
    """Single turn: reward 1 for the exact reference answer, else 0."""

    def step(self, message_logs: list[list[Message]], metadata: list[dict[str, Any]]) -> EnvStepResult:
        rewards = [float(is_correct(log[-1]["content"], meta["answer"])) for log, meta in zip(message_logs, metadata)]
        count = len(message_logs)
        return EnvStepResult([None] * count, rewards, [True] * count, [None] * count, [dict(m) for m in metadata])
