"""Weight sync between trainers and generators: buckets, the manifest check, and the refit itself.

A neutral module: trainer workers import it to hand out their weights, generation workers to check and load
what arrives, and controllers to run a refit; neither side imports the other. A refit takes the trainer's full
state dict from one rank as buckets in the Ray object store (never through the driver), announces its manifest
of (name, shape, dtype), and every generation worker checks that manifest against its own parameters, then every
bucket's tensors against the manifest, before anything touches its engine: a failed load can leave an engine
broken, a refused one keeps serving its previous weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from engine.models.lora import PEFT_PREFIX  # adapters arrive under peft's names: <prefix><module>.lora_A.weight

if TYPE_CHECKING:
    from engine.generation.group import GenerationGroup


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


WeightManifest = list[TensorSpec]
# what a trainer hands out for a refit: (manifest, bucket refs, total bytes)
WeightBuckets = tuple[WeightManifest, list[Any], int]


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


def check_adapter_manifest(incoming: WeightManifest, expected: dict[str, TensorSpec]) -> tuple[int, list[str]]:
    """The rank and the adapted modules of an adapter push, after checking that every tensor adapts a weight the
    engine has, each module gets both A [r, in] and B [out, r] with that weight's shape, at one rank."""
    parts: dict[str, dict[str, TensorSpec]] = {}
    for spec in incoming:
        module, _, part = spec.name.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not spec.name.startswith(PEFT_PREFIX) or part not in ("A.weight", "B.weight"):
            raise WeightMismatch(f"adapter update has a tensor that is not a LoRA matrix: {spec.name}")
        if f"{module}.weight" not in expected:
            raise WeightMismatch(f"adapter update adapts {module}, which the model does not have")
        parts.setdefault(module, {})[part[0]] = spec
    if not parts:
        raise WeightMismatch("adapter update holds no tensors")
    ranks = set()
    for module, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise WeightMismatch(f"adapter update for {module} lacks lora_{'B' if 'A' in pair else 'A'}")
        out_features, in_features = expected[f"{module}.weight"].shape
        rank = pair["A"].shape[0]
        if pair["A"].shape != (rank, in_features) or pair["B"].shape != (out_features, rank):
            raise WeightMismatch(
                f"adapter update for {module} has shapes {pair['A'].shape} and {pair['B'].shape}, "
                f"expected ({rank}, {in_features}) and ({out_features}, {rank})"
            )
        ranks.add(rank)
    if len(ranks) != 1:
        raise WeightMismatch(f"adapter update mixes ranks {sorted(ranks)}")
    return ranks.pop(), sorted(parts)


def gather_checked(manifest: WeightManifest, buckets: list[Any], keep: list[str]) -> list[tuple[str, torch.Tensor]]:
    """Fetch every bucket (Ray object refs or plain lists of (name, tensor)) and check each tensor
    against the manifest, all before the engine is touched. Plain lists need no Ray."""
    specs = {spec.name: spec for spec in manifest}
    wanted = set(keep)
    named: list[tuple[str, torch.Tensor]] = []
    for bucket in buckets:
        if not isinstance(bucket, list):
            import ray

            bucket = ray.get(bucket)
        for name, tensor in bucket:
            spec = specs.get(name)
            if spec is None or tuple(tensor.shape) != spec.shape:
                raise WeightMismatch(f"weight bucket tensor {name} does not match the announced manifest")
            if name in wanted:
                named.append((name, tensor))
    if len(named) != len(wanted):
        raise WeightMismatch("weight buckets did not deliver every tensor of the manifest")
    return named


def put_weight_buckets(state: dict[str, torch.Tensor], bucket_bytes: int) -> WeightBuckets:
    """Full weights as Ray object-store buckets of about ``bucket_bytes`` each."""
    import ray

    buckets, current, size, total = [], [], 0, 0
    for name, tensor in state.items():
        current.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            buckets.append(ray.put(current))
            total, current, size = total + size, [], 0
    if current:
        buckets.append(ray.put(current))
        total += size
    return manifest_of(state), buckets, total


class RefitSource(Protocol):
    """What a refit needs of a trainer group (``engine.policy.group.PolicyGroup``)."""

    def weight_buckets(self, bucket_bytes: int, adapters_only: bool = False) -> WeightBuckets: ...

    def refit_sender_address(self) -> tuple[str, int]: ...

    def join_refit_group(self, address: str, port: int, world_size: int) -> list[Any]: ...

    def stage_refit(self) -> WeightManifest: ...

    def send_refit(self, bucket_bytes: int) -> list[Any]: ...


def refit(source: RefitSource, generation: "GenerationGroup", version: int) -> dict[str, float]:
    """Push the trainer's current weights into every generation worker (a generator that applies LoRA adapters
    itself gets the adapters alone); returns refit/* metrics."""
    started = time.perf_counter()
    bucket_bytes = generation.cfg.refit_bucket_bytes
    extra: dict[str, float] = {}
    if generation.applies_adapters:
        manifest, buckets, total_bytes = source.weight_buckets(bucket_bytes, adapters_only=True)
        generation.update_adapters(manifest, buckets, version)
    elif generation.cfg.refit == "collective":
        total_bytes, extra["refit/transfer_seconds"] = _broadcast_refit(source, generation, version)
    else:
        manifest, buckets, total_bytes = source.weight_buckets(bucket_bytes)
        generation.update_weights(manifest, buckets, version)
    return {"refit/seconds": time.perf_counter() - started, "refit/bytes": float(total_bytes), **extra}


def _broadcast_refit(source: RefitSource, generation: "GenerationGroup", version: int) -> tuple[int, float]:
    """``engine.weight_broadcast``'s three moves: stage and announce, check everywhere, broadcast. The refit group
    is formed on first use and again after the generation workers were restarted. Returns the bytes sent and the
    slowest receiver's transfer time (the broadcast alone, without the gather or the engine's reload)."""
    import ray

    if generation.refit_sender is not source:
        address, port = source.refit_sender_address()
        ray.get(
            source.join_refit_group(address, port, len(generation.workers) + 1)
            + generation.join_refit_group(address, port)
        )
        generation.refit_sender = source
    manifest = source.stage_refit()
    generation.check_refit(manifest)  # a WeightMismatch here: nothing sent, every engine on its previous weights
    bucket_bytes = generation.cfg.refit_bucket_bytes
    sent = source.send_refit(bucket_bytes)
    received = generation.receive_refit(manifest, bucket_bytes, version)
    sent_bytes, *loaded = ray.get(sent + received)
    return sent_bytes, max(result["transfer_seconds"] for result in loaded)


def load_saved_weights(generation: "GenerationGroup", model_dir: Path, version: int) -> None:
    """Swap a saved Hugging Face model's weights into the running engines, as a refit does: one engine serves
    several checkpoints of one architecture without a restart (the update checks every name and shape)."""
    from engine.models.loading import load_hf_folder

    _, state = load_hf_folder(model_dir)
    manifest, buckets, _ = put_weight_buckets(state, generation.cfg.refit_bucket_bytes)
    generation.update_weights(manifest, buckets, version)
