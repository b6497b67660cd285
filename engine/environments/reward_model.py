"""Rewards from a trained scalar reward model (a sequence-classification head on the SFT model)."""

from __future__ import annotations

from typing import Any

import torch

from engine.environments.interfaces import EnvStepResult, Message


class RewardModelEnv:
    """Scores each finished conversation; reward = sigmoid(score), in (0, 1)."""

    def __init__(self, model_path: str, threads: int = 1):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1).eval()

    @torch.no_grad()
    def score(self, message_logs: list[list[Message]]) -> list[float]:
        texts = [self.tokenizer.apply_chat_template(log, tokenize=False) for log in message_logs]
        self.tokenizer.padding_side = "right"
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return self.model(**batch).logits[:, 0].float().tolist()

    def step(self, message_logs: list[list[Message]], metadata: list[dict[str, Any]]) -> EnvStepResult:
        rewards = [float(torch.sigmoid(torch.tensor(s))) for s in self.score(message_logs)]
        count = len(message_logs)
        return EnvStepResult([None] * count, rewards, [True] * count, [None] * count, [dict(m) for m in metadata])
