"""The two kinds of failure a run reports in one line:

- user errors (``PosttrainError``): anything a user can fix (a config key, a file, a bucket, a dataset row, their
  code); never retried; the CLI exits 2;
- infrastructure faults (``InfrastructureError``): the machinery failed (storage stalled, a worker died); retried by
  the orchestrator or recovered in the stage; once retries are spent the CLI exits 1.

Everything else is a bug and keeps its traceback.
"""


class PosttrainError(Exception):
    """An error the user can fix; its message names the field, file or URI at fault."""


class ConfigError(PosttrainError):
    pass


class DataError(PosttrainError):
    pass


class StorageError(PosttrainError):
    pass


class ModelLoadError(PosttrainError):
    pass


class InfrastructureError(Exception):
    """A fault of the machinery, not of the input: worth retrying; its message is one line naming what failed."""
