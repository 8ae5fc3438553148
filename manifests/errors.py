"""Exceptions raised by reshard, offline and at runtime, each with the exit code the CLI gives it.

Every error names the file and, where there is one, the tensor or field it is about, so that the CLI can print it
as one line. Errors that wrap an operating-system failure (``OutputError``, ``StorageError``) are also ``OSError``s,
as huggingface_hub's are, so ``except OSError`` still catches them.
"""

from __future__ import annotations


class ReshardError(Exception):
    """Base class of every error reshard raises on purpose; the CLI prints these without a traceback."""

    exit_code = 1


class SourceError(ReshardError):
    """The source checkpoint is missing or inconsistent (no such folder or repo, an index naming a missing tensor)."""

    exit_code = 3


class PlanError(ReshardError):
    """A tensor-parallel plan cannot be resolved: unknown style, unknown architecture, a rule matching nothing."""

    exit_code = 4


class ShardabilityError(ReshardError):
    """The model cannot be split at the requested tp (heads or KV heads not divisible), checked before any weight."""

    exit_code = 5


class ManifestError(ReshardError):
    """A manifest is missing, of another format version, malformed, or names a path outside its artifact."""

    exit_code = 6


class IntegrityError(ReshardError):
    """Bytes on disk do not match the hash or size the manifest records for them."""

    exit_code = 7


class OutputExistsError(ReshardError):
    """The output folder exists and ``--overwrite`` was not given."""

    exit_code = 8


class OutputError(ReshardError, OSError):
    """An output file could not be written: no space left, a read-only file system, no permission, an I/O error."""

    exit_code = 11


class MeshError(ReshardError):
    """The device mesh or world size does not fit the artifact (wrong tp size, no ``tp`` dimension)."""

    exit_code = 9


class FileFormatError(ReshardError):
    """A file is damaged: a safetensors file truncated, its header not valid JSON, or lying about sizes or offsets
    (distinct from ``SourceError``: the file is there, its bytes are wrong)."""

    exit_code = 12


class StorageError(ReshardError, OSError):
    """A destination or remote artifact cannot be read or written: unknown scheme, missing object or bucket,
    access denied, a network failure, or the client library for the scheme is not installed."""

    exit_code = 10


def shown(value: object) -> str:
    """A JSON rendering of a (possibly huge) value for an error message, cut to stay on one line."""
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
