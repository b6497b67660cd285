"""Refit time: through Ray's object store, by our gloo broadcast, and a bare gloo broadcast of the same bytes.

    .venv/bin/python -m bench.refit        # writes its section of bench/RESULTS.md

For each model size one FSDP2 rank (configs/grpo_tiny.yaml's layout) refits one vLLM worker both ways, alternately,
each timed from the controller (gather, manifest check, transfer, the engine's reload). The baseline is two bare
Ray actors in the same placement that broadcast the same number of bytes in the same buckets over a gloo group:
the cost of the transfer alone.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from math import prod
from pathlib import Path

import ray
import torch

from bench.grpo_vs_trl import SIZES
from bench.results import write_section

ROUNDS = 5


class BareBroadcaster:
    """One end of a bare gloo broadcast: the baseline's sender (rank 0) or receiver."""

    def address(self) -> tuple[str, int]:
        from engine import cluster

        return cluster.rendezvous_point()

    def join(self, address: str, port: int, rank: int) -> None:
        from engine import weight_broadcast

        self.rank, self.group = rank, weight_broadcast.join(address, port, rank, 2)

    def broadcast(self, bucket_sizes: list[int]) -> float:
        buffers = [torch.ones(size) if self.rank == 0 else torch.empty(size) for size in bucket_sizes]
        started = time.perf_counter()
        for buffer in buffers:
            self.group.broadcast(buffer, 0).wait()
        return time.perf_counter() - started


def bare_broadcast_seconds(bucket_sizes: list[int]) -> float:
    actors = [ray.remote(num_cpus=1)(BareBroadcaster).remote() for _ in range(2)]
    try:
        address, port = ray.get(actors[0].address.remote())
        ray.get([actor.join.remote(address, port, rank) for rank, actor in enumerate(actors)])
        times = [max(ray.get([a.broadcast.remote(bucket_sizes) for a in actors])) for _ in range(ROUNDS)]
    finally:
        for actor in actors:
            ray.kill(actor)
    return statistics.median(times)


def bench_size(label: str, root: Path) -> dict:
    from engine.config import TinyModelConfig, load_config
    from engine.generation.group import GenerationGroup
    from engine.models.tiny import make_tiny_model
    from engine.policy.group import start_policy_group
    from engine.weight_broadcast import bucket_layout
    from engine.weight_sync import refit

    tiny, _ = SIZES[label]
    model_dir = make_tiny_model(root / label.split()[0], TinyModelConfig(**tiny))
    cfg = load_config("grpo_tiny")
    policy = start_policy_group(cfg, model_dir, cfg.grpo.optimizer, 10, pad_id=0)
    generation = GenerationGroup(cfg.generation, model_dir)
    seconds: dict[str, list[float]] = {"object_store": [], "collective": []}
    transfer: list[float] = []
    try:
        version = 0
        for _ in range(ROUNDS + 1):  # the first round forms the broadcast group: not timed
            for how in seconds:
                generation.cfg = cfg.generation.model_copy(update={"refit": how})
                version += 1
                metrics = refit(policy, generation, version)
                seconds[how].append(metrics["refit/seconds"])
                if how == "collective":
                    transfer.append(metrics["refit/transfer_seconds"])
                total_bytes = metrics["refit/bytes"]
        manifest = policy.stage_refit()
    finally:
        generation.shutdown()
        policy.shutdown()
    layout = bucket_layout(manifest, cfg.generation.refit_bucket_bytes)
    bucket_sizes = [sum(prod(manifest[i].shape) for i in bucket) for bucket in layout]
    return {
        "label": label,
        "mb": total_bytes / 1e6,
        "object_store": statistics.median(seconds["object_store"][1:]),
        "collective": statistics.median(seconds["collective"][1:]),
        "transfer": statistics.median(transfer[1:]),
        "bare": bare_broadcast_seconds(bucket_sizes),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | MB | refit by object store s | refit by collective s | collective / object store "
        "| its broadcast s | bare gloo broadcast s | broadcast / bare |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['mb']:.1f} | {r['object_store']:.3f} | {r['collective']:.3f} "
            f"| {r['collective'] / r['object_store']:.2f}x | {r['transfer']:.3f} | {r['bare']:.3f} "
            f"| {r['transfer'] / r['bare']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_size(label, Path(tmp)) for label in args.sizes]
    print(table(rows))
    machine = f"{platform.machine()}, {torch.get_num_threads()} cores, torch {torch.__version__}, fp32"
    notes = (
        f"\n\nMedian of {ROUNDS} refits each way, alternating, after one untimed round (which forms the broadcast "
        "group). A refit's time includes the FSDP2 gather of the full weights, the manifest check and vLLM's "
        "in-place reload; its broadcast is the receiver's time in the buckets' broadcasts alone; the bare broadcast "
        "is the same bytes in the same buckets between two plain Ray actors, buffers allocated beforehand."
    )
    write_section(
        "refit",
        "Refit: object store vs collective (gloo broadcast)",
        ".venv/bin/python -m bench.refit",
        machine,
        table(rows) + notes,
    )


if __name__ == "__main__":
    main()
