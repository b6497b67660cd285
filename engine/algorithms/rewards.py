"""Rewards beyond the environments' own: a trained reward model, run as a frozen trainer group.

The reward model's head decides the score: a sequence-classification head gives one scalar per conversation; a
causal LM (the ``likelihood`` head of ``engine.algorithms.rm``) scores the response by its summed token
log-likelihood. Either way the reward is sigmoid(score), in (0, 1).
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import PipelineConfig
from engine.data.chat import tokenize_conversation
from engine.environments.interfaces import Message
from engine.policy.group import PolicyGroup, start_policy_group


class RewardModelScorer:
    def __init__(self, group: PolicyGroup, tokenizer, max_len: int, likelihood: bool):
        self.group, self.tokenizer, self.max_len, self.likelihood = group, tokenizer, max_len, likelihood

    @classmethod
    def start(cls, cfg: PipelineConfig, model_dir: Path) -> "RewardModelScorer":
        from transformers import AutoConfig, AutoTokenizer

        architectures = AutoConfig.from_pretrained(model_dir).architectures or []
        likelihood = any(name.endswith("ForCausalLM") for name in architectures)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        kind = "causal_lm" if likelihood else "reward"
        group = start_policy_group(cfg, model_dir, None, 1, tokenizer.pad_token_id, kind)
        return cls(group, tokenizer, cfg.reward_model.max_seq_len, likelihood)

    def scores(self, conversations: list[list[Message]]) -> list[float]:
        examples = [tokenize_conversation(self.tokenizer, list(log), self.max_len) for log in conversations]
        outputs = self.group.forward(examples)
        if not self.likelihood:
            return [float(score) for score in outputs]
        return [float((out * torch.tensor(e.loss_mask, dtype=out.dtype)).sum()) for out, e in zip(outputs, examples)]

    def rewards(self, conversations: list[list[Message]]) -> list[float]:
        return torch.sigmoid(torch.tensor(self.scores(conversations), dtype=torch.float64)).tolist()

    def shutdown(self) -> None:
        self.group.shutdown()
