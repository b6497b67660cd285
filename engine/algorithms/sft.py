"""Supervised fine-tuning: the controller.

    for step in steps:
        batch  = the step's sequences (a deterministic function of seed and step: exact resume)
        plan   = split over ranks and micro-batches by token budget; N = target tokens of the whole step
        loss   = sum over micro-batches of  sum(-logprob * mask) / N      (nll_loss, global normalization)
        every val_every steps: validation loss; every checkpoint_every steps: checkpoint to the store
    export the final Hugging Face model to the store

The loss is token-level NLL on assistant tokens only, divided by the step's global count of target
tokens, so the result is the same for any number of ranks or micro-batches.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from engine import checkpointing, cluster
from engine.algorithms.losses import nll_loss
from engine.config import PipelineConfig
from engine.data.batching import MicroBatch, plan_step
from engine.data.chat import TokenizedExample, tokenize_conversation
from engine.data.datasets import read_jsonl
from engine.policy.fsdp2 import FSDP2PolicyWorker
from engine.storage import ArtifactRef, ArtifactStore
from engine.tracking import StageRun

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


def sft_loss(logprobs: torch.Tensor, batch: MicroBatch, normalizers: dict[str, float]) -> tuple[torch.Tensor, dict]:
    return nll_loss(logprobs, batch["loss_mask"], normalizers["tokens"]), {}


class StepSampler:
    """Which sequences a step trains on: epoch-wise permutations drawn from the seed.

    A pure function of (seed, step), so the data position of a resumed run is exact by construction.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def indices(self, step: int) -> list[int]:
        start = step * self.batch_size
        out: list[int] = []
        while len(out) < self.batch_size:
            epoch, offset = divmod(start + len(out), self.num_examples)
            take = min(self.batch_size - len(out), self.num_examples - offset)
            out += self._permutation(epoch)[offset : offset + take]
        return out


@dataclass
class PolicyGroup:
    """The trainer worker group plus the batching settings every call needs."""

    group: cluster.WorkerGroup
    virtual: cluster.VirtualCluster
    world_size: int
    token_budget: int
    pad_id: int

    def _plans(self, examples: list[TokenizedExample]) -> tuple[list[list[MicroBatch]], int]:
        return plan_step(examples, self.world_size, self.token_budget, self.pad_id)

    def train(self, examples: list[TokenizedExample], loss_fn: Callable) -> dict[str, float]:
        plans, tokens = self._plans(examples)
        results = self.group.call_per_rank("train_step", [(plan, loss_fn, {"tokens": tokens}) for plan in plans])
        return {
            "loss": sum(r["loss_share"] for r in results),
            "grad_norm": results[0]["grad_norm"],
            "lr": results[0]["lr"],
            "tokens": float(tokens),
        }

    def shutdown(self) -> None:
        self.group.shutdown()
        self.virtual.release()

    def evaluate(self, examples: list[TokenizedExample], loss_fn: Callable) -> float:
        plans, tokens = self._plans(examples)
        results = self.group.call_per_rank("evaluate", [(plan, loss_fn, {"tokens": tokens}) for plan in plans])
        return sum(r["loss_share"] for r in results)


def start_policy_group(
    cfg: PipelineConfig, model_dir: Path, optimizer: Any, total_steps: int, pad_id: int
) -> PolicyGroup:
    cluster.connect(cfg.ray)
    world_size = cfg.policy.world_size
    virtual = cluster.VirtualCluster(
        world_size, cpus_per_bundle=1.0, gpus_per_bundle=1.0 if torch.cuda.is_available() else 0.0
    )
    group = cluster.WorkerGroup(
        FSDP2PolicyWorker,
        virtual,
        world_size,
        init_kwargs={
            "model_path": str(model_dir),
            "policy": cfg.policy.model_dump(mode="json"),
            "optimizer": optimizer.model_dump(mode="json"),
            "total_steps": total_steps,
            "seed": cfg.seed,
        },
    )
    return PolicyGroup(group, virtual, world_size, cfg.policy.micro_batch_tokens, pad_id)


def copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def run_sft(
    cfg: PipelineConfig,
    store: ArtifactStore,
    run: StageRun,
    base_model_dir: Path,
    dataset_dir: Path,
    stage_prefix: str,
) -> ArtifactRef:
    """Train, checkpoint and export; returns the committed model's ref with the stage's metrics."""
    from transformers import AutoTokenizer

    sft = cfg.sft
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    train = [
        tokenize_conversation(tokenizer, r["messages"], sft.max_seq_len)
        for r in read_jsonl(dataset_dir / "train.jsonl")
    ]
    val = [
        tokenize_conversation(tokenizer, r["messages"], sft.max_seq_len) for r in read_jsonl(dataset_dir / "val.jsonl")
    ]
    val = val[: sft.val_size]
    sampler = StepSampler(len(train), sft.batch_size, cfg.seed)

    policy = start_policy_group(cfg, base_model_dir, sft.optimizer, sft.max_steps, tokenizer.pad_token_id)
    try:
        start_step, val_history = 0, []
        resume_dir = checkpointing.find_resume_checkpoint(store, stage_prefix, cfg.resume)
        if resume_dir is not None:
            policy.group.call("load_checkpoint", str(resume_dir))
            state = checkpointing.read_trainer_state(resume_dir)
            start_step, val_history = state["step"], [tuple(v) for v in state["val_history"]]
            checkpointing.restore_rng(state["rng"])
            run.set_tags({"posttrain.resumed_from_step": str(start_step)})
        if not val_history and val:
            val_history.append((0, policy.evaluate(val, sft_loss)))
            run.log_metrics({"val/loss": val_history[-1][1]}, step=0)

        last_loss = float("nan")
        progress = tqdm(
            range(start_step, sft.max_steps), initial=start_step, total=sft.max_steps, desc="sft", unit="step"
        )
        for step in progress:
            examples = [train[i] for i in sampler.indices(step)]
            stats = policy.train(examples, sft_loss)
            last_loss = stats["loss"]
            done = step + 1
            metrics = {f"train/{k}": v for k, v in stats.items()}
            if val and (done % sft.val_every == 0 or done == sft.max_steps):
                val_history.append((done, policy.evaluate(val, sft_loss)))
                metrics["val/loss"] = val_history[-1][1]
            run.log_metrics(metrics, step=done)
            progress.set_postfix(loss=f"{last_loss:.4f}")
            if done % sft.checkpoint_every == 0 and done < sft.max_steps:
                staging = checkpointing.new_staging_dir("sft-ckpt-")
                policy.group.call("save_checkpoint", str(staging))
                state = {
                    "step": done,
                    "data_position": done * sft.batch_size,
                    "val_history": val_history,
                    "rng": checkpointing.capture_rng(),
                    "config": cfg.model_dump(mode="json"),
                }
                checkpointing.commit_checkpoint(store, stage_prefix, done, staging, state)
                shutil.rmtree(staging, ignore_errors=True)
        run.flush()

        export = checkpointing.new_staging_dir("sft-model-")
        policy.group.call("export_hf", str(export))
        copy_tokenizer(base_model_dir, export)
        (export / "posttrain_config.yaml").write_text(cfg.to_yaml())
        metrics = {"train_loss_last": last_loss, "steps": float(sft.max_steps)}
        if val_history:
            metrics.update(val_loss_first=val_history[0][1], val_loss_last=val_history[-1][1])
        ref = store.commit_dir(export, f"{stage_prefix}/model", metadata={"metrics": metrics})
        shutil.rmtree(export, ignore_errors=True)
        return ref.model_copy(update={"metrics": metrics})
    finally:
        policy.shutdown()
