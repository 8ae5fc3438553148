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

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from reshard.commands.model_card import model_card
from reshard.manifests import MANIFEST_NAME, FileEntry, Manifest, read_manifest, resolve_in
from reshard.manifests.errors import IntegrityError, StorageError
from reshard.manifests.hashing import CHUNK_BYTES, hash_file
from reshard.manifests.locations import HubLocation, S3Location, parse_location, s3_filesystem
from reshard.manifests.progress import progress_bar
from reshard.write.staging import fsync_dir

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


def _read_verified(
    source: Path, entry: FileEntry, sink: Callable[[bytes], Any], on_bytes: Callable[[int], None]
) -> bool:
    """Feed ``source`` to ``sink`` in chunks while hashing it; True if it is exactly what the manifest records."""
    import xxhash

    digest, size = xxhash.xxh3_128(), 0
    with open(source, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
            sink(chunk)
            on_bytes(len(chunk))
    return size == entry.size and digest.hexdigest() == entry.xxh3


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
        if not self._write(entry.path, lambda out: _read_verified(source, entry, out.write, on_bytes)):
            raise _changed(source)

    def put_bytes(self, path: str, data: bytes) -> None:
        self._write(path, lambda out: out.write(data))

    def _write(self, path: str, fill: Callable[[Any], Any]) -> bool:
        """Fill a hidden temporary file and rename it into place, unless ``fill`` returns False (then discard it)."""
        target = resolve_in(self.root, path)
        temp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(temp, "wb") as out:
                if fill(out) is False:
                    return False
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, target)
            fsync_dir(target.parent)
            return True
        except OSError as exc:
            raise StorageError(f"{target}: cannot write ({exc.strerror or exc})") from exc
        finally:
            temp.unlink(missing_ok=True)


class _S3Store:
    """An S3 prefix through s3fs: multipart uploads committed only once the bytes sent match the manifest."""

    def __init__(self, location: S3Location) -> None:
        self.location = location
        self.uri = location.uri()
        self.fs = s3_filesystem()
        if not self._call(location.uri(), lambda: self.fs.exists(location.bucket)):
            raise StorageError(f"s3://{location.bucket}: no such bucket (or no access to it); create it first")
        prefix = location.key("")
        listing = self._call(self.uri, lambda: self.fs.find(prefix, detail=True))
        self.sizes = {name[len(prefix) + 1 :]: info["size"] for name, info in listing.items()}  # one LIST

    def read(self, path: str) -> bytes | None:
        if path not in self.sizes:
            return None
        return self._call(self.location.uri(path), lambda: self.fs.cat_file(self.location.key(path)))

    def delete(self, path: str) -> None:
        self._call(self.location.uri(path), lambda: self.fs.rm_file(self.location.key(path)))

    def has(self, entry: FileEntry) -> bool:
        if self.sizes.get(entry.path) != entry.size:
            return False
        key = self.location.key(entry.path)
        metadata = self._call(self.location.uri(entry.path), lambda: self.fs.metadata(key, refresh=True))
        return metadata.get(XXH3_METADATA) == entry.xxh3

    def put(self, source: Path, entry: FileEntry, on_bytes: Callable[[int], None]) -> None:
        uri = self.location.uri(entry.path)
        metadata = {"Metadata": {XXH3_METADATA: entry.xxh3}}
        key = self.location.key(entry.path)
        handle = self._call(
            uri, lambda: self.fs.open(key, "wb", autocommit=False, block_size=S3_PART_BYTES, **metadata)
        )
        try:
            intact = self._call(uri, lambda: _read_verified(source, entry, handle.write, on_bytes))
            self._call(uri, handle.close)  # uploads the last part; nothing is visible before commit()
            if not intact:
                raise _changed(source)
            self._call(uri, handle.commit)
        except BaseException:
            handle.discard()  # aborts the multipart upload: no partial or unverified object remains
            raise

    def put_bytes(self, path: str, data: bytes) -> None:
        self._call(self.location.uri(path), lambda: self.fs.pipe_file(self.location.key(path), data))

    @staticmethod
    def _call(uri: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except OSError as exc:  # s3fs maps client errors (403, 404, network) onto OSError subclasses
            raise StorageError(f"{uri}: {type(exc).__name__}: {exc}") from exc


def _publish_hub(local: LocalArtifact, location: HubLocation, token: str | None, progress: bool) -> str:
    """One commit with every file, a model card and the manifest: the Hub shows all of it or none of it."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    api = HfApi(token=token)
    operations = [CommitOperationAdd(e.path, str(local.path(e))) for e in local.upload_order()]
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
