"""The project's errors for bad input: one family, so that ``cli.py`` reports each as one line, exit code 2.

Every error raised because of something the user gave (an argument, a file, a folder) is an
:class:`AttributionInputError`, a ``ValueError`` whose message names the argument or file, what was
expected and what was given ("Expected `arg` to be ..., but got ..."). Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

__all__ = ["AttributionInputError", "SettingsError", "SettingsTypeError", "CorruptFileError", "NonFiniteError",
           "StoreMismatchError", "CheckpointMismatchError", "SubsetMaskError", "MembersError", "ShardError",
           "PatchError", "TargetsError", "DataSourceError", "ProtocolError"]


class AttributionInputError(ValueError):
    """Bad input the user can fix; the message names the argument or file, the expected and the given."""


class SettingsError(AttributionInputError):
    """A setting (an argument of a command, module or datamodule) has a value that cannot work."""


class SettingsTypeError(SettingsError, TypeError):
    """A setting has the wrong type (also a ``TypeError``)."""


class CorruptFileError(AttributionInputError):
    """A file is unreadable, truncated, of the wrong size, or fails its recorded checksum."""


class NonFiniteError(AttributionInputError):
    """NaN or inf where a result must be finite: a training loss, weights, features, eigenvalues, scores."""


class StoreMismatchError(AttributionInputError):
    """The folder holds a feature store made with different metadata."""


class CheckpointMismatchError(AttributionInputError):
    """A checkpoint was made with other data or for another model than the one given now."""


class SubsetMaskError(AttributionInputError):
    """A subset mask file is missing, unreadable or does not describe a subset of the data."""


class MembersError(AttributionInputError):
    """The training members of a checkpoint (``members`` of scoring) cannot be established: its recorded subset
    mask is missing, or a mask file's hash differs from the one the checkpoint records."""


class ShardError(AttributionInputError):
    """A shard is missing, truncated, corrupt, or does not match ``manifest.json``."""


class PatchError(SettingsError):
    """A patch (rectangle or mask file) is malformed, of the wrong shape, or selects nothing."""


class TargetsError(AttributionInputError):
    """Recorded targets are missing, unreadable, empty, or do not fit the request (ids, steps, data)."""


class DataSourceError(AttributionInputError):
    """A datamodule's source (array file, image folder, ...) cannot be read as training images."""


class ProtocolError(AttributionInputError, TypeError):
    """A LightningModule or datamodule lacks members of the attribution protocol (``attribution/protocol.py``);
    also a ``TypeError``."""
