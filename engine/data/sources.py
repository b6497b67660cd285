"""Where a dataset comes from, made local, fingerprinted by content, and read through the ``datasets`` library.

``data.source`` may be:

    a hub name          openai/gsm8k (``data.subset``: the config name, ``data.revision``: branch, tag or commit)
    a local folder      written by ``save_to_disk``, or holding data files laid out like a hub repo
    a file or a glob    train.jsonl, data/*.parquet (json, jsonl, parquet, csv)
    an fsspec URI       s3://bucket/data/train.jsonl, or a folder or glob under one

A hub dataset is fetched with ``huggingface_hub.snapshot_download`` (only the subset's files where the repo's card
names them), so the hub and a local folder take the same path from there on, and its fingerprint is the resolved
commit; a local or remote one is fingerprinted by the bytes of its files, so an edited file is a new dataset.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from engine.caching import files_digest, folder_digest
from engine.config import DataConfig
from engine.errors import DataError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class LocalSource:
    """A source made local: a folder (hub snapshot, data-file folder or ``save_to_disk``) or a list of files."""

    label: str  # what the user wrote, for messages
    folder: Path | None
    files: tuple[Path, ...]
    fingerprint: str  # content digest, or hub repo@commit
    saved_to_disk: bool = False


def is_glob(text: str) -> bool:
    return bool(_GLOB_CHARS & set(text))


def names_local_path(source: str) -> bool:
    """True for a path on this machine: explicit, an existing one, a data file name or a glob of them."""
    if source.startswith("file://") or source.startswith(("/", "./", "../", "~")):
        return True
    if "://" in source:
        return False
    return Path(source).exists() or Path(source).suffix in FILE_BUILDERS or is_glob(source)


def local_paths(source: str, label: str) -> tuple[Path | None, tuple[Path, ...]]:
    """(folder, files) a local source names: one of the two is set; a path that names nothing is an error."""
    path_text = str(Path(source.removeprefix("file://")).expanduser())
    if is_glob(path_text):
        files = tuple(Path(p) for p in sorted(globlib.glob(path_text, recursive=True)) if Path(p).is_file())
        if not files:
            raise DataError(f"dataset files not found: {label} matches no file")
        return None, files
    path = Path(path_text)
    if path.is_file():
        return None, (path,)
    if path.is_dir():
        if not any(p.is_file() for p in path.rglob("*")):
            raise DataError(f"dataset folder {label} is empty")
        return path, ()
    raise DataError(f"dataset file not found: {label}")


def _local(source: str, label: str, memo_dir: Path) -> LocalSource:
    """A local source and its content digest (remembered by the files' sizes and times: a large dataset is hashed
    again only when a file changed)."""
    folder, files = local_paths(source, label)
    if folder is None:
        return LocalSource(label, None, files, files_digest(list(files), None, memo_dir))
    saved = (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()
    return LocalSource(label, folder, (), folder_digest(folder, memo_dir), saved)


def _remote(uri: str, cache_dir: Path, storage_options: dict[str, Any]) -> LocalSource:
    """A remote file, folder or glob copied into the cache (named by the files' sizes and ETags, so a changed
    remote file is copied again), then read like the local file, folder or files it now is."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        fs.invalidate_cache()  # fsspec keeps listings per process: a file edited since would look unchanged
        kind = "glob" if is_glob(path) else "folder" if fs.isdir(path) else "file"
        if kind == "glob":
            remote_files, base = sorted(fs.glob(path)), path.split("*")[0].rsplit("/", 1)[0]
        elif kind == "folder":
            remote_files, base = sorted(f for f in fs.find(path) if not f.rsplit("/", 1)[-1].startswith(".")), path
        else:
            remote_files, base = [path], path.rsplit("/", 1)[0]
        if not remote_files:
            raise DataError(f"dataset not found: {uri}")
        stamp = []
        for remote in remote_files:
            info = fs.info(remote)
            stamp.append((remote, info.get("size"), str(info.get("ETag") or info.get("mtime") or "")))
        target = cache_dir / "remote" / hashlib.sha256(repr((uri, stamp)).encode()).hexdigest()[:16]
        local_files = [target / remote[len(base) :].lstrip("/") for remote in remote_files]
        if not (target / ".complete").exists():
            staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
            for remote, local in zip(remote_files, local_files):
                (staging / local.relative_to(target)).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(staging / local.relative_to(target)))
            (staging / ".complete").touch()
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"dataset file not found: {uri}") from None
    except Exception as exc:  # noqa: BLE001 - transport errors become one user-facing line
        raise DataError(f"cannot read dataset {uri}: {str(exc).splitlines()[0]}") from None
    if kind == "folder":
        local = _local(str(target), uri, cache_dir / "digests")
        return LocalSource(uri, target, (), local.fingerprint, local.saved_to_disk)
    return LocalSource(uri, None, tuple(local_files), files_digest(local_files, target, cache_dir / "digests"))


def _hub_patterns(card: Path, subset: str | None) -> list[str] | None:
    """The files the repo's card (README.md) lists for ``subset`` (or its default config); None when it names none."""
    import yaml

    text = card.read_text() if card.is_file() else ""
    if not text.startswith("---"):
        return None
    try:
        configs = (yaml.safe_load(text.split("---", 2)[1]) or {}).get("configs") or []
    except (yaml.YAMLError, AttributeError):
        return None
    if subset is not None:
        chosen = [c for c in configs if c.get("config_name") == subset]
    else:
        chosen = [c for c in configs if c.get("default")] or [c for c in configs if c.get("config_name") == "default"]
        chosen = chosen or (configs if len(configs) == 1 else [])
    if not chosen:
        return None
    files = chosen[0].get("data_files") or []
    files = [files] if isinstance(files, (str, dict)) else files
    paths = [entry["path"] if isinstance(entry, dict) else entry for entry in files]
    return [p for group in paths for p in ([group] if isinstance(group, str) else group)]


def _hub(name: str, cfg: DataConfig) -> LocalSource:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    options = {"repo_id": name, "repo_type": "dataset", "revision": cfg.revision}  # the user's own HF cache
    try:
        try:
            card = Path(hf_hub_download(filename="README.md", **options))
        except (LocalEntryNotFoundError, HfHubHTTPError) as exc:
            if isinstance(exc, RepositoryNotFoundError):
                raise
            card = Path("/nonexistent")
        patterns = list(cfg.data_files or []) or _hub_patterns(card, cfg.subset)
        allow = None if patterns is None else ["README.md", *patterns]
        folder = Path(snapshot_download(allow_patterns=allow, **options))
    except RepositoryNotFoundError:
        raise DataError(f"dataset {name!r} not found on the Hugging Face hub (data.source)") from None
    except Exception as exc:  # noqa: BLE001 - offline without a cached copy, unknown revision, transport errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot load dataset {name!r} from the Hugging Face hub: {reason}") from None
    return LocalSource(name, folder, (), f"{name}@{folder.name}")


def resolve(source: str, cfg: DataConfig, cache_dir: Path, storage_options: dict[str, Any]) -> LocalSource:
    """``source`` made local and fingerprinted (hub snapshot, remote copy, or the local path itself)."""
    if names_local_path(source):
        return _local(source, source, cache_dir / "digests")
    if "://" in source:
        return _remote(source, cache_dir, storage_options)
    return _hub(source, cfg)


def load_split(local: LocalSource, cfg: DataConfig, split: str, cache_dir: Path) -> list[dict[str, Any]]:
    """The rows of one split, read with ``datasets`` (``load_from_disk`` or ``load_dataset``). Its Arrow cache is
    kept under the source's content fingerprint: ``datasets`` keys a folder's cache by its name and card, and served
    another folder's rows from it in a test here."""
    import datasets

    where = f"dataset {local.label}"
    arrow_cache = str(cache_dir / "arrow" / hashlib.sha256(local.fingerprint.encode()).hexdigest()[:16])
    try:
        if local.saved_to_disk:
            saved = datasets.load_from_disk(str(local.folder))
            if isinstance(saved, datasets.DatasetDict):
                if split not in saved:
                    raise DataError(f"{where} has no split {split!r}; splits: {', '.join(saved)}")
                return list(saved[split])
            if split != "train":
                raise DataError(f"{where} has a single split: use data.split=train, not {split!r}")
            return list(saved)
        if local.folder is None:
            builder = _builder(local.files, where)
            if all(f.stat().st_size == 0 for f in local.files):
                raise DataError(f"{where} has no rows (its file is empty)")
            if split != "train":
                raise DataError(f"{where} is a file (or files): it has one split, 'train', not {split!r}")
            files = [str(f) for f in local.files]
            return list(datasets.load_dataset(builder, data_files=files, split="train", cache_dir=arrow_cache))
        return list(
            datasets.load_dataset(
                str(local.folder), name=cfg.subset, data_files=cfg.data_files, split=split, cache_dir=arrow_cache
            )
        )
    except DataError:
        raise
    except ValueError as exc:
        message = str(exc).splitlines()[0]
        if "BuilderConfig" in message and cfg.subset:
            listed = message.split("Available:")[-1].strip(" []") if "Available:" in message else ""
            available = ", ".join(name.strip(" '\"") for name in listed.split(",")) or "see the dataset card"
            raise DataError(f"{where} has no subset {cfg.subset!r} (data.subset); available: {available}") from None
        if "Unknown split" in message:
            raise DataError(f"{where}: {message}") from None
        raise DataError(f"{where} could not be read: {message}") from None
    except Exception as exc:  # noqa: BLE001 - a malformed file: one line naming it
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{where} could not be parsed: {reason}") from None


def _builder(files: tuple[Path, ...], where: str) -> str:
    kinds = {FILE_BUILDERS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        suffixes = sorted({f.suffix for f in files})
        raise DataError(f"{where}: unsupported or mixed file types {suffixes} (use .jsonl, .json, .parquet or .csv)")
    return kinds.pop()
