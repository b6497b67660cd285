"""The distillation controller's step without a cluster: the teacher scores the student's sampled tokens, and the
student trains on per-token advantages teacher - student (on the response only), with the loss that GRPO uses."""

from __future__ import annotations

import pytest

from engine.algorithms.distill import DistillLoop, loop_settings
from engine.algorithms.grpo import GRPORoles
from engine.config import load_config
from engine.data.batching import collate
from engine.environments.math_verifier import MathVerifierEnv
from tests.unit.algorithms.fakes import FakeGeneration, FakePolicy, InProcessRouter
from tests.unit.algorithms.test_grpo_step import PROMPTS, ROWS, SAMPLES, even_samples_right


def teacher_logprob(example, position: int) -> float:
    return -0.002 * position  # distinct per position, higher than the student's on every token


def test_a_step_trains_on_teacher_minus_student_per_token(tokenizer):
    cfg = load_config(
        None,
        {
            "distill.prompts_per_step": PROMPTS,
            "distill.generations_per_prompt": SAMPLES,
            "distill.max_new_tokens": 6,
            "grpo.dynamic_sampling": True,  # GRPO's group filtering is not the distillation's
        },
    )
    g = loop_settings(cfg)
    assert (g.prompts_per_step, g.max_new_tokens, g.dynamic_sampling) == (PROMPTS, 6, False)
    roles = GRPORoles(
        FakePolicy(),
        FakeGeneration(tokenizer, even_samples_right(tokenizer)),
        InProcessRouter({"math": MathVerifierEnv()}),
        teacher=FakePolicy(teacher_logprob),
    )
    loop = DistillLoop(g, 0, tokenizer, ROWS, ROWS[:4], roles)
    metrics = loop.step(0)

    (examples,) = roles.policy.trained
    assert len(examples) == PROMPTS * SAMPLES  # every sample, whatever its reward
    gaps = []
    for example in examples:
        assert "advantage" not in example.scalars
        student = example.token_values["generation_logprobs"]
        for position, (mask, advantage) in enumerate(zip(example.loss_mask, example.token_values["advantage"])):
            want = (teacher_logprob(example, position) - student[position]) if mask else 0.0
            assert advantage == pytest.approx(want)
            if mask:
                gaps.append(student[position] - teacher_logprob(example, position))
    assert metrics["distill/reverse_kl"] == pytest.approx(sum(gaps) / len(gaps))
    assert metrics["accuracy"] == 0.5  # scored and logged, not trained on

    batch = collate(examples[:2], tokenizer.pad_token_id)
    assert batch["advantage"].shape == batch["generation_logprobs"].shape  # per token, shifted like the logprobs
    (loss_fn,) = roles.policy.loss_fns
    assert loss_fn is loop.loss


def test_a_teacher_with_another_tokenizer_is_refused_in_one_line(tiny_model_dir, tmp_path):
    from engine.config import TinyModelConfig
    from engine.errors import ModelLoadError
    from engine.models.loading import check_same_tokenizer
    from engine.models.tiny import make_tiny_model

    check_same_tokenizer(tiny_model_dir, tiny_model_dir, "same")
    other = make_tiny_model(tmp_path / "other", TinyModelConfig(vocab_size=300))  # the corpus fills 307 tokens
    with pytest.raises(ModelLoadError, match=f"distill.teacher {other} has another tokenizer than the policy"):
        check_same_tokenizer(tiny_model_dir, other, f"distill.teacher {other}")
