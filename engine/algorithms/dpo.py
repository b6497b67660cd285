"""Direct Preference Optimization.

Reference logprobs (the SFT model's summed logprob of each chosen and rejected response) are computed
once per (model, dataset) and cached in the store, not recomputed every step. The loss is ``dpo_loss``
averaged over the step's global number of pairs, plus an optional NLL term on the chosen responses.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch

from engine.algorithms.losses import dpo_loss, nll_loss
from engine.algorithms.supervised import LoopSpec, run_loop
from engine.caching import stage_key
from engine.config import DPOConfig, PipelineConfig
from engine.data.batching import MicroBatch
from engine.data.chat import TokenizedExample
from engine.data.datasets import read_jsonl
from engine.data.preferences import pair_examples
from engine.models.loading import ModelSource, local_folder
from engine.policy.group import BaseModelView, PolicyGroup, start_policy_group
from engine.storage import ArtifactRef, ArtifactStore
from engine.tracking import StageRun

REFERENCE_FILE = "reference_logprobs.json"


class DPOLoss:
    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg

    def __call__(self, logprobs: torch.Tensor, batch: MicroBatch, normalizers: dict[str, float]):
        valid = (batch["index"] >= 0).to(logprobs.device)
        mask = batch["loss_mask"]
        sums = torch.where(mask.bool(), logprobs, 0.0).sum(-1)[valid]
        reference = batch["reference_logprob_sum"][valid]
        if sums.numel() < 2:
            return logprobs.sum() * 0.0, {"correct_pairs": 0.0, "pairs": 0.0}
        loss, metrics = dpo_loss(
            sums[0::2],
            sums[1::2],
            reference[0::2],
            reference[1::2],
            beta=self.cfg.beta,
            loss_type=self.cfg.loss_type,
            label_smoothing=self.cfg.label_smoothing,
            global_valid_seqs=normalizers["units"],
        )
        if self.cfg.sft_weight > 0:
            chosen_mask = mask.clone()
            chosen_mask[1::2] = 0
            loss = loss + self.cfg.sft_weight * nll_loss(logprobs, chosen_mask, normalizers["leading_tokens"])
        pairs = float(sums.numel() // 2)
        return loss, {
            "correct_pairs": metrics["accuracy"] * pairs,
            "pairs": pairs,
            "margin_sum": metrics["reward_margin"] * pairs,
        }


def reference_logprobs(
    store: ArtifactStore,
    reference: PolicyGroup | BaseModelView,
    examples: list[TokenizedExample],
    model_digest: str,
    numerics: dict[str, str],
) -> list[float]:
    """Summed target logprobs per example under the initial (reference) model, cached in the store under the
    model's digest, the exact tokens and targets of the examples (which hold the data, its split and its
    truncation) and what sets the numerics (``numerics``: precision, backend); a cached list of another length
    is computed again."""
    tokens = hashlib.sha256(json.dumps([[e.input_ids, e.loss_mask] for e in examples]).encode()).hexdigest()
    digest = stage_key("dpo_reference", numerics, {"model": model_digest, "examples": tokens})
    key = f"cache/dpo_reference/{digest}"
    if store.is_committed(key):
        cached = store.read_json(key, REFERENCE_FILE)
        if len(cached) == len(examples):
            return cached
    outputs = reference.forward(examples)
    values = [float((lp * torch.tensor(e.loss_mask, dtype=lp.dtype)).sum()) for lp, e in zip(outputs, examples)]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / REFERENCE_FILE).write_text(json.dumps(values))
        store.commit_dir(tmp, key)
    return values


def _validation(sums: dict[str, float]) -> dict[str, float]:
    pairs = max(1.0, sums["pairs"])
    return {
        "val/loss": sums["loss"],
        "val/preference_accuracy": sums["correct_pairs"] / pairs,
        "val/reward_margin": sums["margin_sum"] / pairs,
    }


def _summary(val_history: list[dict[str, float]], last_loss: float) -> dict[str, float]:
    return {
        "train_loss_last": last_loss,
        "val_preference_accuracy_first": val_history[0]["val/preference_accuracy"],
        "val_preference_accuracy": val_history[-1]["val/preference_accuracy"],
        "val_reward_margin": val_history[-1]["val/reward_margin"],
    }


def run_dpo(
    cfg: PipelineConfig,
    store: ArtifactStore,
    run: StageRun,
    sft_model: ModelSource | Path,
    dataset_dir: Path,
    stage_prefix: str,
    model_digest: str,
) -> ArtifactRef:
    from transformers import AutoTokenizer

    d = cfg.dpo
    tokenizer = AutoTokenizer.from_pretrained(local_folder(sft_model))
    train = pair_examples(tokenizer, read_jsonl(dataset_dir / "train.jsonl"), d.max_seq_len, "train")
    val_rows = read_jsonl(dataset_dir / "val.jsonl")[: d.val_size]
    val = pair_examples(tokenizer, val_rows, d.max_seq_len, "validation")
    policy = start_policy_group(cfg, sft_model, d.optimizer, d.max_steps, tokenizer.pad_token_id, lora=d.lora)
    numerics = {"precision": cfg.policy.precision, "backend": cfg.policy.backend}
    reference = policy.base_model() if d.lora.enabled else policy  # LoRA: the base under the adapters
    for examples in (train, val):
        for example, value in zip(examples, reference_logprobs(store, reference, examples, model_digest, numerics)):
            example.scalars["reference_logprob_sum"] = value
    spec = LoopSpec(
        name="dpo",
        train=train,
        val=val,
        loss_fn=DPOLoss(d),
        validation=_validation,
        summary=_summary,
        optimizer=d.optimizer,
        max_steps=d.max_steps,
        batch_size=d.batch_size,
        val_every=d.val_every,
        checkpoint_every=d.checkpoint_every,
        group_size=2,
        lora=d.lora,
    )
    return run_loop(cfg, store, run, sft_model, spec, stage_prefix, tokenizer.pad_token_id, policy=policy)
