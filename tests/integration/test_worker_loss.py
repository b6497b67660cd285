"""A generation worker's process killed between GRPO steps (SIGKILL, as an out-of-memory kill or a lost node
does): the controller restarts it, pushes the current weights, redoes the step's generation, and the run's curve is
the uninterrupted run's."""

from __future__ import annotations

import os
import signal

import pytest

from engine.algorithms.grpo import GRPOLoop, GRPORoles
from engine.config import SyntheticDataConfig, load_config
from engine.data.synthetic import make_arithmetic, normalized_rows
from engine.environments.router import EnvironmentRouter
from engine.generation.group import GenerationGroup
from engine.policy.group import start_policy_group

STEPS = 3


def grpo_run(
    tiny_model_dir, kill_before_step: int | None, signum: int = signal.SIGKILL, overrides: dict | None = None
) -> list[dict[str, float]]:
    """STEPS GRPO steps on real workers (FSDP2, transformers generation); the generation worker's process gets
    ``signum`` before step ``kill_before_step``."""
    from transformers import AutoTokenizer

    cfg = load_config(
        None,
        {
            "policy.world_size": 1,
            "generation.backend": "hf",
            "grpo.max_steps": STEPS,
            "grpo.prompts_per_step": 4,
            "grpo.generations_per_prompt": 4,
            "grpo.max_new_tokens": 4,
            **(overrides or {}),
        },
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    train, val = make_arithmetic(SyntheticDataConfig(num_train=64, num_val=4))
    policy = start_policy_group(cfg, tiny_model_dir, cfg.grpo.optimizer, STEPS, tokenizer.pad_token_id)
    roles = GRPORoles(
        policy,
        GenerationGroup(cfg.generation, tiny_model_dir, seed=0),
        EnvironmentRouter({"math": "engine.environments.math_verifier:MathVerifierEnv"}),
    )
    loop = GRPOLoop(cfg.grpo, 0, tokenizer, normalized_rows(train, None), normalized_rows(val, None), roles)
    try:
        curve = []
        for step in range(STEPS):
            if step == kill_before_step:
                (info,) = roles.generation.call("info")
                os.kill(info["pid"], signum)
            curve.append(loop.step(step))
        return curve
    finally:
        loop.rollouts.close()
        roles.shutdown()


def test_a_killed_generation_worker_is_replaced_and_no_step_is_lost(synchronous_grpo_curve, tiny_model_dir, caplog):
    uninterrupted = synchronous_grpo_curve
    with caplog.at_level("WARNING", logger="posttrain.grpo"):
        recovered = grpo_run(tiny_model_dir, kill_before_step=1)
    assert "a generation worker died" in caplog.text and "restarting the generation workers" in caplog.text
    for got, want in zip(recovered, uninterrupted):
        for key in ("reward/mean", "loss", "grad_norm", "token_mult_prob_error"):
            assert got[key] == pytest.approx(want[key], abs=1e-5), key
    assert len(recovered) == STEPS
