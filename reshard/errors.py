"""Exceptions raised by reshard, offline and at runtime.

Every error names the file and, where there is one, the tensor it is about, so that the CLI can print it as one
line. This module imports nothing, so the runtime (``reshard.loaders``) can share it with the offline stage.
"""

from __future__ import annotations


class ReshardError(Exception):
    """Base class of every error reshard raises on purpose; the CLI prints these without a traceback."""

    exit_code = 1


class SourceError(ReshardError):
    """The source checkpoint is missing, truncated or inconsistent (a bad header, an index naming a missing tensor)."""

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


class OutputError(ReshardError):
    """An output file could not be written: no space left, a read-only file system, no permission, an I/O error."""

    exit_code = 11


class MeshError(ReshardError):
    """The device mesh or world size does not fit the artifact (wrong tp size, no ``tp`` dimension)."""

    exit_code = 9


class FileFormatError(ReshardError):
    """A safetensors file is truncated, its header is not valid JSON, or the header lies about sizes or offsets."""

    exit_code = 3


class StorageError(ReshardError):
    """A destination or remote artifact cannot be read or written: unknown scheme, missing object or bucket,
    access denied, a network failure, or the client library for the scheme is not installed."""

    exit_code = 10
