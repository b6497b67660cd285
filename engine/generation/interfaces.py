"""What a generation backend offers a controller, whatever engine is behind it.

Prompts go in as token ids; completions come back with their token ids, the logprob of each sampled
token under the *current* weights (before temperature, as the trainer computes them) and a finish
reason. Weights are replaced in place through ``update_weights``: a manifest of (name, shape, dtype) is
checked against the engine's own parameters before any tensor touches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field


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


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


WeightManifest = list[TensorSpec]


def manifest_of(named: dict[str, torch.Tensor] | list[tuple[str, torch.Tensor]]) -> WeightManifest:
    items = named.items() if isinstance(named, dict) else named
    return [TensorSpec(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in items]


class WeightMismatch(ValueError):
    """A weight push that does not fit the engine; the engine keeps its previous weights."""


def check_manifest(incoming: WeightManifest, expected: dict[str, TensorSpec], aliases: set[str]) -> list[str]:
    """Names to load, after checking every expected tensor arrives with its shape (dtype is cast).

    ``aliases`` are names the engine ties to another tensor (e.g. ``lm_head.weight``): accepted, skipped.
    """
    by_name = {spec.name: spec for spec in incoming}
    unknown = sorted(set(by_name) - set(expected) - aliases)
    missing = sorted(set(expected) - set(by_name))
    if unknown:
        raise WeightMismatch(f"weight update has unknown tensors: {', '.join(unknown[:5])}")
    if missing:
        raise WeightMismatch(f"weight update is missing tensors: {', '.join(missing[:5])}")
    for name, spec in expected.items():
        got = by_name[name]
        if got.shape != spec.shape:
            raise WeightMismatch(f"weight update for {name} has shape {got.shape}, expected {spec.shape}")
        if not getattr(torch, got.dtype).is_floating_point:
            raise WeightMismatch(f"weight update for {name} has dtype {got.dtype}, expected a floating type")
    return [spec.name for spec in incoming if spec.name in expected]


def gather_checked(manifest: WeightManifest, buckets: list[Any], keep: list[str]) -> list[tuple[str, torch.Tensor]]:
    """Fetch every bucket (Ray object refs or plain lists of (name, tensor)) and check each tensor
    against the manifest, all before the engine is touched."""
    import ray

    specs = {spec.name: spec for spec in manifest}
    wanted = set(keep)
    named: list[tuple[str, torch.Tensor]] = []
    for bucket in buckets:
        for name, tensor in ray.get(bucket) if isinstance(bucket, ray.ObjectRef) else bucket:
            spec = specs.get(name)
            if spec is None or tuple(tensor.shape) != spec.shape:
                raise WeightMismatch(f"weight bucket tensor {name} does not match the announced manifest")
            if name in wanted:
                named.append((name, tensor))
    if len(named) != len(wanted):
        raise WeightMismatch("weight buckets did not deliver every tensor of the manifest")
    return named


class GenerationWorker(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]: ...

    def update_weights(self, manifest: WeightManifest, buckets: list[Any], version: int) -> dict[str, float]: ...

    def weight_version(self) -> int: ...

    def info(self) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...
