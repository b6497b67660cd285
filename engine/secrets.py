"""Secrets kept off every surface a run writes: MLflow params and artifacts, committed config files, checkpoints,
Prefect parameters, logs and Ray job entrypoints.

A config value is a secret when it is text and a segment of its key names one (``HF_TOKEN``, ``api_key``,
``aws_secret``, ``password``, ``credentials``; not ``max_new_tokens``) or it is an Azure ``connection_string``, or when
it sits under an ``env_vars`` mapping (what a Ray job's environment carries). Such values are written as ``***``.
The run itself gets them from its own environment (a secret override of the command line travels in
``POSTTRAIN_SECRET_OVERRIDES``, never in Prefect's parameters).
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
SECRET_WORDS = {"token", "key", "secret", "password", "passwd", "credential", "credentials", "apikey"}
OVERRIDES_ENV = "POSTTRAIN_SECRET_OVERRIDES"


def is_secret_key(key: str) -> bool:
    lowered = str(key).lower()
    return "connection_string" in lowered or any(part in SECRET_WORDS for part in re.split(r"[^a-z0-9]+", lowered))


def is_secret_path(dotted: str) -> bool:
    """A dotted config key (``ray.job_runtime_env.env_vars.HF_TOKEN``) that holds a secret."""
    parts = dotted.split(".")
    return "env_vars" in parts[:-1] or is_secret_key(parts[-1])


def holds_secret(dotted: str, value: Any) -> bool:
    """An override (``storage.options={"token": ...}`` as much as ``...env_vars.HF_TOKEN=...``) that carries a
    secret: it travels in the process's environment, never as a Prefect parameter."""
    as_set = {dotted.rsplit(".", 1)[-1]: value}  # the value under its own key: an env_vars mapping is all secret
    return is_secret_path(dotted) or redact(as_set) != as_set


def redact(data: Any) -> Any:
    """``data`` with every secret value replaced by ``***`` (a new structure; the input is not changed)."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            if key == "env_vars" and isinstance(value, dict):
                out[key] = {name: MASK for name in value}
            elif is_secret_key(key) and isinstance(value, str):  # a flag named like one (token_level_loss) is not
                out[key] = MASK
            else:
                out[key] = redact(value)
        return out
    if isinstance(data, list):
        return [redact(item) for item in data]
    return data
