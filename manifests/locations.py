"""Where a published artifact lives: ``hf://org/name[@revision]`` or ``s3://bucket/prefix``, and the S3 client.

Shared by ``reshard publish`` (offline) and ``fetch_artifact`` (runtime). The clients are imported on first use,
never at ``import reshard.loaders``: huggingface_hub for the Hub, s3fs (the ``reshard[s3]`` extra) for S3, which
reads endpoint, credentials and region the standard AWS way (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ...), so MinIO
and other S3-compatible stores work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reshard.manifests.errors import StorageError
from reshard.manifests.manifest import check_relative_path

HUB_SCHEME = "hf://"
S3_SCHEME = "s3://"


@dataclass(frozen=True)
class HubLocation:
    """A model repo on the Hugging Face Hub, at a branch, tag or commit (``None``: the default branch)."""

    repo_id: str
    revision: str | None = None

    def uri(self, path: str = "", revision: str | None = None) -> str:
        at = revision or self.revision
        return f"{HUB_SCHEME}{self.repo_id}{'@' + at if at else ''}{'/' + path if path else ''}"


@dataclass(frozen=True)
class S3Location:
    """A prefix in an S3 bucket under which the artifact's files are stored with their manifest paths."""

    bucket: str
    prefix: str

    def key(self, path: str) -> str:
        """The object's s3fs path (``bucket/prefix/path``)."""
        return "/".join(part for part in (self.bucket, self.prefix, path) if part)

    def uri(self, path: str = "") -> str:
        return S3_SCHEME + self.key(path)


def parse_location(uri: str) -> HubLocation | S3Location | None:
    """``hf://`` and ``s3://`` URIs as locations; ``None`` for anything else (a local path).

    Example:
        >>> parse_location("hf://my-org/SmolLM2-1.7B-tp8@v1")
        HubLocation(repo_id='my-org/SmolLM2-1.7B-tp8', revision='v1')
        >>> parse_location("s3://bucket/models/smollm-tp8/")
        S3Location(bucket='bucket', prefix='models/smollm-tp8')
    """
    if uri.startswith(HUB_SCHEME):
        repo_id, _, revision = uri[len(HUB_SCHEME) :].partition("@")
        repo_id = repo_id.strip("/")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise StorageError(f"{uri}: expected hf://ORG/NAME or hf://ORG/NAME@REVISION")
        return HubLocation(repo_id, revision or None)
    if uri.startswith(S3_SCHEME):
        bucket, _, prefix = uri[len(S3_SCHEME) :].partition("/")
        prefix = prefix.strip("/")
        if not bucket:
            raise StorageError(f"{uri}: expected s3://BUCKET/PREFIX")
        if prefix:
            check_relative_path(prefix, uri)
        return S3Location(bucket, prefix)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported scheme; use a folder, hf://ORG/NAME or s3://BUCKET/PREFIX")
    return None


def s3_filesystem() -> Any:
    """A fresh ``s3fs.S3FileSystem`` configured from the environment (not fsspec's shared instance, whose
    listings may be stale after another process wrote)."""
    try:
        import s3fs
    except ImportError as exc:
        raise StorageError("s3:// needs s3fs: pip install 'reshard[s3]'") from exc
    return s3fs.S3FileSystem(skip_instance_cache=True)
