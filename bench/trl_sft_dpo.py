"""TRL's SFTTrainer or DPOTrainer on the same model, rows and settings as our SFT / DPO stages; run in TRL's venv.

    <trl venv>/bin/python -m bench.trl_sft_dpo sft|dpo SPEC_JSON     (bench.sft_dpo_vs_trl writes SPEC_JSON)

Prints one JSON line: per-step wall times (and, for SFT, tokens seen). SFT: prompt-completion conversations, loss
on the completion only, one optimizer step per batch. DPO: our pairs (the correct answer against a wrong one, the
same pairing as ours), sigmoid loss plus an NLL term on the chosen answers, reference logprobs precomputed once.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def _rows(spec: dict) -> list[dict]:
    return [json.loads(line) for line in open(spec["train_jsonl"])]


def run_sft(spec: dict, model, tokenizer, steps: list[dict]):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from bench.trl_common import step_timer, trainer_args

    rows = _rows(spec)[: spec["batch_size"] * spec["max_steps"]]
    # posttrain's normalized rows hold messages: the prompt and the demonstration our SFT trains on
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    config = SFTConfig(
        per_device_train_batch_size=spec["batch_size"], max_length=spec["max_seq_len"], **trainer_args(spec)
    )
    return SFTTrainer(
        model=model,
        processing_class=tokenizer,
        args=config,
        train_dataset=dataset,
        callbacks=[step_timer(steps, logged=("num_tokens", "loss"))],
    )


def run_dpo(spec: dict, model, tokenizer, steps: list[dict]):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from bench.trl_common import step_timer, trainer_args

    # posttrain's normalized preference rows hold TRL's own columns: the prompt's messages and each response's
    rows = _rows(spec)[: spec["batch_size"] * spec["max_steps"]]
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    config = DPOConfig(
        per_device_train_batch_size=spec["batch_size"],
        max_length=spec["max_seq_len"],
        beta=spec["beta"],
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, spec["sft_weight"]],
        precompute_ref_log_probs=True,
        **trainer_args(spec),
    )
    return DPOTrainer(
        model=model,
        processing_class=tokenizer,
        args=config,
        train_dataset=Dataset.from_list(pairs),
        callbacks=[step_timer(steps, logged=("loss",))],
    )


def main(mode: str, spec_path: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = json.loads(open(spec_path).read())
    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    steps: list[dict] = []
    trainer = (run_sft if mode == "sft" else run_dpo)(spec, model, tokenizer, steps)
    started = time.perf_counter()
    trainer.train()
    print(json.dumps({"steps": steps, "train_seconds": time.perf_counter() - started}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
