"""The user's reward functions in their Ray actor: a function from a file the actor could not import by name (it
travels by value), and one that hangs past grpo.reward_timeout_s (its batch fails, the actor is replaced)."""

from __future__ import annotations

from engine.config import RewardFunctionConfig
from engine.environments.reward_functions import RewardFunctions


def test_a_file_function_runs_in_its_actor_and_a_hung_one_fails_its_batch_only(ray_local, tmp_path):
    code = tmp_path / "my_rewards.py"
    code.write_text(
        "import time\n"
        "SLOW = {'wait': 0}\n"
        "def length(prompts, completions, **columns):\n"
        "    return [float(len(c)) for c in completions]\n"
        "def sleepy(prompts, completions, **columns):\n"
        "    if any('slow' in c for c in completions):\n"
        "        time.sleep(30)\n"
        "    return [0.0 for c in completions]\n"
    )
    specs = [RewardFunctionConfig(function=f"{code}:length"), RewardFunctionConfig(function=f"{code}:sleepy")]
    functions = RewardFunctions(specs, timeout_s=3.0)
    try:
        fine = functions.score(["p", "q"], ["ab", "abc"], [{}, {}], [0, 1])
        assert fine.values == {"length": [2.0, 3.0], "sleepy": [0.0, 0.0]} and fine.failures == [None, None]
        hung = functions.score(["p"], ["slow"], [{}], [7])
        assert hung.failures == ["reward functions (length, sleepy) did not answer within 3 s (grpo.reward_timeout_s)"]
        again = functions.score(["p"], ["abcd"], [{}], [8])  # a fresh actor answers the next batch
        assert again.values["length"] == [4.0] and again.failures == [None]
    finally:
        functions.shutdown()


def test_a_user_environment_that_raises_or_hangs_fails_its_rows_and_is_replaced(ray_local, tmp_path):
    from engine.environments.router import EnvironmentRouter

    code = tmp_path / "my_envs.py"
    code.write_text(
        "import time\n"
        "from engine.environments.interfaces import EnvStepResult\n"
        "class Moody:\n"
        "    def step(self, logs, metadata):\n"
        "        reply = logs[0][-1]['content']\n"
        "        if reply == 'raise':\n"
        "            raise ValueError('no')\n"
        "        if reply == 'hang':\n"
        "            time.sleep(30)\n"
        "        n = len(logs)\n"
        "        return EnvStepResult([None] * n, [1.0] * n, [True] * n, [None] * n, [dict(m) for m in metadata])\n"
    )
    router = EnvironmentRouter(
        {"moody": f"{code}:Moody", "math": "engine.environments.math_verifier:MathVerifierEnv"}, timeout_s=3.0
    )
    try:

        def step(reply: str):
            logs = [[{"role": "assistant", "content": reply}], [{"role": "assistant", "content": "4"}]]
            return router.step(logs, [{"task": "moody"}, {"task": "math", "answer": "4"}])

        assert step("fine").rewards == [1.0, 1.0] and "failed" not in step("fine").metadata[0]
        raised = step("raise")
        assert raised.metadata[0]["failed"] == f"environment {code}:Moody (task 'moody') raised ValueError: no"
        assert raised.rewards == [0.0, 1.0] and raised.terminated[0] and "failed" not in raised.metadata[1]
        hung = step("hang")
        assert hung.metadata[0]["failed"].endswith("did not answer within 3 s (grpo.environment_timeout_s)")
        assert step("fine").rewards == [1.0, 1.0]  # a fresh actor took the hung one's place
    finally:
        router.shutdown()
