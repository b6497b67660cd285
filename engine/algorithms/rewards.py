"""The reward of an episode: its environment's (a verifier), the user's reward functions, a trained reward model.

The reward model runs as a frozen trainer group. Its head decides the score: a sequence-classification head gives
one scalar per conversation; a causal LM (the ``likelihood`` head of ``engine.algorithms.rm``) scores the response
by its summed token log-likelihood. Either way its reward is sigmoid(score), in (0, 1).
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.algorithms.rollouts import Episode
from engine.config import PipelineConfig
from engine.data.chat import Prompt, tokenize_example
from engine.environments.reward_functions import RewardFunctions
from engine.models.loading import ModelSource, local_folder
from engine.policy.group import PolicyGroup, start_policy_group
from engine.user_code import UserCodeError


class RewardModelScorer:
    def __init__(self, group: PolicyGroup, tokenizer, max_len: int, likelihood: bool):
        self.group, self.tokenizer, self.max_len, self.likelihood = group, tokenizer, max_len, likelihood

    @classmethod
    def start(cls, cfg: PipelineConfig, model: ModelSource | Path) -> "RewardModelScorer":
        from transformers import AutoConfig, AutoTokenizer

        folder = local_folder(model)
        architectures = AutoConfig.from_pretrained(folder).architectures or []
        likelihood = any(name.endswith("ForCausalLM") for name in architectures)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        kind = "causal_lm" if likelihood else "reward"
        group = start_policy_group(cfg, model, None, 1, tokenizer.pad_token_id, kind)
        return cls(group, tokenizer, cfg.reward_model.max_seq_len, likelihood)

    def scores(self, prompts: list[Prompt], completions: list[Prompt]) -> list[float]:
        """Scores of responses, tokenized as the reward model was trained (``engine.data.preferences``)."""
        examples = [tokenize_example(self.tokenizer, p, c, self.max_len) for p, c in zip(prompts, completions)]
        outputs = self.group.forward(examples)
        if not self.likelihood:
            return [float(score) for score in outputs]
        return [float((out * torch.tensor(e.loss_mask, dtype=out.dtype)).sum()) for out, e in zip(outputs, examples)]

    def rewards(self, prompts: list[Prompt], completions: list[Prompt]) -> list[float]:
        return torch.sigmoid(torch.tensor(self.scores(prompts, completions), dtype=torch.float64)).tolist()

    def shutdown(self) -> None:
        self.group.shutdown()


class EpisodeRewards:
    """The reward of finished episodes, as GRPO trains on it and evaluate reports it:

        reward = verifier_weight * environment reward + sum_i weight_i * function_i + w_rm * sigmoid(RM score)

    A reward function's ``None`` (not applicable) adds nothing. Each part's mean is a metric (``reward/<name>``).
    An episode a reward function failed on is marked failed: callers train on none of its group and score none of
    it; failed groups are counted over the run, and past ``max_failed_groups`` the run stops in one line naming the
    first failure."""

    def __init__(
        self,
        verifier_weight: float,
        functions: RewardFunctions | None = None,
        reward_model: RewardModelScorer | None = None,
        reward_model_weight: float = 0.0,
        max_failed_groups: int = 0,
    ):
        self.verifier_weight, self.functions = verifier_weight, functions
        self.reward_model, self.reward_model_weight = reward_model, reward_model_weight
        self.max_failed_groups, self.failed_groups = max_failed_groups, 0

    def __call__(self, episodes: list[Episode]) -> tuple[torch.Tensor, dict[str, float], list[bool]]:
        """Rewards, their parts' means, and which episodes failed."""
        environment = torch.tensor([e.reward for e in episodes], dtype=torch.float64)
        total = environment * self.verifier_weight
        metrics = {"reward/environment": float(environment.mean())}
        failures: list[str | None] = [e.metadata.get("failed") for e in episodes]  # an environment that failed
        if self.functions is not None:
            scored = self.functions.score(
                [e.prompt for e in episodes],
                [e.completion for e in episodes],
                [e.columns for e in episodes],
                [e.row_id for e in episodes],
            )
            failures = [env or function for env, function in zip(failures, scored.failures)]
            for name, values in scored.values.items():
                applicable = [v for v in values if v is not None]
                total += self.functions.weights[name] * torch.tensor([v or 0.0 for v in values], dtype=torch.float64)
                metrics[f"reward/{name}"] = sum(applicable) / len(applicable) if applicable else 0.0
        self._count(episodes, failures)
        metrics["reward/failed_groups"] = float(len({e.group for e, why in zip(episodes, failures) if why}))
        if self.reward_model is not None:
            rewards = self.reward_model.rewards([e.prompt for e in episodes], [e.completion for e in episodes])
            scores = torch.tensor(rewards, dtype=torch.float64)
            total += self.reward_model_weight * scores
            metrics["reward/reward_model"] = float(scores.mean())
        return total.float(), metrics, [why is not None for why in failures]

    def _count(self, episodes: list[Episode], failures: list[str | None]) -> None:
        groups = {e.group for e, why in zip(episodes, failures) if why}
        self.failed_groups += len(groups)
        if self.failed_groups > self.max_failed_groups:
            first = next(why for why in failures if why)
            over = f" ({self.failed_groups} groups failed; grpo.max_failed_groups={self.max_failed_groups})"
            raise UserCodeError(first + (over if self.max_failed_groups else ""))
