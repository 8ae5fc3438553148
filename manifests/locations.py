"""Where a published artifact lives: ``hf://org/name[@revision]``, or a prefix in any file system fsspec knows
(``s3://bucket/prefix``, ``gs://``, ``az://``, ``memory://``, ...).

Shared by ``reshard publish`` (offline) and ``fetch_artifact`` (runtime). Parsing imports nothing: which schemes
work is fsspec's registry's business (``stores.open_filesystem``), and the Hub's client (huggingface_hub) and the
file systems are imported on first use, never at ``import reshard.loaders``.
"""

from __future__ import annotations

from dataclasses import dataclass

from reshard.manifests.errors import StorageError
from reshard.manifests.manifest import check_relative_path

HUB_SCHEME = "hf://"
LOCAL_SCHEMES = ("file", "local")  # fsspec's names for the local file system: a folder, not a store


@dataclass(frozen=True)
class HubLocation:
    """A model repo on the Hugging Face Hub, at a branch, tag or commit (``None``: the default branch)."""

    repo_id: str
    revision: str | None = None

    def uri(self, path: str = "", revision: str | None = None) -> str:
        at = revision or self.revision
        return f"{HUB_SCHEME}{self.repo_id}{'@' + at if at else ''}{'/' + path if path else ''}"


@dataclass(frozen=True)
class StoreLocation:
    """A prefix in an fsspec file system under which the artifact's files are stored with their manifest paths.

    ``root`` is the URL without its scheme (``bucket/prefix`` for an object store), checked to stay relative.
    """

    protocol: str
    root: str

    def key(self, path: str = "") -> str:
        """``root/path``: the object's path as the URL has it (``bucket/prefix/path``)."""
        return "/".join(part for part in (self.root, path) if part)

    def uri(self, path: str = "") -> str:
        return f"{self.protocol}://{self.key(path)}"

    def joined(self, name: str) -> StoreLocation:
        """The location ``name`` below this one (``name`` empty: this one)."""
        return StoreLocation(self.protocol, self.key(name))

    @property
    def is_top(self) -> bool:
        """True for a bare bucket or container (``s3://bucket``): an artifact goes below it, under its name."""
        return "/" not in self.root


def parse_location(uri: str) -> HubLocation | StoreLocation | None:
    """``hf://`` URIs and fsspec URLs as locations; ``None`` for a local path (``file://`` included).

    Example:
        >>> parse_location("hf://my-org/SmolLM2-1.7B-tp8@v1")
        HubLocation(repo_id='my-org/SmolLM2-1.7B-tp8', revision='v1')
        >>> parse_location("s3://bucket/models/smollm-tp8/")
        StoreLocation(protocol='s3', root='bucket/models/smollm-tp8')
        >>> parse_location("gs://bucket/smollm-tp8").uri("manifest.json")
        'gs://bucket/smollm-tp8/manifest.json'
    """
    if uri.startswith(HUB_SCHEME):
        repo_id, _, revision = uri[len(HUB_SCHEME) :].partition("@")
        repo_id = repo_id.strip("/")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise StorageError(f"{uri}: expected hf://ORG/NAME or hf://ORG/NAME@REVISION")
        return HubLocation(repo_id, revision or None)
    scheme, separator, rest = uri.partition("://")
    if not separator or scheme in LOCAL_SCHEMES:
        return None
    if not (scheme[:1].isalpha() and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum()):
        raise StorageError(f"{uri}: not a URL (SCHEME://BUCKET/PREFIX) nor a folder")
    root = rest.strip("/")
    if not root.partition("/")[0]:
        raise StorageError(f"{uri}: expected {scheme}://BUCKET/PREFIX")
    check_relative_path(root, uri)
    return StoreLocation(scheme.lower(), root)
