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


def files_digest(files: list[Path], root: Path | None, memo_dir: Path | None = None) -> str:
    """A digest of files' names (relative to ``root``, else their own) and bytes. Hashing a large model takes
    seconds, so with ``memo_dir`` the result is remembered under a key of the files' paths, sizes and modification
    times: an edited file is hashed again."""
    files = sorted(files)
    names = [p.relative_to(root).as_posix() if root else p.name for p in files]
    memo = None
    if memo_dir is not None:
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        memo = memo_dir / hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:24]
        if memo.is_file():
            return memo.read_text()
    digest = hashlib.sha256()
    for name, path in zip(names, files):
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    value = digest.hexdigest()[:16]
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(value)
    return value


def folder_digest(folder: Path, memo_dir: Path | None = None) -> str:
    """``files_digest`` of every file under ``folder`` (hidden ones, such as download markers, left out)."""
    files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return files_digest(files, folder, memo_dir)
