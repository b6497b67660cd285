"""A trained reward model as a frozen trainer group: the likelihood head sums the response's token logprobs,
the scalar head reads one score, and the reward is sigmoid(score)."""

import math

import pytest
import torch

from engine.algorithms.rewards import RewardModelScorer
from engine.config import load_config

CONVERSATION = [{"role": "user", "content": "What is 12+30?"}, {"role": "assistant", "content": "42"}]


def test_likelihood_and_scalar_heads(ray_local, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cfg = load_config(None, {"policy.world_size": 1})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    answer = tokenizer("42", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    prompt = tokenizer.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids + answer
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
    expected = sum(float(logprobs[len(ids) - len(answer) - 1 + k, t]) for k, t in enumerate(answer))

    likelihood = RewardModelScorer.start(cfg, tiny_model_dir)
    try:
        assert likelihood.likelihood and not likelihood.group.trainable
        assert likelihood.scores([CONVERSATION[:1]], [CONVERSATION[1:]])[0] == pytest.approx(expected, abs=1e-4)
        reward = 1 / (1 + math.exp(-expected))
        assert likelihood.rewards([CONVERSATION[:1]], [CONVERSATION[1:]])[0] == pytest.approx(reward, abs=1e-6)
    finally:
        likelihood.shutdown()

    head = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    head.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    wrong = CONVERSATION[:1] + [{"role": "assistant", "content": "41"}]
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in (CONVERSATION, wrong)]
    batch = tokenizer(texts, add_special_tokens=False)
    scalar = RewardModelScorer.start(cfg, tmp_path)
    try:
        assert not scalar.likelihood
        one, two = scalar.scores([CONVERSATION[:1]] * 2, [CONVERSATION[1:], wrong[1:]])
        with torch.no_grad():
            want = [float(head(input_ids=torch.tensor([row])).logits[0, 0]) for row in batch.input_ids]
        assert [one, two] == pytest.approx(want, abs=1e-4) and one != two
    finally:
        scalar.shutdown()
