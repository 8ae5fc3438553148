"""``reshard publish``: put an artifact in a folder, a bucket (any fsspec URL) or a Hub repo, so ranks can fetch it.

Plan, then execute: read the manifest and check every file's size (a broken artifact is refused before anything
is sent), then send the files and the manifest last. A reader therefore never sees a half-published artifact: on
a folder or a bucket an artifact without its manifest is incomplete by definition (and a different manifest already at
the destination is removed first, so the old artifact stops being one before its files change); on the Hub
everything, with a model card, is one commit.

Publishing is safe to retry. Folders and buckets skip files whose size and xxh3 already match at the destination
(S3, GCS and Azure keep the xxh3 in object metadata, see ``manifests/stores.py``; a folder's files are re-hashed),
and every file is hashed while it is sent: bytes that do not match the manifest are discarded instead of committed.
The Hub skips files whose sha256 it already holds (huggingface_hub compares them before uploading).

A destination ending in ``/`` receives the artifact under its folder name: ``reshard publish ./m-tp8 /mnt/models/``
writes ``/mnt/models/m-tp8``; without the slash the destination is the artifact's own location.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from reshard.commands.model_card import model_card
from reshard.manifests import MANIFEST_NAME, FileEntry, Manifest, read_manifest, resolve_in
from reshard.manifests.errors import IntegrityError, StorageError
from reshard.manifests.hashing import CHUNK_BYTES, hash_file
from reshard.manifests.locations import HubLocation, StoreLocation, parse_location
from reshard.manifests.progress import progress_bar
from reshard.manifests.storage import atomic_file, file_chunks, fsync_dir, os_errors, verified_copy
from reshard.manifests.stores import Sink, Store


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
    """Copy an artifact to a folder, a bucket or ``hf://ORG/NAME[@REVISION]``, manifest last.

    Args:
        artifact: a complete artifact folder (with ``manifest.json``).
        destination: a folder path, any fsspec URL (``s3://BUCKET/PREFIX`` with ``reshard[s3]``, ``gs://`` with
            ``reshard[gcs]``, ``az://CONTAINER/PREFIX`` with ``reshard[azure]``, ...; endpoint and credentials come
            from the backend's own settings) or ``hf://...`` (one commit; the repo and branch are created if
            missing). A trailing ``/`` means "into this folder/prefix, under the artifact's name".
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
    into_folder = destination.endswith(("/", os.sep)) or (isinstance(location, StoreLocation) and location.is_top)
    name = local.root.name if into_folder else ""
    if isinstance(location, StoreLocation):
        store: _Store = Store(location.joined(name))
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
    """A folder-like destination (a folder, or ``stores.Store`` for a bucket): the manifest-last protocol of
    ``_publish_to_store`` over its few operations."""

    uri: str

    def existing(self, path: str) -> bytes | None: ...
    def delete(self, path: str) -> None: ...
    def has(self, entry: FileEntry) -> bool: ...
    def put(self, entry: FileEntry, send: Callable[[Sink], None]) -> None: ...
    def put_bytes(self, path: str, data: bytes) -> None: ...


def _publish_to_store(local: LocalArtifact, store: _Store, progress: bool) -> str:
    existing = store.existing(MANIFEST_NAME)
    if existing is not None and existing != local.manifest_bytes:
        store.delete(MANIFEST_NAME)  # another artifact is here: it stops being one before any of its files change
    with progress_bar(total=local.total_bytes, desc=f"publish {store.uri}", enabled=progress) as bar:
        for entry in local.upload_order():
            if store.has(entry):
                bar.update(entry.size)
                continue
            store.put(entry, functools.partial(_send_verified, local.path(entry), entry, on_bytes=bar.update))
    if existing != local.manifest_bytes:
        store.put_bytes(MANIFEST_NAME, local.manifest_bytes)
    return store.uri


def _send_verified(source: Path, entry: FileEntry, sink: Sink, on_bytes: Callable[[int], None]) -> None:
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

    def existing(self, path: str) -> bytes | None:
        target = resolve_in(self.root, path) if self.root.is_dir() else None
        return target.read_bytes() if target is not None and target.is_file() else None

    def delete(self, path: str) -> None:
        resolve_in(self.root, path).unlink(missing_ok=True)
        fsync_dir(self.root)

    def has(self, entry: FileEntry) -> bool:
        target = resolve_in(self.root, entry.path)
        return target.is_file() and target.stat().st_size == entry.size and hash_file(target)[1] == entry.xxh3

    def put(self, entry: FileEntry, send: Callable[[Sink], None]) -> None:
        target = resolve_in(self.root, entry.path)
        with os_errors(target, StorageError, "cannot write", missing=False), atomic_file(target) as out:
            send(out.write)  # a raise discards the temporary file

    def put_bytes(self, path: str, data: bytes) -> None:
        target = resolve_in(self.root, path)
        with os_errors(target, StorageError, "cannot write", missing=False), atomic_file(target) as out:
            out.write(data)


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
