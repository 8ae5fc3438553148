"""``reshard publish``: put an artifact in a folder, an S3 prefix or a Hub repo, so that ranks can fetch their file.

Plan, then execute: read the manifest and check every file's size (a broken artifact is refused before anything
is sent), then send the files and the manifest last. A reader therefore never sees a half-published artifact: on
a folder or S3 an artifact without its manifest is incomplete by definition (and a different manifest already at
the destination is removed first, so the old artifact stops being one before its files change); on the Hub
everything, with a model card, is one commit.

Publishing is safe to retry. Folder and S3 skip files whose size and xxh3 already match at the destination (S3
keeps the xxh3 in object metadata, ``x-amz-meta-xxh3``; a folder's files are re-hashed), and every file is hashed
while it is sent: bytes that do not match the manifest are discarded instead of committed. The Hub skips files
whose sha256 it already holds (huggingface_hub compares them before uploading).

A destination ending in ``/`` receives the artifact under its folder name: ``reshard publish ./m-tp8 /mnt/models/``
writes ``/mnt/models/m-tp8``; without the slash the destination is the artifact's own location.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from reshard.commands.model_card import model_card
from reshard.manifests import MANIFEST_NAME, FileEntry, Manifest, read_manifest, resolve_in
from reshard.manifests.errors import IntegrityError, StorageError
from reshard.manifests.hashing import CHUNK_BYTES, hash_file
from reshard.manifests.locations import HubLocation, S3Location, parse_location, s3_filesystem
from reshard.manifests.progress import progress_bar
from reshard.manifests.storage import atomic_file, file_chunks, fsync_dir, os_errors, verified_copy

S3_PART_BYTES = 64 * 1024 * 1024  # multipart size: up to 640 GB per file within S3's 10,000 parts
XXH3_METADATA = "xxh3"  # stored as x-amz-meta-xxh3 on every object but the manifest


@dataclass(frozen=True)
class LocalArtifact:
    """The artifact to publish: its folder, parsed manifest and the manifest's exact bytes."""

    root: Path
    manifest: Manifest
    manifest_bytes: bytes

    def path(self, entry: FileEntry) -> Path:
        return resolve_in(self.root, entry.path)

    def upload_order(self) -> list[FileEntry]:
        """Config and tokenizer files first, then rank files by rank; the manifest is not among them (it is last)."""
        return sorted(self.manifest.files, key=lambda f: (f.rank is not None, f.rank or 0, f.path))

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.manifest.files)


def publish(
    artifact: str | os.PathLike[str],
    destination: str,
    *,
    progress: bool = True,
    token: str | None = None,
) -> str:
    """Copy an artifact to a folder, ``s3://BUCKET/PREFIX`` or ``hf://ORG/NAME[@REVISION]``, manifest last.

    Args:
        artifact: a complete artifact folder (with ``manifest.json``).
        destination: a folder path, ``s3://...`` (needs ``reshard[s3]``; endpoint, credentials and region come from
            the standard AWS settings) or ``hf://...`` (one commit; the repo and branch are created if missing).
            A trailing ``/`` means "into this folder/prefix, under the artifact's name".
        progress: show a progress bar of bytes.
        token: Hub token for ``hf://`` (default: the logged-in one).

    Returns:
        Where the artifact now is, as ``fetch_artifact`` and ``load_model`` accept it.

    Raises:
        IntegrityError: a local file is missing or differs from the manifest (nothing of it is published).
        StorageError: the destination cannot be written (missing bucket, access denied, network).

    Example:
        >>> publish("./SmolLM2-1.7B-tp8", "s3://bucket/models/")  # doctest: +SKIP
        's3://bucket/models/SmolLM2-1.7B-tp8'
    """
    local = open_local(artifact)
    location = parse_location(destination)
    if isinstance(location, HubLocation):
        return _publish_hub(local, location, token, progress)
    into_folder = destination.endswith(("/", os.sep)) or (isinstance(location, S3Location) and not location.prefix)
    name = local.root.name if into_folder else ""
    if isinstance(location, S3Location):
        store: _Store = _S3Store(S3Location(location.bucket, "/".join(p for p in (location.prefix, name) if p)))
    else:
        store = _FolderStore(Path(destination.removeprefix("file://")).expanduser().absolute() / name)
    return _publish_to_store(local, store, progress)


def open_local(artifact: str | os.PathLike[str]) -> LocalArtifact:
    """Read the artifact's manifest and check that every file it names is there with the recorded size."""
    root = Path(artifact).absolute()
    manifest = read_manifest(root)
    problems = []
    for entry in manifest.files:
        path = resolve_in(root, entry.path)
        if not path.is_file():
            problems.append(f"{entry.path} is missing")
        elif (size := path.stat().st_size) != entry.size:
            problems.append(f"{entry.path} has {size} bytes, the manifest records {entry.size}")
    if problems:
        raise IntegrityError(f"{root}: not publishing a broken artifact: {'; '.join(problems)} (see reshard verify)")
    return LocalArtifact(root, manifest, (root / MANIFEST_NAME).read_bytes())


class _Store(Protocol):
    """A folder-like destination: the manifest-last protocol of ``_publish_to_store`` over its few operations."""

    uri: str

    def read(self, path: str) -> bytes | None: ...
    def delete(self, path: str) -> None: ...
    def has(self, entry: FileEntry) -> bool: ...
    def put(self, source: Path, entry: FileEntry, on_bytes: Callable[[int], None]) -> None: ...
    def put_bytes(self, path: str, data: bytes) -> None: ...


def _publish_to_store(local: LocalArtifact, store: _Store, progress: bool) -> str:
    existing = store.read(MANIFEST_NAME)
    if existing is not None and existing != local.manifest_bytes:
        store.delete(MANIFEST_NAME)  # another artifact is here: it stops being one before any of its files change
    with progress_bar(total=local.total_bytes, desc=f"publish {store.uri}", enabled=progress) as bar:
        for entry in local.upload_order():
            if store.has(entry):
                bar.update(entry.size)
                continue
            store.put(local.path(entry), entry, bar.update)
    if existing != local.manifest_bytes:
        store.put_bytes(MANIFEST_NAME, local.manifest_bytes)
    return store.uri


def _send_verified(
    source: Path, entry: FileEntry, sink: Callable[[bytes], Any], on_bytes: Callable[[int], None]
) -> None:
    """Feed ``source`` to ``sink`` while hashing the same bytes; ``IntegrityError`` if they are not the manifest's
    (the caller then discards what it sent)."""
    try:
        verified_copy(file_chunks(source, CHUNK_BYTES), sink, entry, str(source), on_bytes)
    except IntegrityError as exc:
        raise _changed(source) from exc


def _changed(source: Path) -> IntegrityError:
    return IntegrityError(f"{source}: changed since the manifest was written (see reshard verify); not published")


class _FolderStore:
    """A local or mounted folder (NFS, Lustre, a FUSE bucket): each file written to a hidden name and renamed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = str(root)

    def read(self, path: str) -> bytes | None:
        target = resolve_in(self.root, path) if self.root.is_dir() else None
        return target.read_bytes() if target is not None and target.is_file() else None

    def delete(self, path: str) -> None:
        resolve_in(self.root, path).unlink(missing_ok=True)
        fsync_dir(self.root)

    def has(self, entry: FileEntry) -> bool:
        target = resolve_in(self.root, entry.path)
        return target.is_file() and target.stat().st_size == entry.size and hash_file(target)[1] == entry.xxh3

    def put(self, source: Path, entry: FileEntry, on_bytes: Callable[[int], None]) -> None:
        target = resolve_in(self.root, entry.path)
        with os_errors(target, StorageError, "cannot write", missing=False), atomic_file(target) as out:
            _send_verified(source, entry, out.write, on_bytes)  # a raise discards the temporary file

    def put_bytes(self, path: str, data: bytes) -> None:
        target = resolve_in(self.root, path)
        with os_errors(target, StorageError, "cannot write", missing=False), atomic_file(target) as out:
            out.write(data)


class _S3Store:
    """An S3 prefix through s3fs: multipart uploads committed only once the bytes sent match the manifest.

    An upload that fails is aborted (its parts would otherwise be stored, and billed, until a lifecycle rule
    removes them); uploads a killed publish left for this artifact's keys are aborted before a retry sends them.
    """

    def __init__(self, location: S3Location) -> None:
        self.location = location
        self.uri = location.uri()
        self.fs = s3_filesystem()
        with os_errors(self.uri, StorageError, "cannot list"):
            if not self.fs.exists(location.bucket):
                raise StorageError(f"s3://{location.bucket}: no such bucket (or no access to it); create it first")
            prefix = location.key("")
            listing = self.fs.find(prefix, detail=True)
        self.sizes = {name[len(prefix) + 1 :]: info["size"] for name, info in listing.items()}  # one LIST
        self._stale: dict[str, list[str]] | None = None

    def read(self, path: str) -> bytes | None:
        if path not in self.sizes:
            return None
        with os_errors(self.location.uri(path), StorageError, "cannot read"):
            return bytes(self.fs.cat_file(self.location.key(path)))

    def delete(self, path: str) -> None:
        with os_errors(self.location.uri(path), StorageError, "cannot delete"):
            self.fs.rm_file(self.location.key(path))

    def has(self, entry: FileEntry) -> bool:
        if self.sizes.get(entry.path) != entry.size:
            return False
        key = self.location.key(entry.path)
        with os_errors(self.location.uri(entry.path), StorageError, "cannot read"):
            metadata = self.fs.metadata(key, refresh=True)
        return bool(metadata.get(XXH3_METADATA) == entry.xxh3)

    def put(self, source: Path, entry: FileEntry, on_bytes: Callable[[int], None]) -> None:
        uri = self.location.uri(entry.path)
        self._abort_stale(entry.path)
        metadata = {"Metadata": {XXH3_METADATA: entry.xxh3}}
        key = self.location.key(entry.path)
        with os_errors(uri, StorageError, "cannot write"):
            handle = self.fs.open(key, "wb", autocommit=False, block_size=S3_PART_BYTES, **metadata)
            try:
                _send_verified(source, entry, handle.write, on_bytes)
                handle.close()  # uploads the last part; nothing is visible before commit()
                handle.commit()
            except BaseException:
                with contextlib.suppress(Exception):  # the original error matters more than a failed abort
                    handle.discard()  # aborts the multipart upload: no partial or unverified object remains
                handle.closed = True  # else the file's __del__ would flush the bytes it still holds: a new upload
                raise

    def put_bytes(self, path: str, data: bytes) -> None:
        with os_errors(self.location.uri(path), StorageError, "cannot write"):
            self.fs.pipe_file(self.location.key(path), data)

    def _abort_stale(self, path: str) -> None:
        """Abort multipart uploads of this key that a killed publish left (listed once, on the first put)."""
        bucket, prefix = self.location.bucket, f"{self.location.prefix}/" if self.location.prefix else ""
        if self._stale is None:
            self._stale = {}
            with os_errors(self.uri, StorageError, "cannot list multipart uploads"):
                for page in self._paged("list_multipart_uploads", Bucket=bucket, Prefix=prefix):
                    for upload in page.get("Uploads", []):
                        self._stale.setdefault(upload["Key"][len(prefix) :], []).append(upload["UploadId"])
        for upload_id in self._stale.pop(path, []):
            with os_errors(self.location.uri(path), StorageError, "cannot abort a stale multipart upload"):
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=prefix + path, UploadId=upload_id)

    def _paged(self, method: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        while True:
            page = self.fs.call_s3(method, **kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            kwargs.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))


def _publish_hub(local: LocalArtifact, location: HubLocation, token: str | None, progress: bool) -> str:
    """One commit with every file, a model card and the manifest: the Hub shows all of it or none of it."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    api = HfApi(token=token)
    operations = [_hub_operation(local, entry) for entry in local.upload_order()]
    card = model_card(local.manifest, location.repo_id, location.revision)
    operations.append(CommitOperationAdd("README.md", card.encode()))
    operations.append(CommitOperationAdd(MANIFEST_NAME, local.manifest_bytes))
    tp = " x ".join(f"{k}={v}" for k, v in local.manifest.mesh.items())
    quiet = not progress and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        api.create_repo(location.repo_id, repo_type="model", exist_ok=True)
        if location.revision:
            api.create_branch(location.repo_id, branch=location.revision, exist_ok=True)
        api.create_commit(
            location.repo_id,
            operations,
            commit_message=f"reshard publish: {local.manifest.architecture} {tp}",
            revision=location.revision,
        )
    except (HfHubHTTPError, OSError) as exc:
        raise StorageError(f"{location.uri()}: {exc}") from exc
    finally:
        if quiet:
            enable_progress_bars()
    return location.uri()


def _hub_operation(local: LocalArtifact, entry: FileEntry) -> Any:
    """A commit addition for one file whose bytes are checked against the manifest, and whose upload is checked
    against those bytes.

    huggingface_hub uploads files by path (hf_xet reads them itself, so a verifying file object would not be
    used). So each file is read once here, its xxh3 compared with the manifest and its sha256 taken in the same
    pass; the upload's own sha256 (hf_xet computes it over the very bytes it sends, the LFS path by reading the
    file before sending) must then equal it, or ``IntegrityError`` stops ``create_commit`` before the commit is
    made. The commit names its LFS files by that sha256, i.e. by bytes that matched the manifest.
    """
    from huggingface_hub import CommitOperationAdd

    source = local.path(entry)
    sha = hashlib.sha256()
    _send_verified(source, entry, sha.update, lambda n: None)
    operation = CommitOperationAdd(entry.path, str(source))
    operation.upload_info = _checked_upload_info(operation.upload_info, sha.digest(), source)
    return operation


def _checked_upload_info(info: Any, expected: bytes, source: Path) -> Any:
    """``info`` (huggingface_hub's ``UploadInfo``) refusing any sha256 other than ``expected``, whether computed
    from the file later or reported by the uploader."""
    base = type(info)

    class CheckedUploadInfo(base):  # type: ignore[misc, valid-type]
        @property
        def sha256(self) -> bytes:
            value: bytes = base.sha256.fget(self)
            if value != expected:
                self._sha256: bytes | None = None
                raise _changed(source)
            return value

        @sha256.setter
        def sha256(self, value: bytes) -> None:
            if value != expected:
                raise _changed(source)
            self._sha256 = value

    return CheckedUploadInfo(size=info.size, sample=info.sample, source_path=str(source))
