"""Checkpoints and exports that each trainer rank writes to, and reads from, the store itself.

On a cluster of many machines a rank's disk is not the controller's: a rank stages its own files on its node's
scratch disk, uploads them into the controller's open upload and hands back their manifest entries; the controller
writes the manifest once every rank (and every companion group) has, so an upload cut short never reads as
committed. Reading is the same the other way round: each node downloads the committed artifact into its own cache,
once per content digest, so a resumed run may place its ranks on other nodes than the run that saved.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Self

from engine.storage import ManifestEntry, StoreHandle, Upload, node_scratch


class InFolder:
    """A place in an artifact, ``under`` one of its folders (a companion group's)."""

    under: str

    def within(self, folder: str) -> Self:
        return replace(self, under="/".join(filter(None, (self.under, folder))))  # type: ignore[type-var]


@dataclass(frozen=True)
class ShardTarget(InFolder):
    """Where a group's ranks upload what they write."""

    store: StoreHandle
    upload: Upload
    under: str = ""

    def write(self, save: Callable[[Path], None]) -> list[ManifestEntry]:
        """``save`` writes this rank's files into an empty folder on its node; they are uploaded, the folder goes."""
        scratch = node_scratch()
        if scratch is not None:
            scratch.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="shards-", dir=scratch))
        try:
            save(staging)
            return self.store.open().put_dir(staging, self.upload, self.under)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class ShardSource(InFolder):
    """A committed artifact (``uri``) a group's ranks read from."""

    store: StoreHandle
    uri: str
    under: str = ""

    def local(self) -> Path:
        """The folder on this node (downloaded into the node's cache once per digest)."""
        return self.store.open().download(self.uri) / self.under


class StoreTransfers:
    """Mixed into a trainer worker that has folder-based ``save_checkpoint``, ``load_checkpoint`` and ``export_hf``:
    the same through the store, from the rank's own node."""

    def save_checkpoint_to(self, target: ShardTarget) -> list[ManifestEntry]:
        return target.write(lambda folder: self.save_checkpoint(str(folder)))  # type: ignore[attr-defined]

    def load_checkpoint_from(self, source: ShardSource) -> None:
        self.load_checkpoint(str(source.local()))  # type: ignore[attr-defined]

    def export_to(self, target: ShardTarget, dtype: str) -> list[ManifestEntry]:
        return target.write(lambda folder: self.export_hf(str(folder), dtype))  # type: ignore[attr-defined]
