"""What a trainer worker offers its group (``engine.policy.group.PolicyGroup``), whatever its backend.

Controllers never call these by name: they go through the group, which plans batches, sums the ranks' shares
and picks the rank that answers (rank 0 for weights, the replicas' reporters for outputs)."""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from engine.data.batching import MicroBatch
from engine.weight_sync import WeightBuckets

# loss_fn(outputs, micro_batch, global normalizers) -> (loss, metric sums); outputs are token logprobs
# [B, L-1] of a causal LM or scores [B] of a reward model
LossFn = Callable[[torch.Tensor, MicroBatch, dict[str, float]], tuple[torch.Tensor, dict[str, float]]]


class PolicyWorker(Protocol):
    def rendezvous_address(self) -> tuple[str, int]: ...

    def init_distributed(self, address: str, port: int) -> None: ...

    def parallel_layout(self) -> dict[str, int | bool]: ...

    def train_step(
        self, micro_batches: list[MicroBatch], loss_fn: LossFn, normalizers: dict[str, float]
    ) -> dict[str, float]: ...

    def evaluate(
        self, micro_batches: list[MicroBatch], loss_fn: LossFn, normalizers: dict[str, float]
    ) -> dict[str, float]: ...

    def forward_only(self, micro_batches: list[MicroBatch], adapters: bool = True) -> list[torch.Tensor]: ...

    def save_checkpoint(self, directory: str) -> None: ...

    def load_checkpoint(self, directory: str) -> None: ...

    def export_hf(self, directory: str, dtype: str = "float32") -> None: ...

    def weight_buckets(self, bucket_bytes: int, adapters_only: bool = False) -> WeightBuckets | None: ...

    def info(self) -> dict[str, Any]: ...
