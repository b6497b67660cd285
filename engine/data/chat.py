"""Tokenization of prompts and responses, with a loss mask on the response tokens only.

A conversation goes through the tokenizer's own chat template, turn by turn: the tokens up to each assistant
turn (with the generation prompt) are the context, the tokens the turn adds are the target, trained up to and
including eos. Rendering through the template keeps training and generation on exactly the same token layout.
Plain-text data (TRL's non-conversational formats) is tokenized as it is: the prompt with the tokenizer's own
special tokens, the response after it, then eos.
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


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


Prompt = str | list[dict[str, str]]


def tokenize_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """The token ids a generator is given: the conversation so far plus the assistant header, or the text."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return _render(tokenizer, prompt, add_generation_prompt=True)


def tokenize_example(tokenizer, prompt: Prompt, completion: Prompt, max_len: int) -> TokenizedExample:
    """A prompt and its response (in the prompt's form) with the response's tokens as targets."""
    if isinstance(prompt, list) and isinstance(completion, list):
        return tokenize_conversation(tokenizer, prompt + completion, max_len)
    if not (isinstance(prompt, str) and isinstance(completion, str)):
        raise DataError("a prompt and its response must both be text or both conversations")
    context = tokenizer(prompt)["input_ids"]
    target = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return TokenizedExample((context + target)[:max_len], ([0] * len(context) + [1] * len(target))[:max_len])


def tokenize_text(tokenizer, text: str, max_len: int) -> TokenizedExample:
    """Language modeling: every token a target (the first has nothing to be predicted from), then eos."""
    ids = (tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])[:max_len]
    return TokenizedExample(ids, [0] + [1] * (len(ids) - 1))


def supervised_example(tokenizer, row: dict, max_len: int, where: str) -> TokenizedExample:
    """What SFT trains on in a normalized row (``engine.data.formats``)."""
    if "text" in row:
        return tokenize_text(tokenizer, row["text"], max_len)
    if "completion" not in row:
        raise DataError(
            f"{where} has a prompt but no response to imitate: SFT needs completions (stages.sft=false "
            "trains GRPO straight from the model)"
        )
    return tokenize_example(tokenizer, row["prompt"], row["completion"], max_len)


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
