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
