"""Environments: answers checked by value, the safe calculator (hostile input included), multi-turn tool flow."""

import pytest

from engine.environments.calculator import CalculatorToolEnv, calculate
from engine.environments.math_verifier import MathVerifierEnv, is_correct


@pytest.mark.parametrize(
    "reply,reference,correct",
    [
        ("82", "82", True),
        ("The answer is 82.", "82", True),
        ("082", "82", True),
        ("-5", "-5", True),
        ("5.0", "5", True),
        ("no digits", "5", False),
        ("<calc>1+2</calc> so 3", "3", True),
        ("<calc>3</calc>", "3", False),  # a tool call is not an answer
        ("7 then 9", "9", True),  # the final answer counts
        ("1,000", "1000", True),  # thousands separators
        ("1000", "1,000", True),
        ("9007199254740993", "9007199254740992", False),  # exact beyond 2^53
        ("٨٢", "82", False),  # non-ASCII digits are not a number
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("72", "Natalia sold 24 clips.\n#### 72", True),
        ("8 2", "82", False),
    ],
)
def test_answers_are_compared_by_value(reply, reference, correct):
    assert is_correct(reply, reference) is correct


def test_math_verifier_rewards_exact_answers_only():
    env = MathVerifierEnv()
    logs = [[{"role": "assistant", "content": c}] for c in ("82", "83", "", "8 2")]
    result = env.step(logs, [{"answer": "82"}] * 4)
    assert result.rewards == [1.0, 0.0, 0.0, 0.0]
    assert all(result.terminated) and result.observations == [None] * 4
    assert not any("unscored" in meta for meta in result.metadata)


def test_a_row_without_a_readable_reference_is_unscored_not_wrong():
    logs = [[{"role": "assistant", "content": "82"}]] * 2
    result = MathVerifierEnv().step(logs, [{"answer": None}, {"answer": "no number here"}])
    assert result.rewards == [0.0, 0.0] and [m.get("unscored") for m in result.metadata] == [True, True]


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
    env = CalculatorToolEnv()
    meta = [{"answer": "82", "task": "calculator"}]
    log = [{"role": "user", "content": "What is 37+45?"}, {"role": "assistant", "content": "<calc>37+45</calc>"}]
    first = env.step([log], meta)
    assert first.observations == [{"role": "tool", "content": "82"}] and first.terminated == [False]
    assert first.metadata[0]["tool_calls"] == 1 and first.metadata[0]["tool_errors"] == 0
    log += [first.observations[0], {"role": "assistant", "content": "82"}]
    final = env.step([log], first.metadata)
    assert final.terminated == [True] and final.rewards == [1.0]


def test_tool_env_answers_a_bad_call_with_an_error():  # the turn limit is the rollout's (test_rollouts)
    env = CalculatorToolEnv()
    log = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<calc>import os</calc>"}]
    result = env.step([log], [{"answer": "82"}])
    assert result.observations[0]["content"].startswith("error:") and result.metadata[0]["tool_errors"] == 1


def test_calculator_answers_every_failure_as_a_tool_error(monkeypatch):
    """The contract is 'never an exception', not the length cap: with the cap lifted, deep nesting (which makes
    Python's parser raise MemoryError or RecursionError) is still an answer."""
    from engine.environments import calculator

    monkeypatch.setattr(calculator, "MAX_EXPRESSION_CHARS", 10**7)
    for hostile in ("(" * 100_000 + "1" + ")" * 100_000, "-" * 1_000_000 + "1", "1" + "+1" * 300_000):
        assert calculate(hostile).startswith("error:")
