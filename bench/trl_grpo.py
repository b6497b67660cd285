"""TRL's GRPOTrainer on the same model, prompts and settings as our GRPO stage; run in TRL's own venv.

    <trl venv>/bin/python -m bench.trl_grpo SPEC_JSON     (bench.grpo_vs_trl writes SPEC_JSON and runs this)

Prints one JSON line: per-step wall times and rewards. Optional spec keys: ``time_budget_s`` stops training once
the steps have taken that long, ``save_dir`` saves the final model there. Settings mirrored from ours: prompts x
generations per step, max new tokens, temperature, learning rate (constant, no warm-up), no KL (beta 0), clip 0.2,
token-level loss over the whole batch ("dapo"), unscaled group advantages, one optimizer step per generation batch.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main(spec_path: str) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from bench.trl_common import step_timer, trainer_args
    from engine.environments.math_verifier import is_correct

    spec = json.loads(open(spec_path).read())
    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    rows = [json.loads(line) for line in open(spec["train_jsonl"])]
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]  # posttrain's normalized rows: messages
    )

    def exact_answer(completions, answer, **_):
        return [float(is_correct(c[-1]["content"], a)) for c, a in zip(completions, answer)]

    n = spec["generations_per_prompt"]
    config = GRPOConfig(
        per_device_train_batch_size=spec["prompts_per_step"] * n,
        num_generations=n,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="none",
        **trainer_args(spec),
    )
    steps: list[dict] = []
    trainer = GRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=exact_answer,
        args=config,
        train_dataset=dataset,
        callbacks=[step_timer(steps, logged=("reward",), budget_s=spec.get("time_budget_s"))],
    )
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    if spec.get("save_dir"):
        trainer.save_model(spec["save_dir"])
        tokenizer.save_pretrained(spec["save_dir"])
    print(json.dumps({"steps": steps, "train_seconds": total}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
