"""What the TRL runners share: our optimizer settings as Trainer arguments, and a per-step wall-time callback."""

from __future__ import annotations

import time


def trainer_args(spec: dict) -> dict:
    """Our optimizer and run settings in transformers' Trainer terms: constant lr, Adam betas (0.9, 0.95), no
    weight decay, grad clip 1, CPU, no checkpoints or reports."""
    return dict(
        output_dir=spec["output_dir"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=spec["max_steps"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=spec.get("seed", 0),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def step_timer(steps: list[dict], logged: tuple[str, ...] = (), budget_s: float | None = None):
    """A TrainerCallback appending {"seconds", <logged keys>} to ``steps`` for every optimizer step; with
    ``budget_s`` it stops training once the steps together have taken that long (equal-wall-time comparisons)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"seconds": time.perf_counter() - self.started})
            if budget_s is not None and sum(s["seconds"] for s in steps) >= budget_s:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in logged:
                if logs and key in logs and steps:
                    steps[-1][key] = logs[key]

    return StepTimer()
