"""The project's errors: one base class, and on each class the exit status `carvana` ends with;
and `Failure`, the result of one image that could not be predicted, which is not an error.

User mistakes, which the message says how to fix, exit 2; failures during the work exit 1; an
interrupt exits 130 (pipelines/cli.py). Every message names the file, setting or photo at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal


class CarvanaError(Exception):
    """Base of every error the project raises on purpose; `carvana` prints its message in one line."""

    exit_code = 1


class UserError(CarvanaError):
    """Something the user can fix and then rerun the same command."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A setting, option or command-line word that cannot be meant."""


class DataError(UserError, ValueError):
    """A data folder, file or table that cannot be used."""


class ImageReadError(DataError):
    """An image or mask that cannot be used: `file` (a path, or the name of an upload) and `reason`."""

    def __init__(self, file: object, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = str(file), reason

    def __reduce__(self):  # pickled (reader processes, Dask) with both parts
        return type(self), (self.file, self.reason)


class UnsupportedImage(ImageReadError):
    """An image in a format the reader does not take (the server answers 415)."""


class TooLarge(ImageReadError):
    """An upload of more bytes or pixels than the server's limits (413)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, not this project's, or of another net than the config asks for."""


class SetupError(UserError):
    """This machine lacks what a setting asks for (CUDA, Dask): install it or change the setting."""


class FolderBusy(UserError):
    """Another live run holds the output folder."""


class TrainingError(CarvanaError):
    """Training cannot go on (the loss diverged); the message says what to change."""


class ClusterError(CarvanaError):
    """The Dask scheduler of `predict.cluster` cannot be reached."""


class OutputError(CarvanaError, OSError):
    """A result that could not be written (full disk, no permission, read-only place); names the file.
    Finished work stays: the same command continues once it can write."""


@dataclass(frozen=True)
class Failure:
    """One image's result when it has no prediction: the file (or upload) and why, and where it was
    given up (`read`: the file could not be decoded; `stage1`, `stage2`: a stage could not predict
    it). A result, not an exception: the run goes on with the other images, and the command lists
    the failures in errors.csv and exits 1 at the end. A device step sees pixels, not files: its
    failures have no `file` until the stream (or the server) that knows it names them (`named`)."""

    file: str | None
    reason: str
    stage: Literal["read", "stage1", "stage2"] = "read"

    @classmethod
    def of(cls, error: ImageReadError) -> Failure:
        return cls(error.file, error.reason, "read")

    def named(self, file: str) -> Failure:
        return self if self.file is not None else replace(self, file=file)

    def __str__(self) -> str:
        return f"{self.file or 'an image'}: {self.reason}"
