"""Every training loss of posttrain, as pure tensor functions.

Inputs are aligned per token: ``[batch, tokens]`` logprobs of the sampled (or target) tokens and a 0/1
``mask`` of the same shape. No Ray, Prefect or I/O here: controllers hand in tensors and the *global*
normalizers of the whole training step, so that the losses of a step's micro-batches (and data-parallel
shards) add up to the loss of the whole step, whatever way the step is split.

Masked positions never leak into a result: they are selected out with ``torch.where`` rather than
multiplied by zero, so a NaN or inf in padding cannot poison the sum.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from engine.config import PolicyLossConfig
from engine.data.batching import MicroBatch

Metrics = dict[str, float]


def _masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    selected = torch.where(mask.bool(), values, torch.zeros_like(values))
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, global_normalizer: float | torch.Tensor | None = None
) -> torch.Tensor:
    """sum(values * mask) / (global_normalizer or sum(mask)); exactly 0 when nothing is selected."""
    total = _masked_sum(values, mask)
    normalizer = mask.sum() if global_normalizer is None else torch.as_tensor(global_normalizer)
    normalizer = normalizer.to(total.dtype)
    if float(normalizer) == 0.0:
        return total * 0.0
    return total / normalizer


def kl_penalty(
    logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    kind: Literal["k1", "k2", "k3"] = "k3",
    input_clamp: float | None = 20.0,
    output_clamp: float | None = 10.0,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) (Schulman's k1/k2/k3) from the sampled tokens' logprobs.

    ``torch.clamp`` passes no gradient where it clamps, which is exactly the contract: a token whose
    log-ratio was clamped contributes a constant, not a gradient.
    """
    d = reference_logprobs - logprobs
    if input_clamp is not None:
        d = torch.clamp(d, -input_clamp, input_clamp)
    if kind == "k1":
        kl = -d
    elif kind == "k2":
        kl = d.pow(2) / 2
    elif kind == "k3":
        kl = torch.exp(d) - d - 1
    else:
        raise ValueError(f"kl_penalty: unknown kind {kind!r}; expected k1, k2 or k3")
    if output_clamp is not None:
        kl = torch.clamp(kl, -output_clamp, output_clamp)
    return kl


def _sequence_mean_loss(
    per_token: torch.Tensor, mask: torch.Tensor, global_valid_seqs: float | torch.Tensor | None
) -> torch.Tensor:
    tokens_per_seq = mask.sum(-1)
    has_tokens = tokens_per_seq > 0
    seq_means = _masked_sum(per_token, mask, dim=-1) / tokens_per_seq.clamp(min=1).to(per_token.dtype)
    return masked_mean(seq_means, has_tokens, global_valid_seqs)


def _importance_weights(
    prev_logprobs: torch.Tensor, generation_logprobs: torch.Tensor, cfg: PolicyLossConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Off-policy correction between the generator's and the trainer's old policy (always detached)."""
    w = torch.exp(prev_logprobs - generation_logprobs).detach()
    low = torch.full_like(
        w, cfg.is_min if cfg.is_min is not None else (0.0 if cfg.importance_sampling == "tis" else -torch.inf)
    )
    high = torch.full_like(w, cfg.is_max if cfg.is_max is not None else torch.inf)
    out_of_bounds = (w < low) | (w > high)
    if cfg.importance_sampling == "tis":
        w = torch.minimum(torch.maximum(w, low), high)
    else:  # icepop: drop tokens whose weight left the trust band
        w = torch.where(out_of_bounds, torch.zeros_like(w), w)
    return w, out_of_bounds


def clipped_pg_loss(
    logprobs: torch.Tensor,
    prev_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    *,
    reference_logprobs: torch.Tensor | None = None,
    generation_logprobs: torch.Tensor | None = None,
    global_valid_tokens: float | torch.Tensor | None = None,
    global_valid_seqs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO-clip policy-gradient loss with the GRPO/GSPO/REINFORCE variants and off-policy corrections.

    ``advantages`` may be per token ``[B, T]`` or per sequence ``[B]``.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)
    valid = mask.bool()

    if cfg.force_on_policy_ratio:
        log_ratio = logprobs - logprobs.detach()
    else:
        log_ratio = logprobs - prev_logprobs
    if cfg.sequence_level_ratio:
        tokens_per_seq = mask.sum(-1).clamp(min=1).to(log_ratio.dtype)
        seq_log_ratio = _masked_sum(log_ratio, mask, dim=-1) / tokens_per_seq
        log_ratio = seq_log_ratio[:, None].expand_as(logprobs)
    ratio = torch.exp(log_ratio)

    if cfg.disable_ppo_ratio:
        per_token = -advantages * logprobs
        clipped_active = torch.zeros_like(valid)
    else:
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1.0 - cfg.ratio_clip_min, 1.0 + cfg.ratio_clip_max)
        per_token = torch.maximum(unclipped, clipped)
        clipped_active = clipped > unclipped
        if cfg.ratio_clip_c is not None:
            dual_bound = -advantages * cfg.ratio_clip_c
            dual_active = (advantages < 0) & (dual_bound < per_token)
            per_token = torch.where(advantages < 0, torch.minimum(per_token, dual_bound), per_token)
            clipped_active = clipped_active | dual_active

    metrics: Metrics = {}
    if cfg.importance_sampling is not None:
        if generation_logprobs is None:
            raise ValueError("clipped_pg_loss: importance_sampling needs generation_logprobs")
        weights, out_of_bounds = _importance_weights(prev_logprobs, generation_logprobs, cfg)
        per_token = per_token * weights
        metrics["is_weight_mean"] = float(masked_mean(weights, valid))
        metrics["is_oob_fraction"] = float(masked_mean(out_of_bounds.to(logprobs.dtype), valid))

    if cfg.kl_beta > 0:
        if reference_logprobs is None:
            raise ValueError("clipped_pg_loss: kl_beta > 0 needs reference_logprobs")
        kl = kl_penalty(logprobs, reference_logprobs, cfg.kl_type, cfg.kl_input_clamp, cfg.kl_output_clamp)
        per_token = per_token + cfg.kl_beta * kl
        metrics["kl"] = float(masked_mean(kl.detach(), valid))
    elif reference_logprobs is not None:
        kl = kl_penalty(logprobs.detach(), reference_logprobs, cfg.kl_type, cfg.kl_input_clamp, cfg.kl_output_clamp)
        metrics["kl"] = float(masked_mean(kl, valid))

    if cfg.token_level_loss:
        loss = masked_mean(per_token, mask, global_valid_tokens)
    else:
        loss = _sequence_mean_loss(per_token, mask, global_valid_seqs)

    detached_ratio = ratio.detach()
    any_valid = bool(valid.any())
    metrics.update(
        {
            "clip_fraction": float(masked_mean(clipped_active.to(logprobs.dtype), valid)),
            "ratio_mean": float(masked_mean(detached_ratio, valid)),
            "ratio_min": float(detached_ratio[valid].min()) if any_valid else 1.0,
            "ratio_max": float(detached_ratio[valid].max()) if any_valid else 1.0,
            "approx_entropy": float(masked_mean(-logprobs.detach(), valid)),
            "valid_tokens": float(mask.sum()),
        }
    )
    return loss, metrics


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
    global_valid_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO's value loss: 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) per response token (the
    plain squared error without ``clip``), over the step's global count of valid tokens."""
    squared = (values - returns).pow(2)
    if clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        squared = torch.maximum(squared, (clipped - returns).pow(2))
    loss = masked_mean(0.5 * squared, mask, global_valid_tokens)
    valid = mask.bool()
    return loss, {"value_mean": float(masked_mean(values.detach(), valid)), "valid_tokens": float(mask.sum())}


def nll_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, global_valid_tokens: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Token-level negative log-likelihood, normalized by the step's global count of valid tokens."""
    return masked_mean(-logprobs, mask, global_valid_tokens)


def _pair_mean(values: torch.Tensor, global_valid_seqs: float | torch.Tensor | None) -> torch.Tensor:
    return masked_mean(values, torch.ones_like(values, dtype=torch.bool), global_valid_seqs)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    global_valid_seqs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """DPO on per-sequence summed logprobs; mean over pairs (or over the step's ``global_valid_seqs``)."""
    chosen_rewards = beta * (chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (rejected_logps - reference_rejected_logps)
    margin = chosen_rewards - rejected_rewards
    if loss_type == "sigmoid":
        per_pair = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    elif loss_type == "ipo":
        per_pair = (margin / beta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - margin)
    else:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; expected sigmoid, ipo or hinge")
    metrics = {
        "accuracy": float((margin > 0).float().mean()) if margin.numel() else 0.0,
        "reward_margin": float(margin.detach().mean()) if margin.numel() else 0.0,
        "chosen_reward": float(chosen_rewards.detach().mean()) if margin.numel() else 0.0,
        "rejected_reward": float(rejected_rewards.detach().mean()) if margin.numel() else 0.0,
    }
    return _pair_mean(per_pair, global_valid_seqs), metrics


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    *,
    global_valid_seqs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Reward-model pairwise loss: -logsigmoid(r_chosen - r_rejected - margin), mean over pairs."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    per_pair = -F.logsigmoid(diff)
    gap = (chosen_rewards - rejected_rewards).detach()
    metrics = {
        "accuracy": float((gap > 0).float().mean()) if gap.numel() else 0.0,
        "reward_margin": float(gap.mean()) if gap.numel() else 0.0,
        "chosen_reward": float(chosen_rewards.detach().mean()) if gap.numel() else 0.0,
        "rejected_reward": float(rejected_rewards.detach().mean()) if gap.numel() else 0.0,
    }
    return _pair_mean(per_pair, global_valid_seqs), metrics


class GRPOLoss:
    """The per-micro-batch loss; metrics are returned as sums so ranks and micro-batches add up."""

    def __init__(self, cfg: PolicyLossConfig):
        self.cfg = cfg

    def __call__(self, logprobs: torch.Tensor, batch: MicroBatch, normalizers: dict[str, float]):
        mask = batch["loss_mask"]
        prev_logprobs = batch.get("prev_logprobs")  # a forward pass before the step's first update, when it has several
        loss, metrics = clipped_pg_loss(
            logprobs,
            logprobs.detach() if prev_logprobs is None else prev_logprobs,
            batch["advantage"],
            mask,
            self.cfg,
            reference_logprobs=batch.get("reference_logprobs"),
            generation_logprobs=batch["generation_logprobs"],
            global_valid_tokens=normalizers["tokens"],
            global_valid_seqs=normalizers["sequences"],
        )
        valid = float(mask.sum())
        drift = torch.exp((logprobs.detach() - batch["generation_logprobs"]).abs())
        sums = {
            "clip_tokens": metrics["clip_fraction"] * valid,
            "entropy_sum": metrics["approx_entropy"] * valid,
            "token_mult_prob_error_sum": float(torch.where(mask.bool(), drift, 0.0).sum()),
            "valid_tokens": valid,
        }
        if "kl" in metrics:
            sums["kl_sum"] = metrics["kl"] * valid
        if "is_weight_mean" in metrics:
            sums["is_weight_sum"] = metrics["is_weight_mean"] * valid
            sums["is_oob_tokens"] = metrics["is_oob_fraction"] * valid
        return loss, sums


class ValueLoss:
    """The critic's per-micro-batch loss (``clipped_value_loss`` on the batch's ``returns`` and ``old_values``);
    metrics as sums, like ``GRPOLoss``."""

    def __init__(self, clip: float | None):
        self.clip = clip

    def __call__(self, values: torch.Tensor, batch: MicroBatch, normalizers: dict[str, float]):
        mask = batch["loss_mask"]
        loss, metrics = clipped_value_loss(
            values, batch["old_values"], batch["returns"], mask, self.clip, normalizers["tokens"]
        )
        valid = metrics["valid_tokens"]
        return loss, {"value_sum": metrics["value_mean"] * valid, "valid_tokens": valid}
