"""Loading datasets: the synthetic task, HF hub datasets, local or remote jsonl/json/parquet files.

Every source is normalised into rows with ``messages`` (a chat to train on) and, where the source has
them, ``prompt``/``answer``/``wrong_answers``/``task`` for RL and preference stages. ``prepare_data``
commits the result to the store as ``train.jsonl`` and ``val.jsonl``, so later stages read one format
from one place and cache keys can name the exact data by digest.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import fsspec

from engine.config import DataConfig
from engine.data.chat import prompt_messages, validate_messages
from engine.data.synthetic import make_arithmetic
from engine.errors import DataError

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _localize(uri: str, cache_dir: Path, storage_options: dict[str, Any]) -> Path:
    """A local copy of a remote file, downloaded once (named by the URI's hash)."""
    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
        if not path.is_file():
            raise DataError(f"dataset file not found: {uri}")
        return path
    target = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:16] / Path(uri).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fs, path = fsspec.core.url_to_fs(uri, **storage_options)
            fs.get_file(path, str(target) + ".part")
        except FileNotFoundError:
            raise DataError(f"dataset file not found: {uri}") from None
        except Exception as exc:  # noqa: BLE001 - transport errors become one user-facing line
            raise DataError(f"cannot download dataset {uri}: {str(exc).splitlines()[0]}") from None
        Path(str(target) + ".part").rename(target)
    return target


def _load_file(path: Path, label: str) -> list[dict[str, Any]]:
    import datasets  # heavy import, only when a real dataset is read

    kind = FILE_FORMATS.get(path.suffix)
    if kind is None:
        raise DataError(f"dataset {label}: unsupported file type {path.suffix!r} (use .jsonl, .json or .parquet)")
    try:
        return list(datasets.load_dataset(kind, data_files=str(path), split="train"))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"dataset {label} could not be parsed: {str(exc).splitlines()[0]}") from None


def _load_hub(name: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot load dataset {name!r} split {split!r}: {str(exc).splitlines()[0]}") from None


def _looks_like_file(source: str) -> bool:
    return "://" in source or Path(source).suffix in FILE_FORMATS or Path(source).exists()


def load_raw(source: str, split: str, cache_dir: Path, storage_options: dict[str, Any]) -> list[dict[str, Any]]:
    if _looks_like_file(source):
        return _load_file(_localize(source, cache_dir, storage_options), source)
    return _load_hub(source, split)


def normalize_row(row: dict[str, Any], cfg: DataConfig, where: str) -> dict[str, Any]:
    """One row in posttrain's form: messages to train on, plus RL/preference fields when present."""
    out: dict[str, Any] = {}
    row = {key: value for key, value in row.items() if value is not None}  # columnar formats fill gaps with None
    if "chosen" in row and "rejected" in row:  # a preference dataset: train SFT on the chosen side
        out["chosen"], out["rejected"] = row["chosen"], row["rejected"]
        if isinstance(row["chosen"], list):
            out["messages"] = validate_messages(row["chosen"], where)
            return out
        if cfg.prompt_field not in row:
            raise DataError(f"{where}: text 'chosen'/'rejected' need a '{cfg.prompt_field}' field")
        row = {**row, cfg.response_field: row["chosen"]}
    if cfg.messages_field in row:
        out["messages"] = validate_messages(row[cfg.messages_field], where)
    if cfg.prompt_field in row and cfg.response_field in row:
        prompt, answer = row[cfg.prompt_field], row[cfg.response_field]
        if not isinstance(prompt, str) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: '{cfg.prompt_field}' must be text and '{cfg.response_field}' text or a number")
        out["prompt"], out["answer"] = prompt, str(answer)
        out.setdefault(
            "messages", prompt_messages(prompt, cfg.system_prompt) + [{"role": "assistant", "content": str(answer)}]
        )
    if "messages" not in out:
        raise DataError(
            f"{where}: row has neither '{cfg.messages_field}' nor '{cfg.prompt_field}' + '{cfg.response_field}' fields"
        )
    for extra in ("wrong_answers", "task"):
        if extra in row:
            out[extra] = row[extra]
    return out


def _normalize_all(rows: list[dict[str, Any]], cfg: DataConfig, label: str) -> list[dict[str, Any]]:
    return [normalize_row(row, cfg, f"{label} row {index}") for index, row in enumerate(rows)]


def build_splits(
    cfg: DataConfig, cache_dir: Path, storage_options: dict[str, Any], seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Normalised (train, validation) rows for the configured source."""
    if cfg.source == "synthetic":
        train_raw, val_raw = make_arithmetic(cfg.synthetic)
        return _normalize_all(train_raw, cfg, "synthetic"), _normalize_all(val_raw, cfg, "synthetic")
    train = _normalize_all(load_raw(cfg.source, cfg.split, cache_dir, storage_options), cfg, cfg.source)
    if not train:
        raise DataError(f"dataset {cfg.source} has no training rows")
    if cfg.val_source:
        val_rows = load_raw(cfg.val_source, cfg.split, cache_dir, storage_options)
        return train, _normalize_all(val_rows, cfg, cfg.val_source)
    if cfg.val_split:
        val_rows = load_raw(cfg.source, cfg.val_split, cache_dir, storage_options)
        return train, _normalize_all(val_rows, cfg, f"{cfg.source}[{cfg.val_split}]")
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
