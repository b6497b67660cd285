"""What a generation backend offers a controller, whatever engine is behind it.

Prompts go in as token ids; completions come back with their token ids, the logprob of each sampled
token under the *current* weights (before temperature, as the trainer computes them) and a finish
reason. Weights are replaced in place through ``update_weights`` (``engine.weight_sync`` checks them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from engine.weight_sync import WeightManifest


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(1, gt=0, description="samples per prompt")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off")
    max_tokens: int = Field(16, gt=0)
    stop: list[str] = Field(default_factory=list, description="stop strings, kept in the output")
    stop_token_ids: list[int] = Field(default_factory=list)
    seed: int | None = None


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (eos, stop token or stop string) or "length"
    text: str


class GenerationWorker(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]: ...

    def update_weights(self, manifest: WeightManifest, buckets: list[Any], version: int) -> dict[str, float]: ...

    def weight_version(self) -> int: ...

    def info(self) -> dict[str, Any]: ...
