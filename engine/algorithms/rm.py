"""Reward model: the SFT model with a score, trained with the Bradley-Terry loss on preference pairs.

Two heads: ``scalar`` (a sequence-classification head on the last token) and ``likelihood`` (the score is the
response's summed token log-likelihood under the causal LM, so the model starts from what SFT already knows
about right and wrong answers). Each micro-batch holds whole pairs as consecutive rows [chosen, rejected]; the
loss is averaged over the step's global number of pairs. Validated by pairwise accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.algorithms.losses import bradley_terry_loss
from engine.algorithms.supervised import LoopSpec, run_loop
from engine.config import PipelineConfig
from engine.data.batching import MicroBatch
from engine.data.datasets import read_jsonl
from engine.data.preferences import pair_examples
from engine.errors import ConfigError
from engine.models.loading import ModelSource, local_folder
from engine.storage import ArtifactRef, ArtifactStore
from engine.tracking import StageRun


def pairwise_loss(scores: torch.Tensor, batch: MicroBatch, normalizers: dict[str, float]):
    """Bradley-Terry over the rows' scores ([B]; or token logprobs [B, L-1], summed over the response)."""
    if scores.dim() == 2:
        scores = (scores * batch["loss_mask"]).sum(-1)
    valid = batch["index"] >= 0  # a filler micro-batch has no pairs
    scores = scores[valid.to(scores.device)]
    if scores.numel() < 2:
        return scores.sum() * 0.0, {"correct_pairs": 0.0, "pairs": 0.0}
    chosen, rejected = scores[0::2], scores[1::2]
    loss, metrics = bradley_terry_loss(chosen, rejected, global_valid_seqs=normalizers["units"])
    pairs = float(chosen.numel())
    return loss, {"correct_pairs": metrics["accuracy"] * pairs, "pairs": pairs}


def _validation(sums: dict[str, float]) -> dict[str, float]:
    return {"val/loss": sums["loss"], "val/pairwise_accuracy": sums["correct_pairs"] / max(1.0, sums["pairs"])}


def _summary(val_history: list[dict[str, float]], last_loss: float) -> dict[str, float]:
    return {
        "train_loss_last": last_loss,
        "val_loss_first": val_history[0]["val/loss"],
        "val_loss_last": val_history[-1]["val/loss"],
        "val_pairwise_accuracy_first": val_history[0]["val/pairwise_accuracy"],
        "val_pairwise_accuracy": val_history[-1]["val/pairwise_accuracy"],
    }


def run_reward_model(
    cfg: PipelineConfig,
    store: ArtifactStore,
    run: StageRun,
    sft_model: ModelSource | Path,
    dataset_dir: Path,
    stage_prefix: str,
) -> ArtifactRef:
    from transformers import AutoTokenizer

    rm = cfg.reward_model
    if rm.head == "scalar" and cfg.policy.backend == "megatron":
        raise ConfigError(
            "reward_model.head=scalar needs policy.backend=fsdp2 (the Megatron backend trains causal LMs): "
            "set reward_model.head=likelihood"
        )
    tokenizer = AutoTokenizer.from_pretrained(local_folder(sft_model))
    train = pair_examples(tokenizer, read_jsonl(dataset_dir / "train.jsonl"), rm.max_seq_len, "train")
    val_rows = read_jsonl(dataset_dir / "val.jsonl")[: rm.val_size]
    val = pair_examples(tokenizer, val_rows, rm.max_seq_len, "validation")
    spec = LoopSpec(
        name="reward_model",
        train=train,
        val=val,
        loss_fn=pairwise_loss,
        validation=_validation,
        summary=_summary,
        optimizer=rm.optimizer,
        max_steps=rm.max_steps,
        batch_size=rm.batch_size,
        val_every=rm.val_every,
        checkpoint_every=rm.max_steps,
        group_size=2,
        model_kind="reward" if rm.head == "scalar" else "causal_lm",
        lora=rm.lora,
    )
    return run_loop(cfg, store, run, sft_model, spec, stage_prefix, tokenizer.pad_token_id)
