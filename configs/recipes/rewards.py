"""Reward functions for the GSM8K recipes, in TRL's signature: fn(prompts, completions, **columns) -> list[float | None]

Name one in a config as `grpo.reward_functions: [{function: rewards.py:final_answer_line, weight: 0.2}]`: a path in a
YAML file is relative to that file (on the command line, to where `posttrain run` starts), or `package.module:name`.
The math environment already checks the answer's value; these add what a verifier does not see. `completions` come
in the dataset's form: lists of messages for conversational data (the recipes' `data.as_chat: true`), strings for
plain text.
"""

import re

FINAL_LINE = re.compile(r"^####\s*[-+]?[0-9][0-9,]*(\.[0-9]+)?\s*$", re.M)


def _text(completion) -> str:
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


def final_answer_line(prompts, completions, **columns) -> list[float]:
    """1.0 when the reply ends its work with a '#### <number>' line, as GSM8K's own answers do."""
    return [1.0 if FINAL_LINE.search(_text(c)) else 0.0 for c in completions]


def brevity(prompts, completions, **columns) -> list[float | None]:
    """Shorter replies score higher, down to 0 at 2,000 characters; rows without a reference answer column
    (the `answer` of GSM8K) are not scored (None)."""
    answers = columns.get("answer") or [None] * len(completions)
    return [None if a is None else max(0.0, 1.0 - len(_text(c)) / 2000) for c, a in zip(completions, answers)]
