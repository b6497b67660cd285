"""Every recipe in configs/recipes/ runs on CPU: the recipe itself, with a tiny random model of its architecture
family, tiny step counts, and a local dataset with exactly the real dataset's shape, loaded through the hub's code
path (a folder laid out like the hub repo, with its subset and splits). Every stage the recipe runs completes.

The GSM8K recipe without SFT also shows the rest of the user's path: an unchanged rerun is all cached, editing one
row of the dataset reruns the data stage and everything after it, the GRPO model exports to a bf16 folder that
from_pretrained loads and generates with, and each committed model is a version in MLflow's model registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import TinyModelConfig
from tests.conftest import REPO, run_cli
from tests.e2e.test_sft_cli import stage_runs, summary_of
from tests.fixtures.hub_datasets import gsm8k_rows, make_gsm8k, make_ultrafeedback

pytestmark = pytest.mark.slow

RECIPES = REPO / "configs" / "recipes"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from engine.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {
        arch: make_tiny_model(root / arch, TinyModelConfig(arch=arch, num_kv_heads=4 if arch == "qwen2" else 2))
        for arch in ("qwen2", "llama")
    }


@pytest.fixture(scope="module")
def datasets_like_the_hub(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("datasets")
    return {
        "gsm8k": make_gsm8k(root / "gsm8k", train=40, test=8),
        "ultrafeedback": make_ultrafeedback(root / "ultrafeedback", train=40, test=8),
    }


def tiny(workdir: Path, model_dir: Path, data_dir: Path, **extra) -> list[str]:
    """The recipe made to fit one CPU machine: local services, a tiny model and dataset, a handful of steps."""
    settings = {
        "workdir": str(workdir),
        "storage.root": f"file://{workdir}/store",
        "tracking.uri": f"sqlite:///{workdir}/mlflow.db",
        "ray.address": "local",
        "model.name": str(model_dir),
        "data.source": str(data_dir),
        "policy.world_size": 1,
        "policy.gpus_per_worker": 0,  # the recipes reserve a GPU per worker; this machine declares none
        "generation.gpus_per_worker": 0,
        "policy.micro_batch_tokens": 4096,
        "generation.worker_env": "vllm",
        "generation.num_workers": 1,
        "generation.max_model_len": 512,
        "generation.kv_cache_bytes": 1 << 28,
        "sft.max_steps": 2,
        "sft.batch_size": 4,
        "sft.val_every": 2,
        "sft.val_size": 4,
        "sft.max_seq_len": 256,
        "grpo.max_steps": 2,
        "grpo.prompts_per_step": 2,
        "grpo.generations_per_prompt": 2,
        "grpo.max_new_tokens": 12,
        "grpo.val_every": 2,
        "grpo.val_size": 4,
        "grpo.checkpoint_every": 2,
        "dpo.max_steps": 2,
        "dpo.batch_size": 2,
        "dpo.val_every": 2,
        "dpo.val_size": 4,
        "dpo.max_seq_len": 256,
        "evaluate.size": 4,
        "evaluate.max_new_tokens": 12,
        **extra,
    }
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def run_recipe(pipeline: str, recipe: str, workdir: Path, args: list[str], env: dict) -> dict:
    command = ["run", pipeline, "--config", str(RECIPES / recipe), "--json", *args]
    return summary_of(run_cli(command, cwd=workdir, timeout=600, env=env))


def assert_all_ran(summary: dict, stages: set[str]) -> None:
    assert summary["status"] == "completed" and set(summary["stages"]) == stages, summary["stages"].keys()
    assert not any(summary["stages"][name]["cached"] for name in stages - {"model"})


@pytest.mark.timeout(1000)  # services 300, 600
def test_qwen_math_recipe_sft_then_grpo_with_a_reward_function(tmp_path, tiny_models, datasets_like_the_hub, services):
    """SFT on GSM8K's worked answers -> GRPO with the math environment and the recipe's reward function from a
    file -> evaluate; the reward function's curve is logged as reward/final_answer_line."""
    args = tiny(tmp_path, tiny_models["qwen2"], datasets_like_the_hub["gsm8k"])
    summary = run_recipe("grpo-pipeline", "qwen2.5-1.5b-math-grpo.yaml", tmp_path, args, services.prefect_env)
    assert_all_ran(summary, {"model", "data", "sft", "grpo", "evaluate"})
    assert summary["stages"]["data"]["metrics"] == {"train_rows": 40.0, "val_rows": 8.0}  # the test split
    assert {"accuracy_sft", "accuracy_final", "reward_mean_final"} <= set(summary["stages"]["evaluate"]["metrics"])
    client, runs = stage_runs(tmp_path, "grpo", experiment="qwen-math")
    curve = client.get_metric_history(runs[-1].info.run_id, "reward/final_answer_line")
    assert [m.step for m in curve] == [1, 2]
    assert all(0 <= m.value * 4 <= 4 and (m.value * 4).is_integer() for m in curve)  # a 0/1 score over 4 samples


@pytest.mark.extended
@pytest.mark.timeout(1000)  # services 300, 600
def test_qwen_megatron_recipe(tmp_path, tiny_models, datasets_like_the_hub, services):
    """The 7B Megatron recipe's layout scaled to two CPU ranks (tensor parallel 2), in fp32 on both sides so that
    the refit from Megatron's weights into vLLM is checked exactly: the generator's logprobs of the sampled tokens
    equal the trainer's (the Megatron-vs-FSDP2 loss curves are the integration tests')."""
    layout = {"policy.world_size": 2, "policy.megatron.tensor_parallel": 2}
    fp32 = {"policy.precision": "fp32", "generation.dtype": "float32"}
    args = tiny(tmp_path, tiny_models["qwen2"], datasets_like_the_hub["gsm8k"], **layout, **fp32)
    summary = run_recipe("grpo-pipeline", "qwen2.5-7b-math-grpo-megatron.yaml", tmp_path, args, services.prefect_env)
    assert_all_ran(summary, {"model", "data", "sft", "grpo", "evaluate"})
    assert summary["stages"]["grpo"]["metrics"]["token_mult_prob_error_median"] <= 1.001
    client, runs = stage_runs(tmp_path, "sft", experiment="qwen-math")
    assert [run.data.params["policy.backend"] for run in runs] == ["megatron"]
    (grpo,) = stage_runs(tmp_path, "grpo", experiment="qwen-math")[1]
    assert grpo.data.params["policy.megatron.tensor_parallel"] == "2"


@pytest.mark.timeout(1000)  # services 300, 600
def test_llama_dpo_recipe_on_ultrafeedback_shaped_pairs(tmp_path, tiny_models, datasets_like_the_hub, services):
    """UltraFeedback's text prompt beside chosen/rejected chats: SFT on the chosen replies, DPO, and evaluate's
    preference accuracy against the SFT model (no generation: the pairs carry no reference answer)."""
    args = tiny(tmp_path, tiny_models["llama"], datasets_like_the_hub["ultrafeedback"])
    summary = run_recipe("dpo-pipeline", "llama-3.2-1b-dpo.yaml", tmp_path, args, services.prefect_env)
    assert_all_ran(summary, {"model", "data", "sft", "dpo", "evaluate"})
    evaluation = summary["stages"]["evaluate"]["metrics"]
    assert (evaluation["preference_accuracy"] * 4).is_integer() and "accuracy_final" not in evaluation  # 4 pairs
    assert evaluation["unscored_rows"] == 4.0


@pytest.mark.extended
@pytest.mark.timeout(2500)  # services 300, 3 x 600, export 300
def test_gsm8k_recipe_without_sft_caches_by_content_exports_and_registers(
    tmp_path, tiny_models, datasets_like_the_hub, services
):
    import shutil

    import torch
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.fixtures.hub_datasets import _parquet

    data = tmp_path / "gsm8k"
    shutil.copytree(datasets_like_the_hub["gsm8k"], data)
    workdir = tmp_path / "work"
    workdir.mkdir()
    # caching, export and the registry are the subject: transformers generates (the other Qwen recipes check vLLM)
    args = tiny(workdir, tiny_models["qwen2"], data, **{"evaluate.samples": 2, "generation.backend": "hf"})
    first = run_recipe("grpo-pipeline", "qwen2.5-0.5b-gsm8k-grpo.yaml", workdir, args, services.prefect_env)
    assert_all_ran(first, {"model", "data", "grpo", "evaluate"})
    assert "pass_at_2_final" in first["stages"]["evaluate"]["metrics"]

    again = run_recipe("grpo-pipeline", "qwen2.5-0.5b-gsm8k-grpo.yaml", workdir, args, services.prefect_env)
    assert all(stage["cached"] for stage in again["stages"].values())

    rows = gsm8k_rows(40, seed=0)
    rows[7] = {**rows[7], "answer": rows[7]["answer"].replace("####", "Checked.\n####")}
    _parquet(rows, data / "main" / "train-00000-of-00001.parquet")
    edited = run_recipe("grpo-pipeline", "qwen2.5-0.5b-gsm8k-grpo.yaml", workdir, args, services.prefect_env)
    assert {name: stage["cached"] for name, stage in edited["stages"].items()} == {
        "model": True,
        "data": False,
        "grpo": False,
        "evaluate": False,
    }

    out = tmp_path / "exported"
    export_args = ["export", edited["stages"]["grpo"]["artifact"], str(out), "--dtype", "bf16"]
    exported = run_cli([*export_args, "--set", f"storage.root=file://{workdir}/store"], cwd=workdir, timeout=300)
    assert exported.returncode == 0, exported.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and (out / "README.md").read_text().count("qwen2.5-0.5b-gsm8k-grpo") >= 1
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4

    registry = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    versions = registry.search_model_versions("name='qwen2.5-0.5b-gsm8k-grpo'")
    assert sorted(v.source for v in versions) == sorted(
        {first["stages"]["grpo"]["artifact"], edited["stages"]["grpo"]["artifact"]}
    )
