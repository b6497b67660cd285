"""Supervised fine-tuning.

The loss is token-level NLL on assistant tokens only, divided by the step's global count of target
tokens (``nll_loss`` with ``global_valid_tokens``), so a step's result is the same for any number of
ranks or micro-batches. The loop (batching, validation, checkpoints, resume, export) is the shared one
of ``supervised.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.algorithms.losses import nll_loss
from engine.algorithms.supervised import LoopSpec, run_loop
from engine.config import PipelineConfig
from engine.data.batching import MicroBatch
from engine.data.chat import supervised_example
from engine.data.datasets import read_jsonl
from engine.models.loading import ModelSource, local_folder
from engine.storage import ArtifactRef, ArtifactStore
from engine.tracking import StageRun


def sft_loss(logprobs: torch.Tensor, batch: MicroBatch, normalizers: dict[str, float]) -> tuple[torch.Tensor, dict]:
    return nll_loss(logprobs, batch["loss_mask"], normalizers["tokens"]), {}


def _summary(val_history: list[dict[str, float]], last_loss: float) -> dict[str, float]:
    metrics = {"train_loss_last": last_loss}
    if val_history:
        metrics.update(val_loss_first=val_history[0]["val/loss"], val_loss_last=val_history[-1]["val/loss"])
    return metrics


def run_sft(
    cfg: PipelineConfig,
    store: ArtifactStore,
    run: StageRun,
    base_model: ModelSource | Path,
    dataset_dir: Path,
    stage_prefix: str,
) -> ArtifactRef:
    from transformers import AutoTokenizer

    sft = cfg.sft
    tokenizer = AutoTokenizer.from_pretrained(local_folder(base_model))

    def examples(split: str) -> list:
        rows = read_jsonl(dataset_dir / f"{split}.jsonl")
        return [supervised_example(tokenizer, row, sft.max_seq_len, f"{split} row {i}") for i, row in enumerate(rows)]

    spec = LoopSpec(
        name="sft",
        train=examples("train"),
        val=examples("val")[: sft.val_size],
        loss_fn=sft_loss,
        validation=lambda sums: {"val/loss": sums["loss"]},
        summary=_summary,
        optimizer=sft.optimizer,
        max_steps=sft.max_steps,
        batch_size=sft.batch_size,
        val_every=sft.val_every,
        checkpoint_every=sft.checkpoint_every,
        lora=sft.lora,
    )
    return run_loop(cfg, store, run, base_model, spec, stage_prefix, tokenizer.pad_token_id)
