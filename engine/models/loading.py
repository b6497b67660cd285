"""Where a model comes from: a local folder, the artifact store, any fsspec URI, or the Hugging Face hub.

Every form resolves to a local Hugging Face folder (downloaded once into a cache), so trainers and
generators only ever load from disk and real models work unchanged where a hub is reachable. A worker on another
node resolves the same ``ModelSource`` on its own node, into that node's cache: no controller path crosses over.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec

from engine.errors import ModelLoadError
from engine.storage import ArtifactStore, StoreHandle

if TYPE_CHECKING:
    import torch

    from engine.cluster import VirtualCluster

REQUIRED_FILES = ("config.json",)


def skip_sklearn_in_transformers() -> None:
    """Have this process's transformers treat scikit-learn as absent.

    transformers imports scikit-learn (and scipy and pandas with it: about 3 s of a worker's start on 2 cores) whenever
    it is installed, for a feature of assisted generation that posttrain never uses; mlflow brings it into the
    environment. Trainer and generation workers, whose processes run none of the user's code, call this before their
    first transformers import: a ``None`` entry in ``sys.modules`` makes ``importlib.util.find_spec`` report the
    package missing."""
    sys.modules.setdefault("sklearn", None)


def _check_folder(path: Path, label: str) -> Path:
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise ModelLoadError(f"model {label} is not a Hugging Face model folder (missing {', '.join(missing)})")
    return path


def _download_uri(uri: str, cache_dir: Path, storage_options: dict[str, Any]) -> Path:
    """A copy of a remote model folder, named by the remote files' names, sizes and ETags (or modification
    times): a model replaced at the same URI is copied again, an unchanged one is not."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        fs.invalidate_cache()  # fsspec keeps listings per process
        if not fs.isdir(path):
            raise ModelLoadError(f"model not found: {uri}")
        listing = fs.find(path, detail=True)
        stamp = sorted(
            (name, info.get("size"), str(info.get("ETag") or info.get("mtime"))) for name, info in listing.items()
        )
        target = cache_dir / hashlib.sha256(repr((uri, stamp)).encode()).hexdigest()[:16]
        if (target / ".complete").exists():
            return target
        staging = cache_dir / f".{target.name}.{uuid.uuid4().hex[:8]}"
        fs.get(path.rstrip("/") + "/", str(staging), recursive=True)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - transport errors become one user-facing line
        raise ModelLoadError(f"cannot download model {uri}: {str(exc).splitlines()[0]}") from None
    _check_folder(staging, uri)
    (staging / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _download_hub(name: str, cache_dir: Path, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, revision=revision, cache_dir=str(cache_dir / "hub")))
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"cannot load model {name!r} from the Hugging Face hub: {reason}") from None


def resolve_model(name: str, store: ArtifactStore, cache_dir: Path, revision: str | None = None) -> Path:
    """A local folder holding the model named by ``name``.

    Order: a committed artifact of the store (by URI); an existing local path; any other URI through
    fsspec (with the store's settings where the scheme is the store's); otherwise a hub repo id (at ``revision``).
    """
    if name.startswith(store.root + "/") and store.is_committed(name):
        return _check_folder(store.download(name), name)
    local = Path(name.removeprefix("file://")).expanduser()
    if local.is_dir():
        return _check_folder(local, name)
    if "://" in name:
        return _download_uri(name, cache_dir / "models", store.options_for(name))
    if name.startswith(("/", ".", "~")):
        raise ModelLoadError(f"model folder not found: {name}")
    return _download_hub(name, cache_dir, revision)


def hub_revision(name: str, folder: Path) -> str | None:
    """The commit of the hub snapshot ``folder`` that ``name`` resolved to (a snapshot's folder is named by its
    commit); None where ``name`` is a URI or a folder, ``resolve_model``'s other cases."""
    return None if "://" in name or Path(name).expanduser().is_dir() else folder.name


@dataclass(frozen=True)
class ModelSource:
    """A model as any node finds it, for the workers that load it there: ``name`` as ``resolve_model`` takes it,
    opened through the controller's store (its artifacts land in the node's cache, once per digest). A hub repo is
    pinned to the commit the controller resolved, so every node loads the snapshot the stage was keyed on."""

    name: str
    store: StoreHandle
    revision: str | None = None

    @classmethod
    def resolved(cls, name: str, store: ArtifactStore, folder: Path) -> "ModelSource":
        """The source of ``name``, which the controller resolved to ``folder``."""
        return cls(name, store.handle(), hub_revision(name, folder))

    def local(self) -> Path:
        """The model's folder on this node."""
        store = self.store.open()
        return resolve_model(self.name, store, store.cache_dir.parent, self.revision)


def local_folder(model: ModelSource | Path) -> Path:
    """The model's folder here (a ``Path`` is a folder every node has at that path: one machine, a shared mount)."""
    return model if isinstance(model, Path) else model.local()


def node_folder(model: ModelSource | Path) -> str:
    """``local_folder`` as a worker's node sees it (run there by ``VirtualCluster.run_on_bundles``)."""
    return str(local_folder(model))


def folders_for_workers(virtual: "VirtualCluster", model: ModelSource | Path) -> list[Any]:
    """For each bundle of ``virtual``, the model's folder on that bundle's node, as a worker's ``model_path``: a
    ``Path`` as it is, a ``ModelSource`` fetched on each node by a task that the worker's start waits for."""
    if isinstance(model, Path):
        return [str(model)] * virtual.num_bundles
    return virtual.run_on_bundles(node_folder, model)


def check_same_tokenizer(policy_model: ModelSource | Path, other_model: ModelSource | Path, label: str) -> None:
    """One line when the model ``label`` (a distillation teacher, a critic) tokenizes otherwise than the policy: its
    per-token scores would belong to other tokens."""
    from transformers import AutoTokenizer

    policy = AutoTokenizer.from_pretrained(local_folder(policy_model))
    other = AutoTokenizer.from_pretrained(local_folder(other_model))
    if policy.get_vocab() != other.get_vocab() or policy.eos_token_id != other.eos_token_id:
        raise ModelLoadError(
            f"{label} has another tokenizer than the policy ({len(other)} vs {len(policy)} tokens, or other ids): "
            "both must share one"
        )


def set_config_dtype(folder: Path, dtype: str) -> None:
    """Record the weights' dtype in a saved model's config.json (what ``from_pretrained`` and vLLM read)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_hf_folder(folder: Path, layers: range | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """A Hugging Face model folder's config and state dict (all safetensors shards), in fp32; with ``layers``,
    only those decoder layers (plus embeddings, final norm and head), so a pipeline stage reads what it holds."""
    from safetensors import safe_open
    from transformers import AutoConfig

    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise ModelLoadError(f"{folder} is not a Hugging Face model folder (config.json and *.safetensors)")

    def wanted(key: str) -> bool:
        return layers is None or not key.startswith("model.layers.") or int(key.split(".")[2]) in layers

    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as shard:
            state.update({key: shard.get_tensor(key).float() for key in shard.keys() if wanted(key)})
    return AutoConfig.from_pretrained(folder), state
