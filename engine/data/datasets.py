"""Train and validation splits in posttrain's normalized form, from the synthetic task or a real dataset.

``prepare_data`` commits the result to the store as ``train.jsonl`` and ``val.jsonl``, so later stages read one
format from one place and cache keys name the exact data by digest. The sources' fingerprints (content digests,
hub commits) go into the data stage's key: an edited file is a new dataset.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.config import DataConfig
from engine.data import sources
from engine.data.formats import detect_format, normalize_row
from engine.data.synthetic import make_arithmetic, normalized_rows
from engine.errors import DataError


@dataclass(frozen=True)
class DataSources:
    """The resolved training and validation sources (None for the synthetic task, or where validation is cut
    from the training split)."""

    train: sources.LocalSource | None
    val: sources.LocalSource | None
    cache_dir: Path  # where remote copies and Arrow caches go

    def fingerprints(self) -> dict[str, str]:
        return {name: src.fingerprint for name, src in (("train", self.train), ("val", self.val)) if src is not None}


def resolve_sources(
    cfg: DataConfig, cache_dir: Path, options_for: Callable[[str], dict[str, Any]] = lambda uri: {}
) -> DataSources:
    """The train and val sources made local; ``options_for(uri)``: the fsspec options of a remote one."""
    if cfg.source == "synthetic":
        return DataSources(None, None, cache_dir)
    train = sources.resolve(cfg.source, cfg, cache_dir, options_for(cfg.source))
    val = sources.resolve(cfg.val_source, cfg, cache_dir, options_for(cfg.val_source)) if cfg.val_source else None
    return DataSources(train, val, cache_dir)


def _normalized(rows: list[dict[str, Any]], cfg: DataConfig, label: str) -> list[dict[str, Any]]:
    if not rows:
        raise DataError(f"dataset {label} has no rows")
    kind = detect_format(list(rows[0]), cfg, label)
    return [normalize_row(row, kind, cfg, f"{label} row {index}") for index, row in enumerate(rows)]


def build_splits(
    cfg: DataConfig, resolved: DataSources, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Normalized (train, validation) rows for the configured source."""
    if resolved.train is None:
        train_raw, val_raw = make_arithmetic(cfg.synthetic)
        return normalized_rows(train_raw, cfg.system_prompt), normalized_rows(val_raw, cfg.system_prompt)
    label, cache = resolved.train.label, resolved.cache_dir
    train = _normalized(sources.load_split(resolved.train, cfg, cfg.split, cache), cfg, f"{label}[{cfg.split}]")
    if resolved.val is not None:
        val_rows = sources.load_split(resolved.val, cfg, cfg.val_split or "train", cache)
        return train, _normalized(val_rows, cfg, resolved.val.label)
    if cfg.val_split:
        val_rows = sources.load_split(resolved.train, cfg, cfg.val_split, cache)
        return train, _normalized(val_rows, cfg, f"{label}[{cfg.val_split}]")
    if len(train) < 2:
        raise DataError(f"dataset {label} has {len(train)} row: too few to cut a validation split from")
    random.Random(seed).shuffle(train)
    cut = max(1, int(len(train) * cfg.val_fraction))
    return train[cut:], train[:cut]


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
