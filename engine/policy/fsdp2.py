"""The FSDP2 policy worker: one rank of a data-parallel trainer, run as a Ray actor.

Each decoder layer and the root are ``fully_shard``-ed (gloo on CPU, NCCL on GPU). A training step
runs the rank's micro-batches with gradient sync only on the last one; every loss is already divided by
the step's *global* normalizer, so FSDP's reduce-scatter is set to sum (divide factor 1), not average:
the step's gradient is then the same whatever the number of ranks or micro-batches.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from engine.config import LoraConfig, OptimizerConfig, PolicyConfig
from engine.data.batching import MicroBatch, unpack_token_values
from engine.models import lora
from engine.models.loading import set_config_dtype, skip_sklearn_in_transformers
from engine.models.logprobs import token_logprobs_from_logits
from engine.policy import process_group
from engine.policy.interfaces import LossFn
from engine.policy.optim import build_optimizer
from engine.policy.shards import StoreTransfers
from engine.profiling import Profiled
from engine.weight_broadcast import RefitSender
from engine.weight_sync import WeightBuckets, put_weight_buckets


class FSDP2PolicyWorker(Profiled, RefitSender, StoreTransfers):
    def __init__(
        self,
        rank: int,
        world_size: int,
        model_path: str,
        policy: dict[str, Any],
        optimizer: dict[str, Any] | None,
        total_steps: int,
        seed: int,
        model_kind: str = "causal_lm",
        lora: dict[str, Any] | None = None,
    ):
        self.rank, self.world_size = rank, world_size
        # "causal_lm": per-token logprobs; "reward": one scalar per sequence; "value": a critic's per-token values
        self.model_kind = model_kind
        self.model_path = model_path
        self.policy = PolicyConfig.model_validate(policy)
        # None: a frozen role (reference, teacher, scorer) that only runs forward passes
        self.optimizer_cfg = OptimizerConfig.model_validate(optimizer) if optimizer is not None else None
        self.lora_cfg = LoraConfig.model_validate(lora or {})
        self.total_steps = total_steps
        self.seed = seed
        torch.set_num_threads(self.policy.threads_per_worker)
        skip_sklearn_in_transformers()

    # ------------------------------------------------------------------------------ set-up

    def rendezvous_address(self) -> tuple[str, int]:
        from engine import cluster

        return cluster.rendezvous_point()

    def init_distributed(self, address: str, port: int) -> None:
        self.device = process_group.join(self.rank, self.world_size, address, port)
        torch.manual_seed(self.seed)
        self.model = self._build_model()
        self.optimizer = self.scheduler = None
        if self.optimizer_cfg is not None:
            trainable = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapters only
            self.optimizer, self.scheduler = build_optimizer(trainable, self.optimizer_cfg, self.total_steps)

    def _build_model(self) -> torch.nn.Module:
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoModelForTokenClassification,
        )
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if self.model_kind in ("reward", "value"):  # a new linear head on the decoder: one output per position
            head_model = (
                AutoModelForSequenceClassification if self.model_kind == "reward" else AutoModelForTokenClassification
            )
            model = head_model.from_pretrained(self.model_path, num_labels=1, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        model = model.to(self.device)
        if self.policy.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if self.lora_cfg.enabled:
            model = lora.add_adapters(model, self.lora_cfg, self.model_kind)
        mixed = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.policy.precision == "bf16"
            else MixedPrecisionPolicy()
        )
        plain = model.get_base_model() if self.lora_cfg.enabled else model
        for layer in plain.model.layers:
            fully_shard(layer, mp_policy=mixed)
        fully_shard(model, mp_policy=mixed)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        model.train()
        return model

    def parallel_layout(self) -> dict[str, int | bool]:
        """Every FSDP2 rank is its own data-parallel replica and reports its own results."""
        return {"dp_rank": self.rank, "reports": True}

    # ------------------------------------------------------------------------------ compute

    def _forward(self, batch: MicroBatch) -> torch.Tensor:
        """Token logprobs [B, L-1] of a causal LM, one fp32 score [B] per sequence of a reward model, or a critic's
        values [B, L-1] (position t: the value of the prefix up to t, before token t+1 is sampled)."""
        if "packed_input_ids" in batch:  # one row per several sequences; transformers keeps attention within each
            packed_ids = batch["packed_input_ids"].to(self.device)
            positions = batch["packed_position_ids"].to(self.device)
            logits = self.model(input_ids=packed_ids, position_ids=positions).logits
            return unpack_token_values(token_logprobs_from_logits(logits, packed_ids), batch)
        input_ids = batch["input_ids"].to(self.device)
        attention = batch["attention_mask"].to(self.device)
        logits = self.model(input_ids=input_ids, attention_mask=attention).logits
        if self.model_kind == "reward":
            return logits[:, 0].float()
        if self.model_kind == "value":
            return logits[:, :-1, 0].float()
        return token_logprobs_from_logits(logits, input_ids)

    def _on_device(self, batch: MicroBatch) -> MicroBatch:
        return {key: value.to(self.device) for key, value in batch.items()}

    def train_step(
        self, micro_batches: list[MicroBatch], loss_fn: LossFn, normalizers: dict[str, float]
    ) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches. Returns this rank's share of the loss
        (the controller sums shares over ranks), the global grad norm and the learning rate used."""
        if self.optimizer is None:
            raise RuntimeError("this worker holds a frozen model (started without an optimizer): it cannot train")
        self.optimizer.zero_grad(set_to_none=True)
        loss_share = 0.0
        metric_sums: dict[str, float] = {}
        for index, batch in enumerate(micro_batches):
            self.model.set_requires_gradient_sync(index == len(micro_batches) - 1)
            outputs = self._forward(batch)
            loss, metrics = loss_fn(outputs, self._on_device(batch), normalizers)
            loss.backward()
            loss_share += float(loss.detach())
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + value
        max_norm = self.optimizer_cfg.grad_clip if self.optimizer_cfg.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        return {"loss_share": loss_share, "grad_norm": float(grad_norm), "lr": lr, **metric_sums}

    @torch.no_grad()
    def evaluate(
        self, micro_batches: list[MicroBatch], loss_fn: LossFn, normalizers: dict[str, float]
    ) -> dict[str, float]:
        self.model.eval()
        try:
            loss_share = 0.0
            metric_sums: dict[str, float] = {}
            for batch in micro_batches:
                loss, metrics = loss_fn(self._forward(batch), self._on_device(batch), normalizers)
                loss_share += float(loss)
                for key, value in metrics.items():
                    metric_sums[key] = metric_sums.get(key, 0.0) + value
        finally:
            self.model.train()
        return {"loss_share": loss_share, **metric_sums}

    @torch.no_grad()
    def forward_only(self, micro_batches: list[MicroBatch], adapters: bool = True) -> list[torch.Tensor]:
        """The model's outputs (see ``_forward``) for each micro-batch, without gradients; ``adapters=False``:
        those of the base model under the LoRA adapters (a reference without a second copy of the weights)."""
        if not adapters and not self.lora_cfg.enabled:
            raise ValueError("adapters=False needs a LoRA model (lora.rank > 0)")
        self.model.eval()
        try:
            with self.model.disable_adapter() if not adapters else contextlib.nullcontext():
                return [self._forward(batch).cpu() for batch in micro_batches]
        finally:
            self.model.train()

    # ------------------------------------------------------------------------------ state

    def _training_state(self) -> tuple[dict[str, Any], dict[str, Any], StateDictOptions]:
        """Model and optimizer state to checkpoint. LoRA: the adapters (and a new head) only, as the base comes
        unchanged from the model path; loading is then not strict, for the frozen weights left out."""
        if not self.lora_cfg.enabled:
            return *get_state_dict(self.model, self.optimizer), StateDictOptions()
        options = StateDictOptions(strict=False)
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
        trainable = {name for name, param in self.model.named_parameters() if param.requires_grad}
        return {k: v for k, v in model_state.items() if k in trainable}, optim_state, options

    def save_checkpoint(self, directory: str) -> None:
        """Model and optimizer shards through DCP, plus this rank's scheduler and RNG state."""
        if self.optimizer is None:
            raise RuntimeError("a frozen model has no training state to checkpoint")
        model_state, optim_state, _ = self._training_state()
        shards = Path(directory) / "dcp"
        shards.mkdir(parents=True, exist_ok=True)  # every rank: each may stage on its own node's disk
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(shards))
        extra = {"scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            extra["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        torch.save(extra, Path(directory) / f"rank{self.rank}.pt")
        dist.barrier()

    def load_checkpoint(self, directory: str) -> None:
        if self.optimizer is None:
            raise RuntimeError("a frozen model has no training state to restore")
        model_state, optim_state, options = self._training_state()
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(Path(directory) / "dcp"))
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=options,
        )
        extra = torch.load(Path(directory) / f"rank{self.rank}.pt", weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng"])
        if "cuda_rng" in extra:
            torch.cuda.set_rng_state(extra["cuda_rng"], self.device)

    def _gathered_state(self) -> dict[str, torch.Tensor]:
        """Unsharded weights on CPU under the live model's names (every rank takes part; rank 0 gets them)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    def _plain(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The gathered weights as the plain model's: LoRA adapters merged in."""
        return lora.merge_adapters(state, lora.adapter_scaling(self.model)) if self.lora_cfg.enabled else state

    def refit_weights(self, adapters_only: bool = False) -> dict[str, torch.Tensor] | None:
        """What a refit pushes, on CPU: the full weights (LoRA merged in) or a LoRA model's adapters alone. Every
        rank takes part in the gather; rank 0 returns them, the others None."""
        if adapters_only and not self.lora_cfg.enabled:
            raise ValueError("adapters_only needs a LoRA model (lora.rank > 0)")
        state = self._gathered_state()
        if self.rank != 0:
            return None
        return lora.adapter_weights(state) if adapters_only else self._plain(state)

    def weight_buckets(self, bucket_bytes: int, adapters_only: bool = False) -> WeightBuckets | None:
        """``refit_weights`` as Ray object-store buckets; rank 0 returns (manifest, bucket refs, total bytes)."""
        weights = self.refit_weights(adapters_only)
        return None if weights is None else put_weight_buckets(weights, bucket_bytes)

    def export_hf(self, directory: str, dtype: str = "float32") -> None:
        """Full Hugging Face weights (config, safetensors) in ``dtype``, written by rank 0; a LoRA model's
        adapters merged in, and with ``lora.export_adapter`` the adapter alone under ``adapter/`` (peft's layout)."""
        state = self._gathered_state()
        if self.rank == 0:
            cast = getattr(torch, dtype)
            plain_model = self.model.get_base_model() if self.lora_cfg.enabled else self.model
            plain_model.save_pretrained(directory, state_dict={k: v.to(cast) for k, v in self._plain(state).items()})
            set_config_dtype(Path(directory), dtype)
            if self.lora_cfg.export_adapter:
                self.model.save_pretrained(str(Path(directory) / "adapter"), state_dict=state)
        dist.barrier()

    def info(self) -> dict[str, Any]:
        from engine import cluster

        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "device": str(self.device),
            "backend": dist.get_backend(),
            **cluster.placement(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
        }
