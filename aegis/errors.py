"""The one base of the errors a user causes and can fix. Each message names the file, line, key or option at fault.

    AegisError
        ConfigError       aegis/config.py       a config file, a --set override, a setting this machine cannot honour
        CheckpointError   here                  a checkpoint that is missing, incomplete, damaged or does not fit its base
        ModelError        here                  a base model that cannot be found or does not fit what is asked of it
        DataError         train/data.py         a data source or one of its records
        ExportError       export/files.py       export's inputs, or an export check that failed
        RunFailed         train/compare.py      a recipe's training run that exited with an error

The CLIs catch AegisError alone and print its message on one line; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class AegisError(Exception):
    pass


class ModelError(AegisError):
    pass


class CheckpointError(AegisError):
    pass
