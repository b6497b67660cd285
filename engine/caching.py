"""Stage cache keys: the stage's config, the digests of its inputs, and the code version.

Two runs with the same key would compute the same artifact, so the second one reuses the first's.
The code version hashes the engine's own source, so a change to the math or a controller invalidates
what it computed.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ENGINE_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def code_version() -> str:
    try:
        release = version("posttrain")
    except PackageNotFoundError:
        release = "0+unknown"
    digest = hashlib.sha256()
    for source in sorted(ENGINE_DIR.rglob("*.py")):
        digest.update(source.relative_to(ENGINE_DIR).as_posix().encode())
        digest.update(source.read_bytes())
    return f"{release}+{digest.hexdigest()[:12]}"


def stage_key(stage: str, config: dict[str, Any], inputs: dict[str, str]) -> str:
    payload = json.dumps({"stage": stage, "config": config, "inputs": inputs, "code": code_version()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
