"""HF <-> Megatron weight conversion as pure tensor reshuffles: exact round trips at every TP/PP split,
Megatron's fused layouts checked against hand-built ones, and the `posttrain convert` folders."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from engine.config import TinyModelConfig
from engine.errors import PosttrainError
from engine.models import megatron_convert as mc
from engine.models.tiny import make_tiny_model
from flows.cli import main as cli_main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": make_tiny_model(root / "llama", TinyModelConfig(hidden_size=64, num_layers=4, num_heads=4)),
        "qwen2": make_tiny_model(
            root / "qwen2",
            TinyModelConfig(
                arch="qwen2", hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, tie_word_embeddings=False
            ),
        ),
    }


def shards_for(state, shape, tp, pp):
    out = {}
    for stage in range(pp):
        layers = mc.stage_layers(shape, pp, stage)
        out[stage] = [
            mc.hf_to_megatron(state, shape, tp, rank, layers, stage == 0, stage == pp - 1) for rank in range(tp)
        ]
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_round_trip_is_exact(models, arch, tp, pp):
    hf_config, state = mc.load_hf_folder(models[arch])
    shape = mc.shape_of(hf_config)
    rebuilt = {}
    for stage, shards in shards_for(state, shape, tp, pp).items():
        layers = mc.stage_layers(shape, pp, stage)
        rebuilt.update(mc.megatron_to_hf(shards, shape, layers, stage == 0, stage == pp - 1))
    assert set(rebuilt) == set(state)
    for key, tensor in state.items():
        assert torch.equal(rebuilt[key], tensor), key


def test_fused_layouts_match_megatron_conventions(models):
    hf_config, state = mc.load_hf_folder(models["qwen2"])
    shape = mc.shape_of(hf_config)
    assert shape.qkv_bias and not shape.tied_embeddings and shape.queries_per_group == 2
    d = shape.head_dim
    q, k, v = (state[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    for rank in range(2):  # one key/value group per tensor rank: [q heads of the group, its k head, its v head]
        shard = mc.hf_to_megatron(state, shape, 2, rank, range(0, 4), True, True)
        expected = torch.cat(
            [q[rank * 2 * d : (rank + 1) * 2 * d], k[rank * d : (rank + 1) * d], v[rank * d : (rank + 1) * d]]
        )
        assert torch.equal(shard["decoder.layers.0.self_attention.linear_qkv.weight"], expected)
        gate, up = state["model.layers.0.mlp.gate_proj.weight"], state["model.layers.0.mlp.up_proj.weight"]
        half = gate.shape[0] // 2
        fc1 = shard["decoder.layers.0.mlp.linear_fc1.weight"]
        assert torch.equal(fc1, torch.cat([gate[rank * half : (rank + 1) * half], up[rank * half : (rank + 1) * half]]))
        embedding = shard["embedding.word_embeddings.weight"]
        assert embedding.shape[0] == shape.padded_vocab_size // 2  # padded to a multiple of 128, split in two
    assert shape.padded_vocab_size % 128 == 0 and shape.padded_vocab_size >= shape.vocab_size


def test_tied_embeddings_put_the_output_layer_on_a_last_stage_without_the_embedding(models):
    hf_config, state = mc.load_hf_folder(models["llama"])
    shape = mc.shape_of(hf_config)
    assert shape.tied_embeddings
    whole = mc.hf_to_megatron(state, shape, 1, 0, range(0, 4), True, True)
    assert "output_layer.weight" not in whole
    last_stage = mc.hf_to_megatron(state, shape, 1, 0, range(2, 4), False, True)
    assert torch.equal(last_stage["output_layer.weight"][: shape.vocab_size], state["model.embed_tokens.weight"])


def test_unsupported_shapes_are_one_line_errors(models):
    hf_config, _ = mc.load_hf_folder(models["qwen2"])
    shape = mc.shape_of(hf_config)
    with pytest.raises(PosttrainError, match="tensor parallel size 4 does not divide the model's key/value heads"):
        mc.check_parallel_sizes(shape, 4, 1)
    with pytest.raises(PosttrainError, match="pipeline parallel size 3 does not divide the number of layers"):
        mc.check_parallel_sizes(shape, 1, 3)
    gpt2 = AutoConfig.for_model("gpt2")
    with pytest.raises(PosttrainError, match="model type 'gpt2' is not supported"):
        mc.shape_of(gpt2)


def test_convert_cli_round_trip(models, tmp_path, capsys):
    megatron_dir, back = tmp_path / "megatron", tmp_path / "hf"
    source = models["qwen2"]
    argv = ["convert", "hf-to-megatron", str(source), str(megatron_dir), "--tensor-parallel", "2"]
    assert cli_main([*argv, "--pipeline-parallel", "2"]) == 0
    assert sorted(p.name for p in (megatron_dir / "release").iterdir()) == [
        "mp_rank_00_000",
        "mp_rank_00_001",
        "mp_rank_01_000",
        "mp_rank_01_001",
    ]
    assert (megatron_dir / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert cli_main(["convert", "megatron-to-hf", str(megatron_dir), str(back)]) == 0
    original, rebuilt = load_file(str(source / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert set(original) == set(rebuilt) and all(torch.equal(original[k], rebuilt[k]) for k in original)
    assert (back / "tokenizer.json").is_file() and (back / "config.json").is_file()
    capsys.readouterr()

    # an existing output, a bad split and a missing folder: one line, exit 2, nothing half written
    assert cli_main(["convert", "hf-to-megatron", str(source), str(megatron_dir)]) == 2
    assert cli_main(["convert", "hf-to-megatron", str(source), str(tmp_path / "tp3"), "--tensor-parallel", "3"]) == 2
    assert cli_main(["convert", "megatron-to-hf", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        f"error: output folder already exists: {megatron_dir}",
        "error: tensor parallel size 3 does not divide the model's key/value heads (2)",
        f"error: model folder not found: {tmp_path / 'nowhere'}",
    ]
    assert not (tmp_path / "tp3").exists() and not list(tmp_path.glob(".*partial"))


def test_transformer_engine_norm_names_round_trip(models):
    hf_config, state = mc.load_hf_folder(models["llama"])
    shape = mc.shape_of(hf_config)
    local = mc.hf_to_megatron(state, shape, 1, 0, range(0, 4), True, True)
    fused = mc.rename_norms(local, to_transformer_engine=True)
    assert "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight" in fused
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in fused
    assert not any("input_layernorm" in key or "pre_mlp_layernorm" in key for key in fused)
    assert "decoder.final_layernorm.weight" in fused  # not fused: no linear layer follows it
    assert mc.rename_norms(fused, to_transformer_engine=False).keys() == local.keys()
