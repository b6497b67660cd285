"""Advantages and reward shaping, as pure tensor functions.

Statistics are computed in float64 and cast back, so rewards of tiny or huge magnitude stay finite
(squares of 1e30 overflow float32).
"""

from __future__ import annotations

import torch


def group_baseline(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    valid: torch.Tensor | None = None,
    leave_one_out: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample baseline and std from the sample's group (e.g. the n generations of one prompt).

    With leave-one-out, a sample's statistics are over the *other* valid samples of its group; an invalid
    sample never enters anyone's statistics. A group with fewer than two valid samples yields
    baseline = the sample's own reward (or the lone valid reward) and std = 0: no signal, no advantage.
    The std is the unbiased one, 0 where fewer than two values are available.
    """
    r = rewards.to(torch.float64)
    valid = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.bool()
    baseline = r.clone()
    std = torch.zeros_like(r)
    for group in torch.unique(group_ids):
        members = (group_ids == group).nonzero(as_tuple=True)[0]
        member_valid = valid[members]
        values = r[members][member_valid]
        if values.numel() < 2:
            if values.numel() == 1:
                baseline[members] = values[0]
            continue
        if not leave_one_out:
            baseline[members] = values.mean()
            std[members] = values.std(unbiased=True)
            continue
        for position, index in enumerate(members.tolist()):
            others_mask = member_valid.clone()
            others_mask[position] = False
            others = r[members][others_mask]
            baseline[index] = others.mean()
            std[index] = others.std(unbiased=True) if others.numel() > 1 else 0.0
    return baseline.to(rewards.dtype), std.to(rewards.dtype)


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    valid: torch.Tensor | None = None,
    leave_one_out: bool = True,
    normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """A = r - group baseline, divided by (std + eps) only where the group has spread."""
    baseline, std = group_baseline(rewards, group_ids, valid, leave_one_out)
    advantages = rewards.to(torch.float64) - baseline.to(torch.float64)
    if normalize:
        std64 = std.to(torch.float64)
        advantages = torch.where(std64 > 0, advantages / (std64 + eps), advantages)
    return advantages.to(rewards.dtype)


def estimate_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, estimator: str, normalize: bool = False
) -> torch.Tensor:
    """Advantages by the named estimator: ``rloo`` (leave-one-out group baseline), ``grpo`` (group mean) or
    ``reinforce_pp`` (batch whitening)."""
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards)
    if estimator not in ("rloo", "grpo"):
        raise ValueError(f"estimate_advantages: unknown estimator {estimator!r}")
    return grpo_advantages(rewards, group_ids, leave_one_out=estimator == "rloo", normalize=normalize)


def reinforce_pp_advantages(
    rewards: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """REINFORCE++: whiten rewards over the whole batch (valid samples set the statistics)."""
    r = rewards.to(torch.float64)
    valid = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.bool()
    values = r[valid]
    if values.numel() < 2:
        return torch.zeros_like(rewards)
    return ((r - values.mean()) / (values.std(unbiased=True) + eps)).to(rewards.dtype)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft length penalty: 0 up to max_length - buffer, then falling linearly to -penalty at max_length,
    and -penalty beyond it (a stop token past the limit is no worse than the limit)."""
    if buffer <= 0:
        raise ValueError("overlong_penalty: buffer must be positive")
    excess = lengths.to(torch.float64) - (max_length - buffer)
    return torch.clamp(-excess / buffer * penalty, min=-penalty, max=0.0).to(torch.get_default_dtype())


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each row's response tokens (``mask`` 1), the sequence's reward arriving
    at its last one; the value after the last is 0 (the episode ended). Tokens off the mask (prompt, a tool's
    observation, padding) are skipped: the next response token is the next step. Returns per-token advantages and
    returns (advantage + value), 0 off the mask; [B, T] like ``values``.

        delta_k = r_k + gamma * V_{k+1} - V_k        A_k = delta_k + gamma * lam * A_{k+1}
    """
    v = values.to(torch.float64)
    valid = mask.bool()
    last = valid.shape[1] - 1 - valid.flip(1).to(torch.int64).argmax(1)  # each row's last response token
    next_value = torch.zeros(v.shape[0], dtype=torch.float64)
    next_advantage = torch.zeros_like(next_value)
    advantages = torch.zeros_like(v)
    positions = torch.arange(v.shape[1])
    for t in range(v.shape[1] - 1, -1, -1):
        on = valid[:, t]
        reward = torch.where(positions[t] == last, rewards.to(torch.float64), torch.zeros_like(next_value))
        delta = reward + gamma * next_value - v[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(on, advantage, torch.zeros_like(advantage))
        next_value = torch.where(on, v[:, t], next_value)
        next_advantage = torch.where(on, advantage, next_advantage)
    returns = torch.where(valid, advantages + v, torch.zeros_like(v))
    return advantages.to(values.dtype), returns.to(values.dtype)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean) / (std + eps) over the masked entries; 0 off the mask."""
    valid = mask.bool()
    x = values.to(torch.float64)
    selected = x[valid]
    if selected.numel() < 2:
        return torch.zeros_like(values)
    whitened = (x - selected.mean()) / (selected.std(unbiased=True) + eps)
    return torch.where(valid, whitened, torch.zeros_like(whitened)).to(values.dtype)
