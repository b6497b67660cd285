"""Secrets never reach what a run writes: masked in the config's every written form, kept out of Prefect's
parameters and Ray job payloads."""

from __future__ import annotations

import base64
import json

import pytest

from engine.config import RunParameters, load_config
from engine.secrets import MASK, OVERRIDES_ENV, holds_secret, is_secret_key, is_secret_path, redact
from tasks.ray_job import decode_payload, encode_payload

SECRET = "hf_s3cr3tVALUE"


@pytest.mark.parametrize(
    "key,secret",
    [
        ("HF_TOKEN", True),
        ("api_key", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("db-password", True),
        ("credentials", True),
        ("AZURE_STORAGE_CONNECTION_STRING", True),
        ("max_new_tokens", False),
        ("tokenizer", False),
        ("micro_batch_tokens", False),
    ],
)
def test_secret_keys_are_named_by_a_segment(key, secret):
    assert is_secret_key(key) is secret


def test_redaction_masks_secret_keys_and_every_env_var():
    data = {
        "ray": {"job_runtime_env": {"env_vars": {"PLAIN": "x", "HF_TOKEN": SECRET}, "pip": ["a"]}},
        "grpo": {"max_new_tokens": 8, "token_level_loss": True},
        "nested": [{"api_key": SECRET}],
    }
    masked = redact(data)
    assert masked["ray"]["job_runtime_env"] == {"env_vars": {"PLAIN": MASK, "HF_TOKEN": MASK}, "pip": ["a"]}
    assert masked["grpo"] == data["grpo"] and masked["nested"] == [{"api_key": MASK}]
    assert data["ray"]["job_runtime_env"]["env_vars"]["HF_TOKEN"] == SECRET  # the input is left as it was
    assert is_secret_path("ray.job_runtime_env.env_vars.ANYTHING") and not is_secret_path("grpo.max_new_tokens")


def test_every_written_form_of_the_config_is_masked_and_the_run_still_has_the_value(monkeypatch):
    overrides = {"ray.address": "auto", "ray.submission": "job", "ray.job_runtime_env.env_vars.HF_TOKEN": SECRET}
    cfg = load_config(None, overrides)
    assert cfg.ray.job_runtime_env["env_vars"]["HF_TOKEN"] == SECRET  # the run itself has it
    assert SECRET not in cfg.to_yaml() and SECRET not in json.dumps(cfg.redacted())
    payload = encode_payload(__import__("engine.stages", fromlist=["x"]).train_sft, cfg, [])
    assert SECRET not in base64.urlsafe_b64decode(payload).decode() and SECRET not in payload
    _, decoded, _ = decode_payload(payload)
    assert decoded.ray.job_runtime_env["env_vars"]["HF_TOKEN"] == MASK  # the job runs inside the env that has it

    monkeypatch.setenv(OVERRIDES_ENV, json.dumps({"ray.job_runtime_env.env_vars.HF_TOKEN": SECRET}))
    params = RunParameters(config="sft_tiny", overrides={"ray.address": "auto", "ray.submission": "job"})
    assert SECRET not in params.model_dump_json()  # what Prefect stores as the run's parameters
    assert params.resolve().ray.job_runtime_env["env_vars"]["HF_TOKEN"] == SECRET


def test_an_override_whose_value_holds_a_secret_is_kept_off_the_parameters():
    assert holds_secret("storage.options", {"endpoint_url": "http://127.0.0.1:1", "token": SECRET})
    assert holds_secret("ray.job_runtime_env.env_vars", {"PLAIN": "x"})  # every env var is masked, so kept back
    assert holds_secret("ray.job_runtime_env.env_vars.HF_TOKEN", SECRET)
    assert not holds_secret("storage.options", {"endpoint_url": "http://127.0.0.1:1", "project": "p"})
    assert not holds_secret("grpo.max_new_tokens", 8)
