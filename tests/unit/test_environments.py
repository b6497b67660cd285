"""Environments: answer extraction, the safe calculator (hostile input included), multi-turn tool flow."""

import pytest

from engine.environments.calculator import CalculatorToolEnv, calculate
from engine.environments.math_verifier import MathVerifierEnv, extract_answer


@pytest.mark.parametrize(
    "text,answer",
    [
        ("82", "82"),
        ("The answer is 82.", "82"),
        ("082", "82"),
        ("-5", "-5"),
        ("5.0", "5"),
        ("no digits", None),
        ("<calc>1+2</calc> so 3", "3"),
        ("7 then 9", "9"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_math_verifier_rewards_exact_answers_only():
    env = MathVerifierEnv()
    logs = [[{"role": "assistant", "content": c}] for c in ("82", "83", "", "8 2")]
    result = env.step(logs, [{"answer": "82"}] * 4)
    assert result.rewards == [1.0, 0.0, 0.0, 0.0]
    assert all(result.terminated) and result.observations == [None] * 4


@pytest.mark.parametrize(
    "expression,result",
    [
        ("37+45", "82"),
        ("(2+3)*4", "20"),
        ("-7*-3", "21"),
        ("17//5", "3"),
        ("17/5", "3"),
        ("17%5", "2"),
        (" 1 + 1 ", "2"),
    ],
)
def test_calculator_arithmetic(expression, result):
    assert calculate(expression) == result


@pytest.mark.parametrize(
    "hostile",
    [
        "__import__('os').system('echo pwned')",
        "open('/etc/passwd').read()",
        "2**100000000",
        "9" * 80,
        "1/0",
        "().__class__",
        "lambda: 1",
        "[1,2]",
        "1.5+1",
        "'a'*3",
        "",
        "a+b",
        "1;2",
        "((((((1))))))" * 10,
    ],
)
def test_calculator_refuses_hostile_input_without_raising(hostile):
    out = calculate(hostile)
    assert out.startswith("error:")


def test_calculator_bounds_magnitude():
    assert calculate("999999*999999*999999") == "error: number too large"


def test_tool_env_multi_turn_flow():
    env = CalculatorToolEnv(max_turns=3)
    meta = [{"answer": "82", "task": "arithmetic"}]
    log = [{"role": "user", "content": "What is 37+45?"}, {"role": "assistant", "content": "<calc>37+45</calc>"}]
    first = env.step([log], meta)
    assert first.observations == [{"role": "tool", "content": "82"}] and first.terminated == [False]
    assert first.metadata[0]["tool_calls"] == 1 and first.metadata[0]["tool_errors"] == 0
    log += [first.observations[0], {"role": "assistant", "content": "82"}]
    final = env.step([log], first.metadata)
    assert final.terminated == [True] and final.rewards == [1.0]


def test_tool_env_turn_limit_and_bad_calls():
    env = CalculatorToolEnv(max_turns=1)
    log = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<calc>37+45</calc>"}]
    result = env.step([log], [{"answer": "82"}])
    assert result.terminated == [True] and result.rewards == [0.0]  # out of turns, no final answer
    env = CalculatorToolEnv(max_turns=3)
    log = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<calc>import os</calc>"}]
    result = env.step([log], [{"answer": "82"}])
    assert result.observations[0]["content"].startswith("error:") and result.metadata[0]["tool_errors"] == 1


def test_reward_model_env_scores_by_likelihood_or_scalar_head(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from engine.environments.reward_model import RewardModelEnv

    conversation = [{"role": "user", "content": "What is 12+30?"}, {"role": "assistant", "content": "42"}]
    likelihood = RewardModelEnv(str(tiny_model_dir))
    assert likelihood.likelihood
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    answer = tokenizer("42", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    prompt = tokenizer.apply_chat_template(conversation[:1], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids + answer
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
    expected = sum(float(logprobs[len(ids) - len(answer) - 1 + k, t]) for k, t in enumerate(answer))
    assert likelihood.score([conversation])[0] == pytest.approx(expected, abs=1e-4)

    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    scalar = RewardModelEnv(str(tmp_path))
    assert not scalar.likelihood
    one, two = scalar.score([conversation, conversation[:1] + [{"role": "assistant", "content": "41"}]])
    assert one != two
    result = scalar.step([conversation], [{"task": "math"}])
    assert 0.0 < result.rewards[0] < 1.0 and result.terminated == [True]
