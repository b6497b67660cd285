"""Math answers checked by value: Hugging Face's ``math-verify`` (numbers with thousands separators, fractions,
LaTeX, ``\\boxed{}``) behind an exact fast path for plain integers.

A reply is graded by its final answer (tool calls removed): equal in value to the reference, compared exactly
(integers of any size, no floats); non-ASCII digits are not numbers. A row without a reference answer is not
scored (``metadata["unscored"]``), never a crash.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from engine.environments.interfaces import EnvStepResult, Message

_PLAIN_INTEGER = re.compile(r"\s*([+-]?[0-9]+)\s*\.?\s*")  # ASCII digits only: "٣" is not 3
_TOOL_CALLS = re.compile(r"<calc>.*?</calc>", re.S)
MAX_REPLY_CHARS = 4000  # the parsers' work grows with the text: a runaway reply is graded on its tail

logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call made without a signal timeout


def _final_text(reply: str) -> str:
    return _TOOL_CALLS.sub(" ", reply)[-MAX_REPLY_CHARS:]


def _timeouts() -> dict[str, Any]:
    """math-verify bounds its work with SIGALRM, which only the main thread may use."""
    on_main = threading.current_thread() is threading.main_thread()
    return {"parse": 5 if on_main else None, "verify": 5 if on_main else None}


def is_correct(reply: str, reference: str | None) -> bool:
    """True when the reply's final answer equals the reference in value."""
    if reference is None:
        return False
    text = _final_text(reply)
    plain_reply, plain_reference = _PLAIN_INTEGER.fullmatch(text), _PLAIN_INTEGER.fullmatch(reference)
    if plain_reply and plain_reference:
        return int(plain_reply.group(1)) == int(plain_reference.group(1))
    from math_verify import parse, verify

    limits = _timeouts()
    gold = parse(reference, parsing_timeout=limits["parse"])
    answer = parse(text, parsing_timeout=limits["parse"])
    return bool(gold and answer) and verify(gold, answer, timeout_seconds=limits["verify"])


def can_score(reference: str | None) -> bool:
    """A reference answer math-verify can read (an unreadable one leaves the row unscored, not wrong)."""
    if reference is None:
        return False
    if _PLAIN_INTEGER.fullmatch(reference):
        return True
    from math_verify import parse

    return bool(parse(reference, parsing_timeout=_timeouts()["parse"]))


class MathVerifierEnv:
    """Single turn: reward 1 for an answer equal to the reference, else 0."""

    def step(self, message_logs: list[list[Message]], metadata: list[dict[str, Any]]) -> EnvStepResult:
        rewards, out = [], []
        for log, meta in zip(message_logs, metadata):
            reference = meta.get("answer")
            scored = can_score(reference)
            rewards.append(float(scored and is_correct(log[-1]["content"], reference)))
            out.append({**meta, **({} if scored else {"unscored": True})})
        count = len(message_logs)
        return EnvStepResult([None] * count, rewards, [True] * count, [None] * count, out)
