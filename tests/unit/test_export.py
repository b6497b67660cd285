"""`posttrain export`: a committed model as a plain Hugging Face folder in the dtype asked for, with its tokenizer,
generation config and a model card; from_pretrained loads it and it generates."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from engine.config import load_config
from engine.errors import PosttrainError
from engine.models.export import export_folder, stage_of


@pytest.fixture
def committed(tiny_model_dir, tmp_path):
    """A model folder as a stage commits it: weights, tokenizer, and the resolved config."""
    folder = tmp_path / "committed"
    shutil.copytree(tiny_model_dir, folder)
    cfg = load_config("grpo_tiny", {"data.source": "openai/gsm8k", "data.subset": "main"})
    (folder / "posttrain_config.yaml").write_text(cfg.to_yaml())
    return folder


def test_export_in_bf16_loads_and_generates(committed, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_folder(committed, tmp_path / "out", "bf16", {"accuracy_final": 0.99}, "grpo")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    original = AutoModelForCausalLM.from_pretrained(committed, dtype=torch.float32)
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, original.state_dict()[name].to(torch.bfloat16)), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("What is 2+2?", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3

    card = (out / "README.md").read_text()
    assert "base model: `tiny`" in card and "`openai/gsm8k` (subset `main`)" in card
    assert "| accuracy_final | 0.99 |" in card and "grpo:" in card and "weights in bfloat16" in card


def test_export_keeps_the_committed_dtype_by_default_and_refuses_a_used_folder(committed, tmp_path):
    out = export_folder(committed, tmp_path / "out", None, {}, "sft")
    assert (out / "model.safetensors").read_bytes() == (committed / "model.safetensors").read_bytes()
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["tags"] == ["posttrain", "sft"]
    with pytest.raises(PosttrainError, match="exists and is not empty"):
        export_folder(committed, out, None, {}, "sft")


def test_stage_of_reads_the_artifact_key():
    assert stage_of("s3://bucket/runs/stages/grpo/0123abcd/model") == "grpo"
    assert stage_of("file:///x/store/models/tiny-abc") == "model"
