"""The reshard artifact format: the manifest dataclasses, its JSON Schema, and the built-in tensor-parallel plans.

Installed as ``reshard.manifests``; imported by both the offline stage and the runtime.
"""

from reshard.manifests.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    Placement,
    RankSlice,
    SourceInfo,
    TensorEntry,
    rank_file_name,
    read_manifest,
    resolve_in,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "FileEntry",
    "Manifest",
    "Placement",
    "RankSlice",
    "SourceInfo",
    "TensorEntry",
    "rank_file_name",
    "read_manifest",
    "resolve_in",
]
