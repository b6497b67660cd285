"""TRL's standard dataset formats, detected from a dataset's columns, and posttrain's normalized row.

A dataset is in one format, read off its column names (after the ``data.*_field`` mapping), in this order:

    preference          chosen + rejected, with an explicit ``prompt`` or an implicit one (their shared prefix)
    prompt-completion   prompt + completion (``response_field``; GSM8K: question + answer)
    prompt-only         prompt (RL needs nothing else: reward functions and verifiers score the samples)
    conversational LM   messages (the prompt is everything before the first assistant turn)
    language modeling   text

each in plain-text form (strings) or conversational form (lists of {role, content}); ``data.as_chat`` turns
plain-text prompts and responses into a user and an assistant turn, for instruct models' chat templates. Every
row becomes one normalized row:

    prompt      str | list[Message]   what a generator is given (a system prompt, if set, opens conversations)
    completion  str | list[Message]   what SFT imitates (may hold several turns: tool calls and their answers)
    chosen, rejected                  preference completions, in the prompt's form
    text        str                   language-modeling rows only
    answer      str                   the reference answer verifiers compare with (``answer_field`` /
                                      ``answer_pattern``; default: the response of prompt-completion and
                                      conversational rows)
    task        str                   which environment scores the row (default: ``grpo.environment``)
    columns     dict                  the source's other columns, handed to reward functions as TRL does
"""

from __future__ import annotations

import json
import re
from typing import Any

from engine.config import DataConfig
from engine.data.chat import ROLES, validate_messages
from engine.errors import DataError

Message = dict[str, str]
FORMATS = ("preference", "prompt-completion", "prompt-only", "conversational", "language-modeling")
# columns that become the normalized row itself; everything else is passed on under "columns"
_STRUCTURAL = ("text_field", "messages_field", "prompt_field", "chosen_field", "rejected_field")


def detect_format(columns: list[str], cfg: DataConfig, label: str) -> str:
    present = set(columns)
    if cfg.chosen_field in present and cfg.rejected_field in present:
        return "preference"
    if cfg.prompt_field in present:
        return "prompt-completion" if cfg.response_field in present else "prompt-only"
    if cfg.messages_field in present:
        return "conversational"
    if cfg.text_field in present:
        return "language-modeling"
    wanted = (
        f"'{cfg.chosen_field}' + '{cfg.rejected_field}', '{cfg.prompt_field}' [+ '{cfg.response_field}'], "
        f"'{cfg.messages_field}' or '{cfg.text_field}'"
    )
    raise DataError(
        f"dataset {label} has columns {sorted(present)} but none of TRL's formats: it needs {wanted} "
        "(map other names with data.prompt_field, data.response_field, ...)"
    )


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _turns(value: Any, where: str, field: str) -> list[Message]:
    if not _is_conversation(value):
        raise DataError(f"{where}: '{field}' must be a list of {{role, content}} messages")
    for turn, message in enumerate(value):
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: '{field}' message {turn} needs a role in {sorted(ROLES)} and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(value: Any, where: str, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: '{field}' must be text (or a conversation), got {type(value).__name__}")
    return str(value)


def _prompt(value: Any, cfg: DataConfig, where: str, field: str) -> str | list[Message]:
    if not _is_conversation(value):
        text = _text(value, where, field)
        if not cfg.as_chat:
            if cfg.system_prompt:
                raise DataError(f"{where}: data.system_prompt needs conversational prompts: set data.as_chat=true")
            return text
        value = [{"role": "user", "content": text}]
    prompt = _turns(value, where, field)
    if cfg.system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": cfg.system_prompt}] + prompt
    return prompt


def _completion(value: Any, conversational: bool, where: str, field: str) -> str | list[Message]:
    """A response in the prompt's form: a conversational prompt takes a plain answer as one assistant turn."""
    if _is_conversation(value):
        if not conversational:
            raise DataError(f"{where}: '{field}' is a conversation but the prompt is plain text")
        return _turns(value, where, field)
    text = _text(value, where, field)
    return [{"role": "assistant", "content": text}] if conversational else text


def split_at_first_reply(messages: list[Message], where: str) -> tuple[list[Message], list[Message]]:
    """(prompt, completion) of a conversation: the completion starts at the first assistant turn."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None:
        raise DataError(f"{where}: the conversation has no assistant turn to train on")
    if first == 0:
        raise DataError(f"{where}: the conversation starts with an assistant turn: there is no prompt")
    return messages[:first], messages[first:]


def _shared_prefix(chosen: Any, rejected: Any, where: str) -> tuple[Any, Any, Any]:
    """TRL's implicit prompt: the longest common prefix of the two responses (whole messages, or characters)."""
    conversations = _is_conversation(chosen) and _is_conversation(rejected)
    if not conversations and not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise DataError(f"{where}: 'chosen' and 'rejected' must both be text or both conversations")
    size = 0
    while size < min(len(chosen), len(rejected)) and chosen[size] == rejected[size]:
        size += 1
    while conversations and size and chosen[size - 1]["role"] == "assistant":  # responses start at a reply
        size -= 1
    if size == 0:
        raise DataError(f"{where}: 'chosen' and 'rejected' share no prompt (and there is no 'prompt' column)")
    return chosen[:size], chosen[size:], rejected[size:]


def _completion_text(completion: str | list[Message]) -> str:
    if isinstance(completion, str):
        return completion
    replies = [m["content"] for m in completion if m["role"] == "assistant"]
    return replies[-1] if replies else ""


def reference_answer(source: str, cfg: DataConfig, where: str) -> str:
    if cfg.answer_pattern is None:
        return source.strip()
    match = re.search(cfg.answer_pattern, source)
    if match is None:
        raise DataError(f"{where}: data.answer_pattern {cfg.answer_pattern!r} does not match {source[-80:]!r}")
    return (match.group(1) if match.groups() else match.group(0)).strip()


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def _field(row: dict[str, Any], name: str, where: str) -> Any:
    value = row.get(name)
    if value is None or value == "" or value == []:
        raise DataError(f"{where}: '{name}' is missing or empty")
    return value


def normalize_row(row: dict[str, Any], kind: str, cfg: DataConfig, where: str) -> dict[str, Any]:
    """One source row in the normalized form (see the module docstring)."""
    out: dict[str, Any] = {}
    if kind == "language-modeling":
        out["text"] = _text(_field(row, cfg.text_field, where), where, cfg.text_field)
    elif kind == "conversational":
        messages = _turns(_field(row, cfg.messages_field, where), where, cfg.messages_field)
        prompt, completion = split_at_first_reply(validate_messages(messages, where), where)
        out["prompt"], out["completion"] = _prompt(prompt, cfg, where, cfg.messages_field), completion
    elif kind == "preference":
        chosen, rejected = _field(row, cfg.chosen_field, where), _field(row, cfg.rejected_field, where)
        prompt = row.get(cfg.prompt_field)
        if prompt is None or _is_conversation(prompt) != _is_conversation(chosen):
            # TRL: a prompt of another form than the responses (UltraFeedback's text prompt beside full chats)
            # is the responses' shared prefix
            prompt, chosen, rejected = _shared_prefix(chosen, rejected, where)
        out["prompt"] = _prompt(prompt, cfg, where, cfg.prompt_field)
        conversational = isinstance(out["prompt"], list)
        out["chosen"] = _completion(chosen, conversational, where, cfg.chosen_field)
        out["rejected"] = _completion(rejected, conversational, where, cfg.rejected_field)
        out["completion"] = out["chosen"]  # what SFT imitates on a preference dataset
    else:
        out["prompt"] = _prompt(_field(row, cfg.prompt_field, where), cfg, where, cfg.prompt_field)
        if kind == "prompt-completion":
            conversational = isinstance(out["prompt"], list)
            response = _field(row, cfg.response_field, where)
            out["completion"] = _completion(response, conversational, where, cfg.response_field)

    if cfg.answer_field is not None:
        if row.get(cfg.answer_field) is None:
            raise DataError(f"{where}: no '{cfg.answer_field}' column for the reference answer (data.answer_field)")
        out["answer"] = reference_answer(_text(row[cfg.answer_field], where, cfg.answer_field), cfg, where)
    elif kind in ("prompt-completion", "conversational"):  # a preference pair's chosen reply is no reference
        out["answer"] = reference_answer(_completion_text(out["completion"]), cfg, where)
    if row.get(cfg.task_field) is not None:
        out["task"] = _text(row[cfg.task_field], where, cfg.task_field)
    structural = {getattr(cfg, name) for name in _STRUCTURAL}  # large, and already in the row's own form
    out["columns"] = {key: _jsonable(value) for key, value in row.items() if key not in structural}
    return out
