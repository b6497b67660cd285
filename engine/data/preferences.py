"""Preference pairs: (prompt, chosen, rejected) from the synthetic task or a chosen/rejected dataset.

Pairs are tokenized as consecutive examples [chosen, rejected], so a batch plan with ``group_size=2``
keeps each pair in one micro-batch.
"""

from __future__ import annotations

from typing import Any

from engine.data.chat import TokenizedExample, prompt_messages, tokenize_conversation
from engine.errors import DataError


def pair_messages(row: dict[str, Any], index: int, system_prompt: str | None) -> tuple[list, list]:
    """Chosen and rejected conversations of one row."""
    if "chosen" in row and "rejected" in row:
        chosen, rejected = row["chosen"], row["rejected"]
        if isinstance(chosen, list) and isinstance(rejected, list):
            return chosen, rejected
        context = prompt_messages(row["prompt"], system_prompt)
        return (
            context + [{"role": "assistant", "content": str(chosen)}],
            context + [{"role": "assistant", "content": str(rejected)}],
        )
    if "answer" in row and row.get("wrong_answers"):
        context = prompt_messages(row["prompt"], system_prompt)
        wrong = row["wrong_answers"][index % len(row["wrong_answers"])]
        return (
            context + [{"role": "assistant", "content": row["answer"]}],
            context + [{"role": "assistant", "content": wrong}],
        )
    raise DataError(f"row {index} has no preference pair ('chosen'/'rejected' or 'answer'/'wrong_answers')")


def pair_examples(
    tokenizer, rows: list[dict[str, Any]], max_len: int, system_prompt: str | None
) -> list[TokenizedExample]:
    examples = []
    for index, row in enumerate(rows):
        for messages in pair_messages(row, index, system_prompt):
            examples.append(tokenize_conversation(tokenizer, messages, max_len))
    return examples
