"""Asynchronous GRPO on real workers (FSDP2 trainer, transformers generation, Ray): the generator samples the next
step while the trainer trains; with no staleness allowed the curve is the synchronous one, and a generation worker
that hangs while sampling ahead is replaced without wedging the run."""

from __future__ import annotations

import signal

import pytest

from tests.integration.test_worker_loss import STEPS, grpo_run

AHEAD = {"grpo.async.enabled": True, "grpo.async.queue_size": 1}


def test_max_staleness_zero_drops_every_step_sampled_ahead_and_reproduces_the_synchronous_curve(
    synchronous_grpo_curve, tiny_model_dir
):
    synchronous = synchronous_grpo_curve
    on_policy = grpo_run(tiny_model_dir, kill_before_step=None, overrides={**AHEAD, "grpo.async.max_staleness": 0})
    assert [m["async/dropped"] for m in on_policy] == [0.0] + [16.0] * (STEPS - 1)  # sampled ahead, one step old
    assert [m["async/staleness"] for m in on_policy] == [0.0] * STEPS
    for got, want in zip(on_policy, synchronous):
        for key in ("reward/mean", "loss", "grad_norm", "token_mult_prob_error"):
            assert got[key] == pytest.approx(want[key], abs=1e-5), key


@pytest.mark.extended  # 80 s, most of it waiting out the timeout: CI's budget keeps the SIGKILL test only
def test_a_generation_worker_that_hangs_while_sampling_ahead_is_replaced_and_the_run_completes(
    ray_local, tiny_model_dir, caplog
):
    """SIGSTOP before step 1: the sampling of step 2, ahead, outlives generation.request_timeout_s; the workers are
    restarted, step 2 is sampled again with the current weights, and every step trains."""
    overrides = {**AHEAD, "generation.request_timeout_s": 15}
    with caplog.at_level("WARNING", logger="posttrain.grpo"):
        curve = grpo_run(tiny_model_dir, kill_before_step=1, signum=signal.SIGSTOP, overrides=overrides)
    assert "lost while sampling ahead" in caplog.text
    assert [m["async/staleness"] for m in curve] == [0.0, 1.0, 0.0]
    assert all(m["kept_samples"] > 0 or m["loss"] == 0.0 for m in curve) and len(curve) == STEPS
    assert curve[1]["is_weight_mean"] == pytest.approx(1.0, abs=0.05)  # step 1's episodes are one step old
