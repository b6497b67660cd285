"""Measurements every RL step reports, as pure tensor functions."""

from __future__ import annotations

import torch

from engine.algorithms.losses import masked_mean


def logprob_agreement(trainer_logprobs: torch.Tensor, generator_logprobs: torch.Tensor, mask: torch.Tensor) -> dict:
    """How far the generator's logprobs of the sampled tokens are from the trainer's.

    ``token_mult_prob_error`` = masked mean of exp(|trainer - generator|): 1.0 when they agree exactly;
    a stale refit or a precision mismatch shows up here first.
    """
    diff = (trainer_logprobs.double() - generator_logprobs.double()).abs()
    valid = mask.bool()
    return {
        "token_mult_prob_error": float(masked_mean(torch.exp(diff), valid)) if valid.any() else 1.0,
        "logprob_max_abs_diff": float(diff[valid].max()) if valid.any() else 0.0,
    }
