"""The user's own code in the loop, named by ``package.module:name`` or ``path/to/file.py:name``.

Loading happens in the driver first (a missing file, module or name fails there, in one line, before any stage
starts); the objects then travel to the Ray actors that run them. A module the user wrote is shipped by value
(its source goes with it), so actors need not find it on their own path; the packages it imports must be
installed where the actors run. The code's digest (its file's bytes) is part of the cache keys of the stages
that run it: editing a reward function reruns exactly those stages.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import PosttrainError


class UserCodeError(PosttrainError):
    """User code that cannot be loaded, raises, or returns what it must not (a user error: never retried)."""


@dataclass(frozen=True)
class CodeRef:
    spec: str  # as the user wrote it
    field: str  # the config key that names it, for messages
    module: str | None
    file: Path | None
    name: str

    @property
    def source_file(self) -> Path | None:
        if self.file is not None:
            return self.file
        found = importlib.util.find_spec(self.module)
        return Path(found.origin) if found is not None and found.origin else None


def parse(spec: str, field: str) -> CodeRef:
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise UserCodeError(f"{field}: {spec!r} must look like 'package.module:name' or 'path/to/file.py:name'")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise UserCodeError(f"{field}: file not found: {target}")
        return CodeRef(spec, field, None, path, name)
    return CodeRef(spec, field, target, None, name)


def _module(ref: CodeRef):
    if ref.file is not None:
        module_name = "posttrain_user_" + hashlib.sha256(str(ref.file).encode()).hexdigest()[:12]
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, ref.file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        return module
    return importlib.import_module(ref.module)


def load(ref: CodeRef) -> Any:
    """The named object (``engine.cluster.ship_by_value`` makes its module travel to actors with it)."""
    try:
        module = _module(ref)
    except Exception as exc:  # noqa: BLE001 - anything the user's module raises on import
        raise UserCodeError(f"{ref.field}: cannot import {ref.spec}: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, ref.name):
        raise UserCodeError(f"{ref.field}: {ref.spec}: the module has no {ref.name!r}")
    return getattr(module, ref.name)


def digest(ref: CodeRef) -> str:
    """The bytes of the file that defines the object (what a cache key must change with)."""
    source = ref.source_file
    if source is None or not source.is_file():
        return f"unreadable:{ref.spec}"
    return hashlib.sha256(source.read_bytes()).hexdigest()[:16]
