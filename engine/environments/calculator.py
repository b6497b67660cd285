"""A multi-turn tool environment: the model may call a calculator with ``<calc>EXPR</calc>``.

The environment answers a call with the result as the next ``tool`` turn; the episode ends on a reply
without a call (graded by the math verifier), or at the rollout's turn limit (a call scores 0). Model text is
never evaluated: expressions are parsed by ``ast`` into a whitelist of integer arithmetic, with bounded
size and magnitude.
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Any

from engine.environments.interfaces import EnvStepResult, Message
from engine.environments.math_verifier import is_correct

CALL = re.compile(r"<calc>(.*?)</calc>", re.S)
MAX_EXPRESSION_CHARS = 64
MAX_MAGNITUDE = 10**12
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class CalculatorError(ValueError):
    pass


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        value = node.value
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalculatorError("division by zero")
        value = _BINARY[type(node.op)](left, right)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand))
    else:
        raise CalculatorError("only integers, + - * // % and parentheses are allowed")
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("number too large")
    return value


def calculate(expression: str) -> str:
    """The result of a safe integer expression, or 'error: ...' (a tool answer, never an exception)."""
    expression = expression.strip().replace("/", "//").replace("////", "//")
    if not expression or len(expression) > MAX_EXPRESSION_CHARS:
        return "error: expression empty or too long"
    try:
        return str(_evaluate(ast.parse(expression, mode="eval")))
    except Exception as exc:  # noqa: BLE001 - every failure is a tool answer (deep nesting: MemoryError, ...)
        reason = str(exc) if isinstance(exc, CalculatorError) else "not an arithmetic expression"
        return f"error: {reason}"


class CalculatorToolEnv:
    def step(self, message_logs: list[list[Message]], metadata: list[dict[str, Any]]) -> EnvStepResult:
        result = EnvStepResult([], [], [], [], [])
        for log, meta in zip(message_logs, metadata):
            meta = dict(meta)
            reply = log[-1]["content"]
            call = CALL.search(reply)
            if call:
                answer = calculate(call.group(1))
                meta["tool_calls"] = meta.get("tool_calls", 0) + 1
                meta["tool_errors"] = meta.get("tool_errors", 0) + answer.startswith("error")
                result.observations.append({"role": "tool", "content": answer})
                result.rewards.append(0.0)
                result.terminated.append(False)
            else:
                correct = is_correct(reply, meta["answer"])
                result.observations.append(None)
                result.rewards.append(float(correct))
                result.terminated.append(True)
            result.next_stop_strings.append(None)
            result.metadata.append(meta)
        return result
