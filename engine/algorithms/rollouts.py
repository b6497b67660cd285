"""Multi-turn rollouts: generate, let the environment answer, repeat until every episode has ended.

An episode's token sequence is built from the generator's own token ids (never re-tokenized text), so
the trainer scores exactly the tokens that were sampled: generated tokens carry a loss mask of 1 and the
generator's logprobs; prompt and observation tokens carry a mask of 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.data.chat import TokenizedExample, prompt_messages, tokenize_observation, tokenize_prompt
from engine.environments.interfaces import Message
from engine.environments.router import EnvironmentRouter
from engine.generation.group import GenerationGroup
from engine.generation.interfaces import SamplingParams


@dataclass
class Episode:
    group: int  # index of the prompt it answers (GRPO groups by it)
    messages: list[Message]
    token_ids: list[int]
    loss_mask: list[int]
    generation_logprobs: list[float]
    metadata: dict[str, Any]
    reward: float = 0.0
    turns: int = 0
    truncated: bool = False
    done: bool = False
    generated_tokens: list[int] = field(default_factory=list)

    def example(self, **scalars: float) -> TokenizedExample:
        return TokenizedExample(
            self.token_ids,
            self.loss_mask,
            token_values={"generation_logprobs": self.generation_logprobs},
            scalars=dict(scalars),
        )


def new_episodes(tokenizer, rows: list[dict[str, Any]], samples: int, system_prompt: str | None) -> list[Episode]:
    episodes = []
    for index, row in enumerate(rows):
        messages = prompt_messages(row["prompt"], system_prompt)
        prompt_ids = tokenize_prompt(tokenizer, messages)
        metadata = {"answer": row["answer"], "task": row.get("task", "arithmetic")}
        for _ in range(samples):
            episodes.append(
                Episode(
                    index,
                    [dict(m) for m in messages],
                    list(prompt_ids),
                    [0] * len(prompt_ids),
                    [0.0] * len(prompt_ids),
                    dict(metadata),
                )
            )
    return episodes


def run_rollouts(
    episodes: list[Episode],
    generation: GenerationGroup,
    router: EnvironmentRouter,
    tokenizer,
    params: SamplingParams,
    max_turns: int,
) -> list[Episode]:
    """Play every episode to its end (environment says so, a turn was cut by length, or max_turns)."""
    for turn in range(max_turns):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        seed = None if params.seed is None else params.seed * 1009 + turn
        outputs = generation.generate([e.token_ids for e in active], params.model_copy(update={"n": 1, "seed": seed}))
        for episode, (completion,) in zip(active, outputs):
            episode.token_ids += completion.token_ids
            episode.loss_mask += [1] * len(completion.token_ids)
            episode.generation_logprobs += completion.logprobs
            episode.generated_tokens += completion.token_ids
            episode.messages.append({"role": "assistant", "content": completion.text})
            episode.turns += 1
            episode.truncated = completion.finish_reason == "length"
        result = router.step([e.messages for e in active], [e.metadata for e in active])
        for i, episode in enumerate(active):
            episode.reward += result.rewards[i]
            episode.metadata = result.metadata[i]
            observation = result.observations[i]
            if result.terminated[i] or episode.truncated or observation is None or turn == max_turns - 1:
                episode.done = True
                continue
            observed = tokenize_observation(tokenizer, episode.messages, observation)
            episode.messages.append(observation)
            episode.token_ids += observed
            episode.loss_mask += [0] * len(observed)
            episode.generation_logprobs += [0.0] * len(observed)
    return episodes


def greedy_accuracy(
    generation: GenerationGroup,
    router: EnvironmentRouter,
    tokenizer,
    rows: list[dict[str, Any]],
    max_new_tokens: int,
    max_turns: int,
    system_prompt: str | None,
) -> float:
    """pass@1 with greedy decoding: the share of held-out prompts answered exactly."""
    episodes = new_episodes(tokenizer, rows, 1, system_prompt)
    params = SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens, seed=0)
    run_rollouts(episodes, generation, router, tokenizer, params, max_turns)
    return sum(e.reward > 0.5 for e in episodes) / max(1, len(episodes))
