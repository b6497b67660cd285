"""torch profiler traces of chosen steps, taken inside the workers (where the compute is) and handed back as bytes.

A worker that mixes in ``Profiled`` starts a trace on ``start_profile`` and returns it, as a gzipped Chrome trace
(open in Perfetto or chrome://tracing), on ``stop_profile``: the controller attaches it to the stage's run. CPU
activities always, CUDA ones where the worker sees a GPU.
"""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from engine.config import ProfileConfig
    from engine.tracking import StageRun


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


class StepTraces:
    """A stage loop's traces: started before the first profiled step (or the first one run, after a resume into the
    range), stopped after the last (or when the loop ends first), attached to the stage's run under
    ``profile/<stage>/``. ``trainer``: the trainer group; ``generation``: the generation group where the stage
    generates."""

    def __init__(self, cfg: "ProfileConfig", run: "StageRun", stage: str, trainer: Any, generation: Any = None):
        self.cfg, self.run, self.stage = cfg, run, stage
        self.trainer, self.generation = trainer, generation
        self.active, self.first = False, 0

    def before(self, step: int) -> None:
        """``step``: the 1-based number of the step about to run."""
        steps = self.cfg.steps
        if steps and not self.active and steps[0] <= step <= steps[1]:
            self.trainer.start_profile(self.cfg.ranks)
            if self.generation is not None:
                self.generation.start_profile()
            self.active, self.first = True, step

    def after(self, step: int) -> None:
        if self.active and step >= self.cfg.steps[1]:
            self.close(step)

    def close(self, last: int) -> None:
        """Stop the traces (if running) and attach them, named by the steps they cover."""
        if not self.active:
            return
        self.active = False
        traces = {f"trainer_rank{rank}": trace for rank, trace in self.trainer.stop_profile(self.cfg.ranks).items()}
        if self.generation is not None:
            traces.update({f"generation_worker{i}": trace for i, trace in self.generation.stop_profile().items()})
        with tempfile.TemporaryDirectory(prefix="traces-") as tmp:
            for name, trace in traces.items():
                if trace:
                    path = Path(tmp) / f"{name}_steps{self.first}-{last}.json.gz"
                    path.write_bytes(trace)
                    self.run.log_artifact(path, f"profile/{self.stage}")
