"""The format core: everything both halves of reshard share, and nothing else.

The manifest (``manifest``, ``transforms``), the layout of every style (``layout``), where tensor bytes are stored
(``chunks``), the built-in plans (``plans``), the safetensors container, hashing, locations, errors and progress.
Installed as ``reshard.manifests``; imported by the offline stage and the runtime, it imports neither.
"""

from reshard.manifests.manifest import (
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
