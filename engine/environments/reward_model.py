"""Rewards from a trained reward model: a sequence-classification head (scalar) or a causal LM whose score is
the response's summed token log-likelihood (see ``engine.algorithms.rm``); the saved architecture says which."""

from __future__ import annotations

from typing import Any

import torch

from engine.data.batching import collate
from engine.data.chat import tokenize_conversation
from engine.environments.interfaces import EnvStepResult, Message
from engine.policy.fsdp2 import token_logprobs_from_logits


class RewardModelEnv:
    """Scores each finished conversation; reward = sigmoid(score), in (0, 1)."""

    def __init__(self, model_path: str, threads: int = 1, max_len: int = 1024):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.max_len = max_len
        architectures = AutoConfig.from_pretrained(model_path).architectures or []
        self.likelihood = any(name.endswith("ForCausalLM") for name in architectures)
        model_cls = AutoModelForCausalLM if self.likelihood else AutoModelForSequenceClassification
        extra = {} if self.likelihood else {"num_labels": 1}
        self.model = model_cls.from_pretrained(model_path, dtype=torch.float32, **extra).eval()

    @torch.no_grad()
    def score(self, message_logs: list[list[Message]]) -> list[float]:
        examples = [tokenize_conversation(self.tokenizer, list(log), self.max_len) for log in message_logs]
        batch = collate(examples, self.tokenizer.pad_token_id)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if not self.likelihood:
            return out.logits[:, 0].float().tolist()
        token_logprobs = token_logprobs_from_logits(out.logits, batch["input_ids"])
        return (token_logprobs * batch["loss_mask"]).sum(-1).tolist()

    def step(self, message_logs: list[list[Message]], metadata: list[dict[str, Any]]) -> EnvStepResult:
        rewards = [float(torch.sigmoid(torch.tensor(s))) for s in self.score(message_logs)]
        count = len(message_logs)
        return EnvStepResult([None] * count, rewards, [True] * count, [None] * count, [dict(m) for m in metadata])
