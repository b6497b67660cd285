"""How the vLLM worker reads a request's output (no vLLM needed: its flat logprobs are plain lists)."""

from types import SimpleNamespace

import pytest

from engine.generation.vllm import sampled_logprobs


def flat(token_ids: list[int], logprobs: list[float], per_position: int = 1) -> SimpleNamespace:
    """vLLM's ``FlatLogprobs`` layout: entries of position i at start_indices[i]:end_indices[i]."""
    positions = len(token_ids) // per_position
    return SimpleNamespace(
        token_ids=token_ids,
        logprobs=logprobs,
        start_indices=[i * per_position for i in range(positions)],
        end_indices=[(i + 1) * per_position for i in range(positions)],
    )


def test_the_sampled_tokens_logprobs_are_read_in_order():
    assert sampled_logprobs(flat([5, 9, 2], [-0.1, -2.0, -0.5]), [5, 9, 2]) == [-0.1, -2.0, -0.5]
    assert sampled_logprobs(flat([], []), []) == []


@pytest.mark.parametrize(
    "output,tokens",
    [
        (flat([5, 7, 2], [-0.1, -2.0, -0.5]), [5, 9, 2]),  # another token's logprob at position 1
        (flat([5, 9], [-0.1, -2.0]), [5, 9, 2]),  # a position missing
        (flat([5, 1, 9, 1], [-0.1, -3.0, -2.0, -3.0], per_position=2), [5, 9]),  # top-k entries beside the sample
    ],
)
def test_logprobs_that_do_not_line_up_with_the_sampled_tokens_are_refused(output, tokens):
    with pytest.raises(RuntimeError, match="do not line up with the sampled tokens"):
        sampled_logprobs(output, tokens)
