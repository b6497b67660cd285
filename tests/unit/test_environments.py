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
