"""Multi-turn rollouts: generate, let the environment answer, repeat until every episode has ended.

An episode's token sequence is built from the generator's own token ids (never re-tokenized text), so
the trainer scores exactly the tokens that were sampled: generated tokens carry a loss mask of 1 and the
generator's logprobs; prompt and observation tokens carry a mask of 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.data.chat import Prompt, TokenizedExample, tokenize_observation, tokenize_prompt
from engine.environments.interfaces import Message
from engine.errors import DataError
from engine.generation.interfaces import SamplingParams

if TYPE_CHECKING:  # types only: rollouts also run on a worker and an environment driven in-process, without Ray
    from engine.environments.router import EnvironmentRouter
    from engine.generation.group import GenerationGroup


@dataclass
class Episode:
    group: int  # index of the prompt it answers (GRPO groups by it)
    prompt: Prompt  # as the dataset gives it: text or a conversation (reward functions get this form)
    messages: list[Message]  # the conversation so far, as environments see it (a text prompt is one user turn)
    token_ids: list[int]
    loss_mask: list[int]
    generation_logprobs: list[float]
    metadata: dict[str, Any]  # what environments read: the reference answer, the task, their own state
    columns: dict[str, Any] = field(default_factory=dict)  # the row's other columns, for reward functions
    row_id: int = 0  # the dataset row it answers (named in errors)
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

    @property
    def completion(self) -> Prompt:
        """What was generated after the prompt, in the prompt's form (TRL's ``completions``)."""
        turns = self.messages[len(self.prompt) :] if isinstance(self.prompt, list) else self.messages[1:]
        if isinstance(self.prompt, list):
            return [dict(m) for m in turns]
        return "".join(m["content"] for m in turns)


def new_episodes(
    tokenizer, rows: list[dict[str, Any]], samples: int, default_task: str, row_ids: list[int] | None = None
) -> list[Episode]:
    """``samples`` episodes per normalized row (``engine.data.formats``); each carries its row's reference answer,
    task and other columns as the metadata environments and reward functions read."""
    episodes = []
    for index, row in enumerate(rows):
        prompt = row["prompt"]
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        prompt_ids = tokenize_prompt(tokenizer, prompt)
        metadata = {"answer": row.get("answer"), "task": row.get("task") or default_task}
        for _ in range(samples):
            episodes.append(
                Episode(
                    index,
                    prompt,
                    [dict(m) for m in messages],
                    list(prompt_ids),
                    [0] * len(prompt_ids),
                    [0.0] * len(prompt_ids),
                    dict(metadata),
                    row.get("columns", {}),
                    row_ids[index] if row_ids is not None else index,
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
    if max_turns > 1 and any(isinstance(e.prompt, str) for e in episodes):
        raise DataError("multi-turn rollouts (grpo.max_rollout_turns > 1) need conversational prompts")
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
