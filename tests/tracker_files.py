"""Reading back what TensorBoard and W&B (offline) wrote, from their files alone."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def wandb_home(folder: Path) -> dict[str, str]:
    """The environment that keeps W&B's settings, cache and staging files in ``folder`` (not the user's home)."""
    return {f"WANDB_{name}_DIR": str(folder / f"wandb-{name.lower()}") for name in ("CONFIG", "CACHE", "DATA")}


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's ``run-<id>.wandb`` file: a LevelDB-style log (7-byte header, 32 KiB blocks,
    each record a 4-byte checksum, 2-byte length and 1-byte type: full, first, middle or last part)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.parent.glob("run-*.wandb")
    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, pos, payload = [], header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # the block's tail is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + header])
        payload += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
        elif kind == 0:
            break
    return records


def wandb_history(records: list) -> dict[str, dict[int, float]]:
    curves: dict[str, dict[int, float]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in items.items():
                if not key.startswith("_"):
                    curves.setdefault(key, {})[int(items["_step"])] = value
    return curves


def wandb_config(records: list) -> dict[str, str]:
    config: dict[str, str] = {}
    for record in records:
        if record.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return config


def wandb_run(records: list):
    """The run record: name, group, job type."""
    return next(r.run for r in records if r.WhichOneof("record_type") == "run")
