"""Refit over a collective: the trainer's rank 0 broadcasts its weights to every generation worker.

The trainer's rank 0 (the one that gathers the full weights) and the generation workers form their own gloo group,
apart from the trainers' own, once per set of workers. A refit then runs in three moves, each driven by the
controller: the trainer stages its weights and announces their manifest; every generation worker checks that
manifest (names, shapes, float dtypes) against its engine; only then are the buckets broadcast, contiguous
buffers of consecutive same-dtype tensors laid out by ``bucket_layout`` on both sides from the manifest alone.
A refused manifest moves no tensor and leaves the engine on its previous weights.

No Ray here: workers mix in the sender or receiver side, and ``engine.weight_sync.refit`` drives them.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from engine.weight_sync import WeightManifest, check_manifest, manifest_of

TIMEOUT = timedelta(minutes=10)  # a broadcast waits this long for a peer that died before failing the refit


def join(address: str, port: int, rank: int, world_size: int) -> dist.ProcessGroup:
    """A gloo group of its own (not the process's default group, which a trainer already uses): rank 0 hosts the
    rendezvous store at ``address:port``; every member blocks here until all have joined."""
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=TIMEOUT)
    return dist.ProcessGroupGloo(store, rank, world_size, TIMEOUT)


def bucket_layout(manifest: WeightManifest, bucket_bytes: int) -> list[list[int]]:
    """Manifest positions per bucket: consecutive tensors of one dtype, a new bucket past ``bucket_bytes``."""
    buckets: list[list[int]] = []
    size, dtype = 0, None
    for position, spec in enumerate(manifest):
        nbytes = math.prod(spec.shape) * getattr(torch, spec.dtype).itemsize
        if not buckets or spec.dtype != dtype or size >= bucket_bytes:
            buckets.append([])
            size, dtype = 0, spec.dtype
        buckets[-1].append(position)
        size += nbytes
    return buckets


class RefitSender:
    """The trainer side, mixed into a trainer worker that has ``rank`` and ``refit_weights()`` (rank 0: the full
    weights on CPU; other ranks: None, after taking part in the gather)."""

    rank: int
    _refit_group: dist.ProcessGroup | None = None
    _staged: dict[str, torch.Tensor] | None = None

    def join_refit_group(self, address: str, port: int, world_size: int) -> None:
        self._refit_group = join(address, port, 0, world_size)

    def stage_refit(self) -> WeightManifest | None:
        """Gather the current weights (every rank takes part); rank 0 keeps them and returns their manifest."""
        self._staged = self.refit_weights()  # type: ignore[attr-defined]
        return manifest_of(self._staged) if self._staged is not None else None

    def send_refit(self, bucket_bytes: int) -> int:
        """Broadcast the staged weights bucket by bucket; returns the bytes sent."""
        if self._refit_group is None or self._staged is None:
            raise RuntimeError("send_refit needs join_refit_group and stage_refit first")
        weights, self._staged = self._staged, None
        manifest = manifest_of(weights)
        sent = 0
        for bucket in bucket_layout(manifest, bucket_bytes):
            flat = torch.cat([weights[manifest[i].name].reshape(-1) for i in bucket])
            self._refit_group.broadcast(flat, 0).wait()
            sent += flat.numel() * flat.element_size()
        return sent


class RefitReceiver:
    """The generation side, mixed into a generation worker that has ``expected`` (its engine's TensorSpecs by
    name), ``aliases`` (tied names it skips) and ``load_weights(named, version)``."""

    expected: dict[str, Any]
    aliases: set[str]
    _refit_group: dist.ProcessGroup | None = None

    def join_refit_group(self, address: str, port: int, rank: int, world_size: int) -> None:
        self._refit_group = join(address, port, rank, world_size)

    def check_refit(self, manifest: WeightManifest) -> None:
        """Raise ``WeightMismatch`` (before anything is sent) if the announced weights do not fit the engine."""
        check_manifest(manifest, self.expected, self.aliases)

    def receive_refit(self, manifest: WeightManifest, bucket_bytes: int, version: int) -> dict[str, float]:
        """Take part in every bucket's broadcast, then load the weights the engine has (``check_refit`` passed)."""
        if self._refit_group is None:
            raise RuntimeError("receive_refit needs join_refit_group first")
        keep = set(check_manifest(manifest, self.expected, self.aliases))
        started = time.perf_counter()
        named: list[tuple[str, torch.Tensor]] = []
        for bucket in bucket_layout(manifest, bucket_bytes):
            specs = [manifest[i] for i in bucket]
            flat = torch.empty(sum(math.prod(s.shape) for s in specs), dtype=getattr(torch, specs[0].dtype))
            self._refit_group.broadcast(flat, 0).wait()
            offset = 0
            for spec in specs:
                count = math.prod(spec.shape)
                if spec.name in keep:
                    named.append((spec.name, flat[offset : offset + count].view(spec.shape)))
                offset += count
        transfer_seconds = time.perf_counter() - started
        return {**self.load_weights(named, version), "transfer_seconds": transfer_seconds}  # type: ignore[attr-defined]
