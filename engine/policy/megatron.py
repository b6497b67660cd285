"""The Megatron-core policy worker: one rank of a tensor x pipeline x data parallel trainer, run as a Ray actor.

Same interface as the FSDP2 worker, so ``policy.backend: megatron`` is the only change a user makes. The model
is megatron-core's ``GPTModel`` (Transformer Engine layer spec where TE is installed, the local spec otherwise),
loaded from Hugging Face weights by ``engine.models.megatron_convert`` and exported back to them for vLLM refits
and the next stage. Ranks that hold the same data-parallel replica (its tensor ranks and pipeline stages) get
the same micro-batches; only the replica's reporter (tensor rank 0 of the last stage) returns losses and outputs.

The loss contract is kept: our loss already divides by the step's global normalizer, so Megatron runs with
``calculate_per_token_loss`` (no division by the number of micro-batches) and its data-parallel gradient
reduction sums instead of averaging. Per-token logprobs come from the vocab-parallel cross entropy; the
vocabulary padding rows (``GPTShape.padded_vocab_size``) are masked out of the softmax.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from engine.config import MegatronConfig, OptimizerConfig, PolicyConfig
from engine.data.batching import MicroBatch, pad_micro_batch
from engine.models import megatron_convert
from engine.models.loading import set_config_dtype
from engine.models.megatron_convert import GPTShape
from engine.policy import process_group
from engine.policy.interfaces import LossFn
from engine.policy.optim import lr_multiplier
from engine.policy.shards import StoreTransfers
from engine.profiling import Profiled
from engine.weight_broadcast import RefitSender
from engine.weight_sync import WeightBuckets, put_weight_buckets

LAYOUT_FILE = "megatron_layout.json"
# optimizer state gathered per parameter on save, so a checkpoint reloads at another TP, PP or DP size
CHECKPOINT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _has_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def build_gpt_model(shape: GPTShape, policy: PolicyConfig) -> torch.nn.Module:
    """This rank's part of the model (its tensor shard of its pipeline stage), randomly initialised."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    layout: MegatronConfig = policy.megatron
    bf16 = policy.precision == "bf16"
    recompute = (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if policy.activation_checkpointing
        else {}
    )
    config = TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        params_dtype=torch.float32,
        bf16=bf16,
        use_cpu_initialization=not torch.cuda.is_available(),
        calculate_per_token_loss=True,
        **recompute,
    )
    spec = (
        get_gpt_layer_with_transformer_engine_spec()
        if _has_transformer_engine()
        else get_gpt_layer_local_spec(normalization="RMSNorm")
    )
    rope_scaling = shape.llama3_rope_factor is not None
    model = GPTModel(
        config,
        spec,
        vocab_size=shape.padded_vocab_size,
        max_sequence_length=shape.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=shape.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=int(shape.rope_theta),
        rope_scaling=rope_scaling,
        rope_scaling_factor=shape.llama3_rope_factor if rope_scaling else 8.0,
    )
    return model.cuda() if torch.cuda.is_available() else model


def vocab_parallel_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) in fp32 from this tensor rank's vocabulary slice of the logits [B, L, V/tp]."""
    from megatron.core import parallel_state, tensor_parallel

    logits = logits[:, :-1].float().contiguous()
    local = logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * local
    padding = torch.arange(first, first + local, device=logits.device) >= vocab_size
    if bool(padding.any()):
        logits = logits.masked_fill(padding, float("-inf"))
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, input_ids[:, 1:].contiguous())


class MegatronPolicyWorker(Profiled, RefitSender, StoreTransfers):
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
    ):
        if model_kind != "causal_lm":  # the reward-model stage refuses the scalar head with Megatron
            raise ValueError(f"the Megatron worker trains causal LMs, not {model_kind!r}")
        self.rank, self.world_size = rank, world_size
        self.model_path = model_path
        self.policy = PolicyConfig.model_validate(policy)
        # None: a frozen role (reference, teacher) that only runs forward passes
        self.optimizer_cfg = OptimizerConfig.model_validate(optimizer) if optimizer is not None else None
        self.total_steps = total_steps
        self.seed = seed
        self.step = 0
        torch.set_num_threads(self.policy.threads_per_worker)

    # ------------------------------------------------------------------------------ set-up

    def rendezvous_address(self) -> tuple[str, int]:
        from engine import cluster

        return cluster.rendezvous_point()

    def init_distributed(self, address: str, port: int) -> None:
        from megatron.core import parallel_state, tensor_parallel
        from transformers import AutoConfig

        from engine.policy import megatron_cpu

        self.device = process_group.join(self.rank, self.world_size, address, port)
        megatron_cpu.apply()
        layout = self.policy.megatron
        self.shape = megatron_convert.shape_of(AutoConfig.from_pretrained(self.model_path))
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_parallel, pipeline_model_parallel_size=layout.pipeline_parallel
        )
        torch.manual_seed(self.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(self.seed)
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.first_stage = parallel_state.is_pipeline_first_stage()
        self.last_stage = parallel_state.is_pipeline_last_stage()
        self.layers = megatron_convert.stage_layers(self.shape, layout.pipeline_parallel, self.pp_rank)
        module = build_gpt_model(self.shape, self.policy)
        self._load_hf_weights(module)
        self.model, self.optimizer = self._wrap(module)

    def _load_hf_weights(self, module: torch.nn.Module) -> None:
        _, hf_state = megatron_convert.load_hf_folder(Path(self.model_path), self.layers)
        shard = megatron_convert.hf_to_megatron(
            hf_state,
            self.shape,
            self.policy.megatron.tensor_parallel,
            self.tp_rank,
            self.layers,
            self.first_stage,
            self.last_stage,
        )
        shard = megatron_convert.rename_norms(shard, to_transformer_engine=_has_transformer_engine())
        missing, unexpected = module.load_state_dict(shard, strict=False)
        missing = [key for key in missing if not key.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"HF -> Megatron conversion left missing {missing} / unexpected {unexpected}")

    def _wrap(self, module: torch.nn.Module):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        bf16 = self.policy.precision == "bf16"
        if bf16:
            module = Float16Module(module.config, module)
        distributed_optimizer = self.policy.megatron.distributed_optimizer
        model = DistributedDataParallel(
            module.config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed_optimizer
            ),
            module,
        )
        model.train()
        cfg = self.optimizer_cfg
        if cfg is None:
            return model, None
        optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer="adam",
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                adam_beta1=cfg.betas[0],
                adam_beta2=cfg.betas[1],
                adam_eps=cfg.eps,
                clip_grad=cfg.grad_clip or 0.0,
                bf16=bf16,
                params_dtype=torch.float32,
                use_distributed_optimizer=distributed_optimizer,
            ),
            [model],
        )
        return model, optimizer

    def parallel_layout(self) -> dict[str, int | bool]:
        """Which data-parallel replica this rank serves, and whether it reports that replica's results."""
        return {"dp_rank": self.dp_rank, "reports": self.tp_rank == 0 and self.last_stage}

    # ------------------------------------------------------------------------------ compute

    def _schedule(self, micro_batches: list[MicroBatch], loss_func_of, forward_only: bool) -> list[dict[str, Any]]:
        """Megatron's forward(-backward) schedule over the micro-batches; the last stage's per-batch results."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if self.policy.megatron.pipeline_parallel > 1:  # stages exchange fixed-shape activations
            rows = max(batch["input_ids"].shape[0] for batch in micro_batches)
            length = max(batch["input_ids"].shape[1] for batch in micro_batches)
            micro_batches = [pad_micro_batch(batch, rows, length) for batch in micro_batches]
        rows, length = micro_batches[0]["input_ids"].shape

        def forward_step(data: Iterator[MicroBatch], model: torch.nn.Module):
            batch = {key: value.to(self.device) for key, value in next(data).items()}
            input_ids = batch["input_ids"]
            positions = torch.arange(input_ids.shape[1], device=self.device).expand_as(input_ids)
            # right padding: the causal mask alone keeps every real token's view unchanged
            output = model(input_ids, positions, None)
            return output, partial(loss_func_of, batch)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[self.model],
            num_microbatches=len(micro_batches),
            seq_length=length,
            micro_batch_size=rows,
            forward_only=forward_only,
        )

    def _loss_func(self, loss_fn: LossFn, normalizers: dict[str, float], batch: MicroBatch, logits: torch.Tensor):
        logprobs = vocab_parallel_token_logprobs(logits, batch["input_ids"], self.shape.vocab_size)
        loss, metrics = loss_fn(logprobs, batch, normalizers)
        # a 3-tuple with calculate_per_token_loss: Megatron neither divides the loss nor rescales the gradients
        return loss, torch.tensor(1, dtype=torch.int), {"loss": float(loss.detach()), "metrics": metrics}

    def _summed(self, results: list[dict[str, Any]]) -> dict[str, float]:
        """This rank's share of the loss and its metric sums (zero on ranks that are not a last stage)."""
        metric_sums: dict[str, float] = {"loss_share": 0.0}
        for result in results:
            metric_sums["loss_share"] += result["loss"]
            for key, value in result["metrics"].items():
                metric_sums[key] = metric_sums.get(key, 0.0) + value
        return metric_sums

    def train_step(
        self, micro_batches: list[MicroBatch], loss_fn: LossFn, normalizers: dict[str, float]
    ) -> dict[str, float]:
        """One optimizer step over this replica's micro-batches; see ``FSDP2PolicyWorker.train_step``."""
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        if self.optimizer is None:
            raise RuntimeError("this worker holds a frozen model (started without an optimizer): it cannot train")
        lr = self.optimizer_cfg.lr * lr_multiplier(self.step, self.optimizer_cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        results = self._schedule(micro_batches, partial(self._loss_func, loss_fn, normalizers), forward_only=False)
        finalize_model_grads([self.model])  # data-parallel sum, tied-embedding sync between stages
        grad_norm = self.optimizer.get_grad_norm() if not self.optimizer_cfg.grad_clip else None
        success, clipped_norm, _ = self.optimizer.step()
        if not success:
            raise RuntimeError("Megatron optimizer step failed (non-finite gradients)")
        self.step += 1
        return {
            **self._summed(results),
            "grad_norm": float(grad_norm if grad_norm is not None else clipped_norm),
            "lr": lr,
        }

    @torch.no_grad()
    def evaluate(
        self, micro_batches: list[MicroBatch], loss_fn: LossFn, normalizers: dict[str, float]
    ) -> dict[str, float]:
        self.model.eval()
        try:
            results = self._schedule(micro_batches, partial(self._loss_func, loss_fn, normalizers), forward_only=True)
        finally:
            self.model.train()
        return self._summed(results)

    @torch.no_grad()
    def forward_only(self, micro_batches: list[MicroBatch], adapters: bool = True) -> list[torch.Tensor]:
        """Token logprobs [B, L-1] per micro-batch (on the reporter; other ranks return an empty list)."""
        if not adapters:
            raise ValueError("the Megatron worker trains no LoRA adapters: there is no base model under them")

        def collect(batch: MicroBatch, logits: torch.Tensor):
            logprobs = vocab_parallel_token_logprobs(logits, batch["input_ids"], self.shape.vocab_size)
            return logprobs.new_zeros(()), torch.tensor(1, dtype=torch.int), {"logprobs": logprobs.cpu()}

        self.model.eval()
        try:
            results = self._schedule(micro_batches, collect, forward_only=True)
        finally:
            self.model.train()
        # pipeline padding may have widened a batch: cut each back to its own shape
        return [
            result["logprobs"][: batch["input_ids"].shape[0], : batch["input_ids"].shape[1] - 1]
            for batch, result in zip(micro_batches, results)
        ]

    # ------------------------------------------------------------------------------ state

    def _layout(self) -> dict[str, int]:
        layout = self.policy.megatron
        return {"tensor_parallel": layout.tensor_parallel, "pipeline_parallel": layout.pipeline_parallel}

    def save_checkpoint(self, directory: str) -> None:
        """Model and optimizer through Megatron's distributed checkpointing (reshardable to another TP/PP size),
        plus the step and this rank's RNG states."""
        from megatron.core import dist_checkpointing, tensor_parallel

        if self.optimizer is None:
            raise RuntimeError("a frozen model has no training state to checkpoint")
        target = Path(directory) / "dist"
        target.mkdir(parents=True, exist_ok=True)  # every rank: each may stage on its own node's disk
        if self.rank == 0:
            (Path(directory) / LAYOUT_FILE).write_text(json.dumps({**self._layout(), "step": self.step}))
        dist.barrier()
        model_state = self._gpt_model().sharded_state_dict(metadata=CHECKPOINT_METADATA)
        optimizer_state = self.optimizer.sharded_state_dict(model_state, metadata=CHECKPOINT_METADATA)
        state = {"model": model_state, "optimizer": optimizer_state}
        dist_checkpointing.save(state, str(target))
        extra = {"rng": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
        if self.device.type == "cuda":
            extra["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        torch.save(extra, Path(directory) / f"rank{self.rank}.pt")
        dist.barrier()

    def load_checkpoint(self, directory: str) -> None:
        """Model, optimizer and step; RNG states too where the checkpoint was written with the same layout."""
        from megatron.core import dist_checkpointing, tensor_parallel

        if self.optimizer is None:
            raise RuntimeError("a frozen model has no training state to restore")
        saved = json.loads((Path(directory) / LAYOUT_FILE).read_text())
        self._materialize_optimizer_state()
        model_state = self._gpt_model().sharded_state_dict(metadata=CHECKPOINT_METADATA)
        optimizer_state = self.optimizer.sharded_state_dict(model_state, is_loading=True, metadata=CHECKPOINT_METADATA)
        state = {"model": model_state, "optimizer": optimizer_state}
        loaded = dist_checkpointing.load(state, str(Path(directory) / "dist"))
        self._gpt_model().load_state_dict(loaded["model"])
        self.optimizer.load_state_dict(loaded["optimizer"])
        self.step = saved["step"]
        rank_file = Path(directory) / f"rank{self.rank}.pt"
        if {k: saved[k] for k in self._layout()} == self._layout() and rank_file.exists():
            extra = torch.load(rank_file, weights_only=False)
            torch.set_rng_state(extra["rng"])
            tensor_parallel.get_cuda_rng_tracker().set_states(extra["tracker"])
            if "cuda_rng" in extra:
                torch.cuda.set_rng_state(extra["cuda_rng"], self.device)

    def _materialize_optimizer_state(self) -> None:
        """Adam creates its moments on the first step; a checkpoint loads into existing tensors, so a fresh
        optimizer gets zero moments and step 0 first (what Megatron's dummy step does on other code paths)."""
        optimizers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for inner in (wrapper.optimizer for wrapper in optimizers):
            for group in inner.param_groups:
                for param in group["params"]:
                    if not inner.state[param]:
                        inner.state[param].update(
                            exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param), step=torch.tensor(0.0)
                        )

    def _gpt_model(self) -> torch.nn.Module:
        """The GPTModel inside the data-parallel (and, in bf16, the Float16Module) wrappers."""
        module = self.model.module
        return module.module if hasattr(module, "module") else module

    def _local_weights(self) -> dict[str, torch.Tensor]:
        """This rank's weights under the local spec's names, in fp32 on the CPU."""
        weights = {
            key: value.detach().float().cpu()
            for key, value in self._gpt_model().state_dict().items()
            if not key.endswith("_extra_state")
        }
        return megatron_convert.rename_norms(weights, to_transformer_engine=False)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Hugging Face weights of the whole model on global rank 0 (None elsewhere); every rank takes part."""
        piece = (self.pp_rank, self.tp_rank, self._local_weights()) if self.dp_rank == 0 else None
        pieces: list[Any] = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(piece, pieces, dst=0)
        if self.rank != 0:
            return None
        layout = self.policy.megatron
        by_stage: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        for stage, tensor_rank, weights in filter(None, pieces):
            by_stage.setdefault(stage, {})[tensor_rank] = weights
        state: dict[str, torch.Tensor] = {}
        for stage in range(layout.pipeline_parallel):
            shards = [by_stage[stage][t] for t in range(layout.tensor_parallel)]
            layers = megatron_convert.stage_layers(self.shape, layout.pipeline_parallel, stage)
            last = stage == layout.pipeline_parallel - 1
            state.update(megatron_convert.megatron_to_hf(shards, self.shape, layers, stage == 0, last))
        return state

    def refit_weights(self, adapters_only: bool = False) -> dict[str, torch.Tensor] | None:
        """Full Hugging Face weights on rank 0 (every rank takes part in the gather), None on the others."""
        if adapters_only:
            raise ValueError("the Megatron worker trains no LoRA adapters to push")
        return self.full_state_dict()

    def weight_buckets(self, bucket_bytes: int, adapters_only: bool = False) -> WeightBuckets | None:
        """``refit_weights`` as Ray object-store buckets on rank 0, for a refit."""
        state = self.refit_weights(adapters_only)
        return put_weight_buckets(state, bucket_bytes) if state is not None else None

    def export_hf(self, directory: str, dtype: str = "float32") -> None:
        """Full Hugging Face weights (config, safetensors) in ``dtype``, written by rank 0."""
        from safetensors.torch import save_file

        state = self.full_state_dict()
        if state is not None:
            target = Path(directory)
            target.mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "generation_config.json"):
                if (Path(self.model_path) / name).exists():
                    shutil.copy2(Path(self.model_path) / name, target / name)
            cast = getattr(torch, dtype)
            tensors = {k: v.to(cast).contiguous() for k, v in state.items()}
            save_file(tensors, str(target / "model.safetensors"), {"format": "pt"})
            set_config_dtype(target, dtype)
        dist.barrier()

    def info(self) -> dict[str, Any]:
        from engine import cluster

        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "device": str(self.device),
            "backend": dist.get_backend(),
            **cluster.placement(),
            "tensor_parallel_rank": self.tp_rank,
            "pipeline_parallel_rank": self.pp_rank,
            "data_parallel_rank": self.dp_rank,
            **self._parameter_counts(),
        }

    def _parameter_counts(self) -> dict[str, int]:
        """The whole model's parameters: each rank holds a tensor/pipeline piece, every replica the same pieces."""
        local = torch.tensor(sum(p.numel() for p in self.model.parameters()), dtype=torch.long)
        dist.all_reduce(local)  # gloo or NCCL: every rank takes part, as in every info() call
        total = int(local) // self.dp_size
        return {"parameters": total, "trainable_parameters": total}
