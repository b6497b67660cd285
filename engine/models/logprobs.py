"""Token logprobs from a causal LM's logits: the one definition trainers, scorers and tests share."""

from __future__ import annotations

import torch


def token_logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t), [B, L-1], in fp32 (bf16 log_softmax is 5-10x less accurate)."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
