"""User-facing errors: anything a user can fix (a config key, a file, a bucket, a dataset row).

The CLI prints these as one line and exits non-zero; everything else is a bug and keeps its traceback.
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
