"""The controller's handle on a trainer worker group: plan a step, run it on every rank, sum the shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from engine import cluster
from engine.config import OptimizerConfig, PipelineConfig
from engine.data.batching import MicroBatch, plan_step
from engine.data.chat import TokenizedExample

PER_RANK_VALUES = ("grad_norm", "lr")  # the same on every rank: taken from the first reporter, not summed


@dataclass
class PolicyGroup:
    """Every loss gets the step's global normalizers: ``tokens`` (targets), ``sequences`` (with at least
    one target) and ``units`` (e.g. preference pairs).

    A step is planned per data-parallel replica; every rank of a replica (Megatron's tensor ranks and
    pipeline stages) gets the replica's micro-batches, and only its reporting rank's results are counted."""

    group: cluster.WorkerGroup
    virtual: cluster.VirtualCluster
    replica_of_rank: list[int]
    reporting_ranks: list[int]
    token_budget: int
    pad_id: int

    def _plans(self, examples: list[TokenizedExample], group_size: int) -> tuple[list[list[MicroBatch]], dict]:
        replicas = len(self.reporting_ranks)
        plans, tokens = plan_step(examples, replicas, self.token_budget, self.pad_id, group_size)
        sequences = sum(1 for e in examples if any(e.loss_mask[1:]))
        per_rank = [plans[replica] for replica in self.replica_of_rank]
        return per_rank, {"tokens": float(tokens), "sequences": float(sequences), "units": len(examples) / group_size}

    def _run(self, method: str, examples, loss_fn: Callable, group_size: int) -> dict[str, float]:
        plans, normalizers = self._plans(examples, group_size)
        all_results = self.group.call_per_rank(method, [(plan, loss_fn, normalizers) for plan in plans])
        results = [all_results[rank] for rank in self.reporting_ranks]
        summed = {key: sum(r[key] for r in results) for key in results[0] if key not in PER_RANK_VALUES}
        summed["loss"] = summed.pop("loss_share")
        summed.update({key: results[0][key] for key in PER_RANK_VALUES if key in results[0]})
        return {**summed, **{f"normalizer_{k}": v for k, v in normalizers.items()}}

    def train(self, examples: list[TokenizedExample], loss_fn: Callable, group_size: int = 1) -> dict[str, float]:
        """One optimizer step; returns the loss, summed metrics, grad norm and learning rate."""
        return self._run("train_step", examples, loss_fn, group_size)

    def evaluate(self, examples: list[TokenizedExample], loss_fn: Callable, group_size: int = 1) -> dict[str, float]:
        return self._run("evaluate", examples, loss_fn, group_size)

    def forward(self, examples: list[TokenizedExample]) -> list[torch.Tensor]:
        """Per-example outputs in the order given: token logprobs [len-1] (causal LM) or a score (reward)."""
        plans, _ = self._plans(examples, 1)
        outputs = self.group.call_per_rank("forward_only", [(plan,) for plan in plans])
        ordered: list[torch.Tensor | None] = [None] * len(examples)
        for rank in self.reporting_ranks:
            plan, rank_outputs = plans[rank], outputs[rank]
            for batch, output in zip(plan, rank_outputs):
                for row, index in enumerate(batch["index"].tolist()):
                    if index >= 0:
                        value = output[row]
                        ordered[index] = value if value.dim() == 0 else value[: len(examples[index]) - 1]
        return ordered  # type: ignore[return-value]

    def shutdown(self) -> None:
        self.group.shutdown()
        self.virtual.release()


def start_policy_group(
    cfg: PipelineConfig,
    model_dir: Path,
    optimizer: OptimizerConfig,
    total_steps: int,
    pad_id: int,
    model_kind: str = "causal_lm",
) -> PolicyGroup:
    if cfg.policy.backend == "megatron":  # one config error here rather than one per rank from the actors
        from transformers import AutoConfig

        from engine.models import megatron_convert

        layout = cfg.policy.megatron
        shape = megatron_convert.shape_of(AutoConfig.from_pretrained(model_dir))
        megatron_convert.check_parallel_sizes(shape, layout.tensor_parallel, layout.pipeline_parallel)
    cluster.connect(cfg.ray)
    world_size = cfg.policy.world_size
    gpus = 1.0 if torch.cuda.is_available() else 0.0
    virtual = cluster.VirtualCluster(world_size, cpus_per_bundle=1.0, gpus_per_bundle=gpus)
    group = cluster.WorkerGroup(
        _worker_class(cfg.policy.backend),
        virtual,
        world_size,
        init_kwargs={
            "model_path": str(model_dir),
            "policy": cfg.policy.model_dump(mode="json"),
            "optimizer": optimizer.model_dump(mode="json"),
            "total_steps": total_steps,
            "seed": cfg.seed,
            "model_kind": model_kind,
        },
    )
    layouts = group.call("parallel_layout")
    replica_of_rank = [layout["dp_rank"] for layout in layouts]
    reporting_ranks = sorted(
        (rank for rank, layout in enumerate(layouts) if layout["reports"]), key=lambda rank: replica_of_rank[rank]
    )
    return PolicyGroup(group, virtual, replica_of_rank, reporting_ranks, cfg.policy.micro_batch_tokens, pad_id)


def _worker_class(backend: str) -> type:
    if backend == "megatron":
        from engine.policy.megatron import MegatronPolicyWorker

        return MegatronPolicyWorker
    from engine.policy.fsdp2 import FSDP2PolicyWorker

    return FSDP2PolicyWorker
