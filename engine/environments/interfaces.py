"""The environment interface: a batch of conversations in, the next observations and rewards out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

Message = dict[str, str]


@dataclass
class EnvStepResult:
    observations: list[Message | None]  # the next user/tool turn, or None when the episode ended
    rewards: list[float]
    terminated: list[bool]
    next_stop_strings: list[list[str] | None]
    metadata: list[dict[str, Any]] = field(default_factory=list)


class Environment(Protocol):
    def step(self, message_logs: list[list[Message]], metadata: list[dict[str, Any]]) -> EnvStepResult: ...
