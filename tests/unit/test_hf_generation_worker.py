"""The transformers generation worker in this process (no Ray): the logprobs it returns are the model's before
temperature, as the trainer computes them, and a stop token ends a completion and stays in it."""

from __future__ import annotations

import pytest
import torch

from engine.data.chat import tokenize_prompt
from engine.generation.hf import HFGenerationWorker
from engine.generation.interfaces import SamplingParams


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    return HFGenerationWorker(str(tiny_model_dir))


@pytest.fixture(scope="module")
def prompt(worker):
    return tokenize_prompt(worker.tokenizer, [{"role": "user", "content": "What is 12+30?"}])


def test_logprobs_are_taken_before_temperature(worker, prompt):
    (samples,) = worker.generate([prompt], SamplingParams(n=3, temperature=3.0, max_tokens=6, seed=1))
    for completion in samples:
        ids = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            logits = worker.model(ids).logits[0, len(prompt) - 1 : -1].float()
        sampled = torch.tensor(completion.token_ids)[:, None]
        raw = torch.log_softmax(logits, -1).gather(-1, sampled).squeeze(-1)
        tempered = torch.log_softmax(logits / 3.0, -1).gather(-1, sampled).squeeze(-1)
        assert torch.allclose(torch.tensor(completion.logprobs), raw, atol=1e-5)
        assert not torch.allclose(raw, tempered, atol=1e-3)  # the check can tell the two apart


def test_a_stop_token_ends_the_completion_and_is_kept(worker, prompt):
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=6, seed=0)
    (free,) = worker.generate([prompt], greedy)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 6
    stop = free.token_ids[2]
    (stopped,) = worker.generate([prompt], greedy.model_copy(update={"stop_token_ids": [stop]}))[0]
    first = free.token_ids.index(stop)
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.token_ids[-1] == stop and len(stopped.logprobs) == len(stopped.token_ids)
