"""The FSDP2 trainer's CUDA path, checked on a GPU machine that has torch but no Ray.

The worker class is driven directly (rank 0 of 1, NCCL on the GPU, gloo on CPU) in one subprocess per
mode, so the CPU reference and the CUDA runs see the same model, data and seed. Checked: fp32 CUDA
losses follow the CPU curve; a DCP checkpoint reloaded on CUDA replays the same steps; the HF export
reproduces the trainer's logprobs; bf16 with activation checkpointing trains. Prints one JSON line and
exits non-zero when a check fails.

    python -m bench.gpu_check
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

STEPS, BATCH = 4, 24


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _examples(model_dir: Path):
    from transformers import AutoTokenizer

    from engine.config import SyntheticDataConfig
    from engine.data.chat import tokenize_conversation
    from engine.data.synthetic import make_arithmetic

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows, _ = make_arithmetic(SyntheticDataConfig(num_train=STEPS * BATCH, num_val=1))
    conversations = [
        [{"role": "user", "content": r["prompt"] + " Think." * (i % 4)}, {"role": "assistant", "content": r["answer"]}]
        for i, r in enumerate(rows)
    ]
    return [tokenize_conversation(tokenizer, c, 256) for c in conversations], tokenizer.pad_token_id


def sft_step_loss(logprobs, batch, normalizers):
    from engine.algorithms.losses import nll_loss

    return nll_loss(logprobs, batch["loss_mask"], normalizers["tokens"]), {}


def run_mode(mode: str, model_dir: Path, work: Path) -> dict:
    """Train STEPS steps as rank 0 of 1; on CUDA also replay steps after a checkpoint and export."""
    from engine.config import OptimizerConfig, PolicyConfig
    from engine.data.batching import collate, plan_step
    from engine.models.logprobs import token_logprobs_from_logits
    from engine.policy.fsdp2 import FSDP2PolicyWorker

    policy = PolicyConfig(world_size=1, micro_batch_tokens=100_000)
    if mode == "cuda-bf16":
        policy = policy.model_copy(update={"precision": "bf16", "activation_checkpointing": True})
    optimizer = OptimizerConfig(lr=1e-2, warmup_steps=0)
    worker = FSDP2PolicyWorker(0, 1, str(model_dir), policy.model_dump(), optimizer.model_dump(), 10, seed=0)
    worker.init_distributed("127.0.0.1", free_loopback_port())
    examples, pad = _examples(model_dir)

    def step(s: int) -> dict:
        plans, tokens = plan_step(examples[s * BATCH : (s + 1) * BATCH], 1, 100_000, pad)
        out = worker.train_step(plans[0], sft_step_loss, {"tokens": float(tokens)})
        return {"loss": out["loss_share"], "grad_norm": out["grad_norm"]}

    result: dict = {"mode": mode, "device": str(worker.device), "backend": torch.distributed.get_backend()}
    result["curve"] = [step(0)]
    if mode == "cuda":
        worker.save_checkpoint(str(work / "ckpt"))
    result["curve"] += [step(s) for s in range(1, STEPS)]
    if mode == "cuda":
        worker.load_checkpoint(str(work / "ckpt"))
        result["replayed"] = [step(s) for s in range(1, STEPS)]
        batch = collate(examples[:4], pad)
        trainer = worker.forward_only([batch])[0]
        worker.export_hf(str(work / "hf"))
        from transformers import AutoModelForCausalLM

        exported = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
        with torch.no_grad():
            logits = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["loss_mask"].bool()  # aligned with the targets
        hf = token_logprobs_from_logits(logits, batch["input_ids"])
        result["export_max_abs_diff"] = float((hf[mask] - trainer[mask]).abs().max())
    torch.distributed.destroy_process_group()
    return result


def _child(mode: str, model_dir: Path, work: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if mode == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--child", mode, str(model_dir), str(work / mode)],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    from engine.config import TinyModelConfig
    from engine.models.tiny import make_tiny_model

    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = make_tiny_model(work / "model", TinyModelConfig())
        runs = {mode: _child(mode, model_dir, work) for mode in ("cpu", "cuda", "cuda-bf16")}
    cpu, cuda, bf16 = runs["cpu"]["curve"], runs["cuda"]["curve"], runs["cuda-bf16"]["curve"]
    checks = {
        "cuda_uses_nccl": runs["cuda"]["backend"] == "nccl" and runs["cuda"]["device"].startswith("cuda"),
        "cuda_fp32_follows_cpu_rel_1e-3": all(
            abs(g["loss"] - w["loss"]) <= 1e-3 * abs(w["loss"]) for g, w in zip(cuda, cpu)
        ),
        "checkpoint_replay_same_1e-5": all(
            abs(g["loss"] - w["loss"]) <= 1e-5 for g, w in zip(runs["cuda"]["replayed"], cuda[1:])
        ),
        "export_matches_trainer_1e-4": runs["cuda"]["export_max_abs_diff"] <= 1e-4,
        "bf16_checkpointed_trains": all(c["loss"] == c["loss"] for c in bf16) and bf16[-1]["loss"] < bf16[0]["loss"],
    }
    print(json.dumps({"device": torch.cuda.get_device_name(), "checks": checks, "runs": runs}))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(run_mode(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))))
    else:
        sys.exit(main())
