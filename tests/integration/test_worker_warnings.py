"""A Ray worker's warning reaches the driver's ``posttrain.workers`` logger (so the CLI's stderr and the Prefect task
log), through the real log stream of an embedded Ray; its other output does not."""

from __future__ import annotations

import logging
import time

import ray


@ray.remote(num_cpus=0)
class Noisy:
    def speak(self) -> bool:
        import sys
        import warnings

        print("chatter on stdout", flush=True)
        print("an ordinary stderr line", file=sys.stderr, flush=True)
        warnings.warn("posttrain-test: a worker's warning", stacklevel=1)
        sys.stderr.flush()
        return True


def test_a_workers_warning_reaches_the_driver_and_its_chatter_does_not(ray_local, caplog):
    with caplog.at_level(logging.INFO, logger="posttrain.workers"):
        actor = Noisy.remote()
        assert ray.get(actor.speak.remote())
        deadline = time.monotonic() + 60  # Ray's log monitor polls the worker's files
        while not any("posttrain-test: a worker's warning" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.2)
        ray.kill(actor)
    warned = [r.getMessage() for r in caplog.records if "UserWarning: posttrain-test" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("[Noisy pid="), warned
    assert not any("chatter" in r.getMessage() or "ordinary" in r.getMessage() for r in caplog.records)
