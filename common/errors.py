"""The project's errors: one base class, and on each class the exit status `carvana` ends with.

User mistakes, which the message says how to fix, exit 2; failures during the work exit 1; an
interrupt exits 130 (pipelines/cli.py). Every message names the file, setting or photo at fault.
"""
from __future__ import annotations


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
    """An image or mask that cannot be used; the message names the file and the reason."""


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
