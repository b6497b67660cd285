"""Chat formatting through the tokenizer's own template, with a loss mask on assistant tokens only.

A conversation is rendered turn by turn: the tokens up to each assistant turn (with the generation
prompt) are the context, the tokens the turn adds are the target, trained up to and including eos.
Rendering through the template keeps training and generation on exactly the same token layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.errors import DataError

ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class TokenizedExample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target
    token_values: dict[str, list[float]] = field(default_factory=dict)  # per token, e.g. generation logprobs
    scalars: dict[str, float] = field(default_factory=dict)  # per sequence, e.g. advantage, reference logprob

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(self.loss_mask)


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for turn, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(f"{where}: message {turn} needs a role in {sorted(ROLES)} and a string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn to train on")
    return messages


def prompt_messages(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The token ids a generator is given: the conversation so far plus the assistant header."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def tokenize_conversation(tokenizer, messages: list[dict[str, str]], max_len: int) -> TokenizedExample:
    """Token ids and an assistant-only loss mask (each assistant turn up to and including eos)."""
    ids: list[int] = []
    mask: list[int] = []
    eos = tokenizer.eos_token_id
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context = _render(tokenizer, messages[:turn], add_generation_prompt=True)
        full = _render(tokenizer, messages[: turn + 1], add_generation_prompt=False)
        if full[: len(context)] != context or context[: len(ids)] != ids:
            raise DataError("the chat template does not render conversations as growing prefixes")
        target = full[len(context) :]
        trained = target.index(eos) + 1 if eos in target else len(target)
        mask += [0] * (len(context) - len(ids)) + [1] * trained + [0] * (len(target) - trained)
        ids = full
    return TokenizedExample(ids[:max_len], mask[:max_len])


def tokenize_observation(tokenizer, messages: list[dict[str, str]], observation: dict[str, str]) -> list[int]:
    """Tokens that follow a generated assistant turn (which ended with eos): the template's text after
    that eos, the observation turn, and the next assistant header."""
    before = tokenizer.apply_chat_template(messages, tokenize=False)
    after = tokenizer.apply_chat_template(messages + [observation], tokenize=False, add_generation_prompt=True)
    if not after.startswith(before):
        raise DataError("the chat template does not render conversations as growing prefixes")
    eos = tokenizer.eos_token
    between = before[before.rindex(eos) + len(eos) :] if eos in before else ""
    return tokenizer(between + after[len(before) :], add_special_tokens=False)["input_ids"]
