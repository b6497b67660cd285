"""Preference pairs (prompt, chosen, rejected) from normalized rows (``engine.data.formats``).

Pairs are tokenized as consecutive examples [chosen, rejected], so a batch plan with ``group_size=2``
keeps each pair in one micro-batch.
"""

from __future__ import annotations

from typing import Any

from engine.data.chat import TokenizedExample, tokenize_example
from engine.errors import DataError


def pair_examples(tokenizer, rows: list[dict[str, Any]], max_len: int, split: str) -> list[TokenizedExample]:
    examples = []
    for index, row in enumerate(rows):
        if "chosen" not in row or "rejected" not in row:
            raise DataError(
                f"{split} row {index} has no preference pair: the reward-model and DPO stages need 'chosen' and "
                "'rejected' columns (data.chosen_field, data.rejected_field)"
            )
        for response in (row["chosen"], row["rejected"]):
            examples.append(tokenize_example(tokenizer, row["prompt"], response, max_len))
    return examples
