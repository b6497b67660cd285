"""The schema is the one home of defaults; YAML inheritance, dotted overrides, and one-line errors."""

import pytest

from engine.config import CONFIG_DIR, PipelineConfig, load_config
from engine.errors import ConfigError


def test_defaults_come_from_the_schema_and_fill_local_paths(tmp_path):
    cfg = load_config(None, {"workdir": str(tmp_path)})
    assert cfg.sft.max_steps == PipelineConfig.model_fields["sft"].default.max_steps
    assert cfg.storage.root == f"file://{tmp_path}/store"
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"


def test_yaml_defaults_inheritance_and_cli_overrides_with_coercion(tmp_path):
    (tmp_path / "base.yaml").write_text("sft:\n  max_steps: 7\n  batch_size: 8\npolicy:\n  world_size: 1\n")
    (tmp_path / "child.yaml").write_text("defaults: base.yaml\nsft:\n  batch_size: 16\n")
    cfg = load_config(tmp_path / "child.yaml", ["sft.optimizer.lr=1e-4", "policy.precision=bf16", "cache=false"])
    assert (cfg.sft.max_steps, cfg.sft.batch_size, cfg.policy.world_size) == (7, 16, 1)
    assert cfg.sft.optimizer.lr == pytest.approx(1e-4)
    assert cfg.policy.precision == "bf16" and cfg.cache is False


def test_bare_config_names_resolve_in_configs_dir():
    assert (CONFIG_DIR / "sft_tiny.yaml").is_file()
    assert load_config("sft_tiny").name == "sft"


@pytest.mark.parametrize(
    "override,message",
    [
        ("sft.max_step=3", "unknown config key 'sft.max_step' (did you mean 'sft.max_steps'?)"),
        ("sft.optimizer.lrr=3", "unknown config key 'sft.optimizer.lrr' (did you mean 'sft.optimizer.lr'?)"),
        ("zzz=1", "unknown config key 'zzz'"),
        ("sft.max_steps=abc", "invalid config value for 'sft.max_steps'"),
        ("sft.max_steps=-1", "'sft.max_steps': Input should be greater than 0"),
        ("policy.precision=fp8", "'policy.precision'"),
        ("resume=sometimes", "'resume': must be 'auto', 'never' or a checkpoint URI"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")
    (tmp_path / "bad.yaml").write_text("sft: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_cyclic_defaults_are_rejected(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: b.yaml\n")
    (tmp_path / "b.yaml").write_text("defaults: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    import yaml

    cfg = load_config("sft_tiny", {"workdir": str(tmp_path)})
    again = PipelineConfig.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("recipe", sorted((CONFIG_DIR / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.name == recipe.stem and cfg.model.name != "tiny"  # named after its file, for a real model


def test_megatron_layout_must_fit_the_world_size():
    cfg = load_config("sft_tiny", ["policy.backend=megatron", "policy.megatron.tensor_parallel=2"])
    assert (cfg.policy.world_size, cfg.policy.megatron.tensor_parallel) == (2, 2)
    with pytest.raises(ConfigError, match="policy.world_size=2 is not a multiple of policy.megatron.tensor_parallel"):
        load_config("sft_tiny", ["policy.backend=megatron", "policy.megatron.pipeline_parallel=4"])
    with pytest.raises(ConfigError, match="policy.backend"):
        load_config("sft_tiny", ["policy.backend=deepspeed"])
    with pytest.raises(ConfigError, match="policy.sequence_packing needs policy.backend=fsdp2"):
        load_config("sft_tiny", ["policy.backend=megatron", "policy.sequence_packing=true"])
    with pytest.raises(ConfigError, match="critic's value head runs on the fsdp2 trainer only"):
        load_config("sft_tiny", ["policy.backend=megatron", "grpo.advantage_estimator=gae"])
    with pytest.raises(ConfigError, match="unknown config key 'grpo.async_'"):
        load_config("sft_tiny", ["grpo.async_.enabled=true"])  # the config's name is grpo.async
