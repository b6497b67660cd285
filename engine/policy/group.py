"""The controller's one handle on a trainer worker group: every trainer role (policy, reward model, DPO
model) and every frozen role (reference, teacher, scorer) is reached through a ``PolicyGroup``.

A step is planned here (dynamic batching, global normalizers), run on every rank, and the ranks' shares summed;
checkpoints, exports and refit weights go through the same methods, so no controller names a worker method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from engine import cluster
from engine.config import LoraConfig, OptimizerConfig, PipelineConfig
from engine.data.batching import MicroBatch, plan_step
from engine.data.chat import TokenizedExample
from engine.models.loading import ModelSource, folders_for_workers, local_folder
from engine.policy.shards import ShardSource, ShardTarget
from engine.storage import ManifestEntry
from engine.weight_sync import WeightBuckets, WeightManifest

PER_RANK_VALUES = ("grad_norm", "lr")  # the same on every rank: taken from the first reporter, not summed


@dataclass
class PolicyGroup:
    """Every loss gets the step's global normalizers: ``tokens`` (targets), ``sequences`` (with at least
    one target), ``units`` (e.g. preference pairs) and ``leading_tokens`` (the targets of each unit's first
    example: the chosen responses of [chosen, rejected] pairs).

    A step is planned per data-parallel replica; every rank of a replica (Megatron's tensor ranks and
    pipeline stages) gets the replica's micro-batches, and only its reporting rank's results are counted.
    A group started without an optimizer (``trainable=False``) holds a frozen model: forward passes only."""

    workers: cluster.WorkerGroup
    virtual: cluster.VirtualCluster
    replica_of_rank: list[int]
    reporting_ranks: list[int]
    token_budget: int
    pad_id: int
    trainable: bool = True
    sequence_packing: bool = False

    def _plans(self, examples: list[TokenizedExample], group_size: int) -> tuple[list[list[MicroBatch]], dict]:
        replicas = len(self.reporting_ranks)
        plans, tokens = plan_step(
            examples, replicas, self.token_budget, self.pad_id, group_size, packing=self.sequence_packing
        )
        sequences = sum(1 for e in examples if any(e.loss_mask[1:]))
        leading = sum(sum(e.loss_mask[1:]) for e in examples[::group_size])
        per_rank = [plans[replica] for replica in self.replica_of_rank]
        normalizers = {"tokens": float(tokens), "sequences": float(sequences), "units": len(examples) / group_size}
        return per_rank, {**normalizers, "leading_tokens": float(leading)}

    def _run(self, method: str, examples, loss_fn: Callable, group_size: int) -> dict[str, float]:
        plans, normalizers = self._plans(examples, group_size)
        all_results = self.workers.call_per_rank(method, [(plan, loss_fn, normalizers) for plan in plans])
        results = [all_results[rank] for rank in self.reporting_ranks]
        summed = {key: sum(r[key] for r in results) for key in results[0] if key not in PER_RANK_VALUES}
        summed["loss"] = summed.pop("loss_share")
        summed.update({key: results[0][key] for key in PER_RANK_VALUES if key in results[0]})
        return {**summed, **{f"normalizer_{k}": v for k, v in normalizers.items()}}

    def train(self, examples: list[TokenizedExample], loss_fn: Callable, group_size: int = 1) -> dict[str, float]:
        """One optimizer step; returns the loss, summed metrics, grad norm and learning rate."""
        if not self.trainable:
            raise RuntimeError("a frozen model group (started without an optimizer) cannot train")
        return self._run("train_step", examples, loss_fn, group_size)

    def evaluate(self, examples: list[TokenizedExample], loss_fn: Callable, group_size: int = 1) -> dict[str, float]:
        return self._run("evaluate", examples, loss_fn, group_size)

    def forward(self, examples: list[TokenizedExample], adapters: bool = True) -> list[torch.Tensor]:
        """Per-example outputs in the order given. A causal LM gives token logprobs aligned to the input ids:
        ``out[t]`` is log p(input_ids[t] | input_ids[:t]), [len], with ``out[0] = 0`` (nothing predicts the first
        token); a reward model gives one score per example. ``adapters=False``: a LoRA group's base model."""
        plans, _ = self._plans(examples, 1)
        outputs = self.workers.call_per_rank("forward_only", [(plan, adapters) for plan in plans])
        ordered: list[torch.Tensor | None] = [None] * len(examples)
        for rank in self.reporting_ranks:
            for batch, output in zip(plans[rank], outputs[rank]):
                for row, index in enumerate(batch["index"].tolist()):
                    if index >= 0:
                        value = output[row]
                        if value.dim():  # the worker's [L-1] next-token logprobs, shifted onto the input ids
                            value = torch.cat([value.new_zeros(1), value[: len(examples[index]) - 1]])
                        ordered[index] = value
        return ordered  # type: ignore[return-value]

    def save_checkpoint(self, target: ShardTarget) -> list[ManifestEntry]:
        """Every rank writes its model and optimizer shards, RNG and scheduler state and uploads them into
        ``target`` from its own node; returns their manifest entries (the caller commits)."""
        return [entry for entries in self.workers.call("save_checkpoint_to", target) for entry in entries]

    def load_checkpoint(self, source: ShardSource) -> None:
        """Every rank reads the committed checkpoint ``source`` from the store onto its own node."""
        self.workers.call("load_checkpoint_from", source)

    def export(self, target: ShardTarget, dtype: str = "float32") -> list[ManifestEntry]:
        """Full Hugging Face weights (in ``dtype``) and config, no tokenizer, uploaded into ``target``; LoRA
        adapters merged in (and saved alone under ``adapter/`` with ``lora.export_adapter``). Returns the files'
        manifest entries (the caller commits)."""
        return [entry for entries in self.workers.call("export_to", target, dtype) for entry in entries]

    def weight_buckets(self, bucket_bytes: int, adapters_only: bool = False) -> WeightBuckets:
        """The current full weights (or a LoRA model's adapters alone) as object-store buckets, for a refit
        (gathered by every rank)."""
        results = self.workers.call("weight_buckets", bucket_bytes, adapters_only)
        return next(result for result in results if result is not None)

    def refit_sender_address(self) -> tuple[str, int]:
        """Where the rank that gathers the full weights hosts a refit group's rendezvous (its node, a free port)."""
        return self.workers.call_on([0], "rendezvous_address")[0]

    def join_refit_group(self, address: str, port: int, world_size: int) -> list[Any]:
        """Rank 0 joins a refit group as its sender; returns the pending call (the receivers join alongside)."""
        return self.workers.submit_on([0], "join_refit_group", address, port, world_size)

    def stage_refit(self) -> WeightManifest:
        """Gather the current full weights (LoRA merged in) onto rank 0, to send; returns their manifest."""
        return next(m for m in self.workers.call("stage_refit") if m is not None)

    def send_refit(self, bucket_bytes: int) -> list[Any]:
        """Rank 0 broadcasts the staged weights; returns the pending call (its result: the bytes sent)."""
        return self.workers.submit_on([0], "send_refit", bucket_bytes)

    def info(self) -> list[dict[str, Any]]:
        return self.workers.call("info")

    def start_profile(self, ranks: Sequence[int]) -> None:
        """The listed ranks (those this group has) start a torch profiler trace."""
        self.workers.call_on(self._ranks(ranks), "start_profile")

    def stop_profile(self, ranks: Sequence[int]) -> dict[int, bytes]:
        """Each listed rank's trace since ``start_profile`` (gzipped Chrome trace JSON), by rank."""
        ranks = self._ranks(ranks)
        return dict(zip(ranks, self.workers.call_on(ranks, "stop_profile")))

    def _ranks(self, ranks: Sequence[int]) -> list[int]:
        return [rank for rank in ranks if rank < self.workers.world_size]

    def parameter_counts(self) -> dict[str, int]:
        """The model's total and trainable parameters (LoRA: the adapters, and a reward model's new head)."""
        first = self.info()[0]
        return {"model/parameters": first["parameters"], "model/trainable_parameters": first["trainable_parameters"]}

    def base_model(self) -> "BaseModelView":
        """The frozen base under this group's LoRA adapters, as a forward-only role (a reference model)."""
        return BaseModelView(self)

    def shutdown(self) -> None:
        self.workers.shutdown()
        self.virtual.release()


@dataclass
class BaseModelView:
    """A LoRA group's base model (adapters disabled) as a frozen role: no second copy of the weights. It runs on
    the group's workers, so shutting it down leaves them to the group's owner."""

    group: PolicyGroup

    def forward(self, examples: list[TokenizedExample]) -> list[torch.Tensor]:
        return self.group.forward(examples, adapters=False)

    def shutdown(self) -> None:
        pass


def start_policy_group(
    cfg: PipelineConfig,
    model: ModelSource | Path,
    optimizer: OptimizerConfig | None,
    total_steps: int,
    pad_id: int,
    model_kind: str = "causal_lm",
    lora: LoraConfig | None = None,
) -> PolicyGroup:
    """Trainer workers on ``model`` (each rank loads it from its own node); ``optimizer=None`` starts a frozen group
    (forward passes only); ``lora`` with a rank adds adapters, which alone train."""
    if cfg.policy.backend == "megatron":  # one config error here rather than one per rank from the actors
        from transformers import AutoConfig

        from engine.models import megatron_convert

        layout = cfg.policy.megatron
        shape = megatron_convert.shape_of(AutoConfig.from_pretrained(local_folder(model)))
        megatron_convert.check_parallel_sizes(shape, layout.tensor_parallel, layout.pipeline_parallel)
    cluster.connect(cfg.ray)
    world_size = cfg.policy.world_size
    virtual = cluster.VirtualCluster("policy", world_size, gpus_per_bundle=cfg.policy.gpus_per_worker)
    workers = cluster.WorkerGroup(
        _worker_class(cfg.policy.backend),
        virtual,
        world_size,
        init_kwargs={
            "policy": cfg.policy.model_dump(mode="json"),
            "optimizer": optimizer.model_dump(mode="json") if optimizer is not None else None,
            "total_steps": total_steps,
            "seed": cfg.seed,
            "model_kind": model_kind,
            **({"lora": lora.model_dump(mode="json")} if lora is not None and lora.enabled else {}),
        },
        rank_kwargs=[{"model_path": folder} for folder in folders_for_workers(virtual, model)],
    )
    cluster.log_placement("policy", workers.call("info"))
    layouts = workers.call("parallel_layout")
    replica_of_rank = [layout["dp_rank"] for layout in layouts]
    reporting_ranks = sorted(
        (rank for rank, layout in enumerate(layouts) if layout["reports"]), key=lambda rank: replica_of_rank[rank]
    )
    return PolicyGroup(
        workers,
        virtual,
        replica_of_rank,
        reporting_ranks,
        cfg.policy.micro_batch_tokens,
        pad_id,
        trainable=optimizer is not None,
        sequence_packing=cfg.policy.sequence_packing and model_kind == "causal_lm",
    )


def _worker_class(backend: str) -> type:
    if backend == "megatron":
        from engine.policy.megatron import MegatronPolicyWorker

        return MegatronPolicyWorker
    from engine.policy.fsdp2 import FSDP2PolicyWorker

    return FSDP2PolicyWorker
