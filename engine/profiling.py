"""torch profiler traces of chosen steps, taken inside the workers (where the compute is) and handed back as bytes.

A worker that mixes in ``Profiled`` starts a trace on ``start_profile`` and returns it, as a gzipped Chrome trace
(open in Perfetto or chrome://tracing), on ``stop_profile``: the controller attaches it to the stage's run. CPU
activities always, CUDA ones where the worker sees a GPU.
"""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path
from typing import Any

import torch


class Profiled:
    """Mixin: a trace of whatever the worker runs between ``start_profile`` and ``stop_profile``."""

    _profiler: Any = None

    def start_profile(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._profiler = profile(activities=activities, record_shapes=True)
        self._profiler.__enter__()

    def stop_profile(self) -> bytes:
        """The trace since ``start_profile`` (gzipped Chrome trace JSON); empty if none was started."""
        if self._profiler is None:
            return b""
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        with tempfile.TemporaryDirectory(prefix="trace-") as tmp:
            path = Path(tmp) / "trace.json"
            profiler.export_chrome_trace(str(path))
            return gzip.compress(path.read_bytes())
