"""An artifact's folder in any fsspec file system: the one code path publish and fetch take for ``s3://``,
``gs://``, ``az://``, ``memory://`` and every other scheme fsspec knows.

A scheme works as soon as its package is installed (s3fs, gcsfs, adlfs, ...): fsspec's registry finds it, and it is
configured the way that package and fsspec configure themselves, never by reshard: the backend's own environment
(``AWS_*``; ``GOOGLE_APPLICATION_CREDENTIALS``, ``STORAGE_EMULATOR_HOST``; ``AZURE_STORAGE_*``), fsspec's config
files and ``FSSPEC_<SCHEME>_<OPTION>`` variables. Each store is a fresh instance (``skip_instance_cache``), not
fsspec's shared one, whose listings may be stale after another process wrote.

What the store keeps of each guarantee: an upload is written inside an fsspec transaction and committed only after
every byte sent matched the manifest (an S3 multipart upload, a GCS resumable upload, an Azure block list, a memory
file: nothing is visible before; on an error it is discarded, which aborts the S3 upload). Where the backend keeps
user metadata on objects (those with ``getxattr``: s3fs, gcsfs, adlfs), the upload that sends a file also records
its xxh3 (``x-amz-meta-xxh3``, GCS and Azure ``metadata.xxh3``), so a retried publish skips a matching file
without reading it; elsewhere a file already there is re-hashed.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

from reshard.manifests.errors import ReshardError, StorageError
from reshard.manifests.locations import StoreLocation
from reshard.manifests.manifest import FileEntry
from reshard.manifests.storage import VerifiedStream

XXH3_METADATA = "xxh3"
PART_BYTES = 64 * 1024 * 1024  # upload part: up to 640 GB per file within S3's 10,000 parts
CHUNK_BYTES = 32 * 1024 * 1024  # download read size

Sink = Callable[[bytes], Any]


def open_filesystem(location: StoreLocation) -> Any:
    """A fresh fsspec file system for ``location``'s scheme; ``StorageError`` naming the pip extra (or package) if
    the scheme's package is missing, or the scheme if fsspec does not know it."""
    import fsspec

    try:
        cls = fsspec.get_filesystem_class(location.protocol)
    except ImportError as exc:
        package = _package(location.protocol)
        raise StorageError(
            f"{location.uri()}: {location.protocol}:// needs {package}: {install_hint(package)}"
        ) from exc
    except ValueError as exc:
        raise StorageError(
            f"{location.uri()}: unsupported scheme; use a folder, hf://ORG/NAME or a URL fsspec knows "
            "(s3://, gs://, az://, ...; pip install its package)"
        ) from exc
    with store_errors(location.uri(), "cannot connect"):
        return cls(skip_instance_cache=True)


def install_hint(package: str) -> str:
    """``pip install 'reshard[EXTRA]'`` for a package one of reshard's extras provides, else ``pip install PACKAGE``:
    the extras are read from reshard's own metadata, so a new one in pyproject.toml is the only line to add."""
    from importlib import metadata

    wanted = _normal(package)
    with contextlib.suppress(metadata.PackageNotFoundError):
        for requirement in metadata.requires("reshard") or []:
            found = re.match(r"\s*([A-Za-z0-9._-]+)[^;]*;.*extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
            if found and _normal(found[1]) == wanted and found[2] not in ("test", "dev"):
                return f"pip install 'reshard[{found[2]}]'"
    return f"pip install {package}"


@contextlib.contextmanager
def store_errors(uri: str, action: str) -> Iterator[None]:
    """Turn a backend's failure inside the block into one-line ``StorageError`` naming ``uri``: a missing object as
    "no such object", anything else (``OSError``, an HTTP or SDK error) as ``action`` with its reason. reshard's own
    errors pass through unchanged."""
    try:
        yield
    except ReshardError:
        raise
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such object") from exc
    except Exception as exc:  # s3fs maps most onto OSError; gcsfs, adlfs and aiohttp raise their own
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, NotImplementedError):  # e.g. writing through http://, which fsspec only reads
            reason = f"this file system does not support it{': ' + reason if str(exc) else ''}"
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        if isinstance(exc, PermissionError):
            reason = f"access denied or no credentials: {reason}"
        raise StorageError(f"{uri}: {action} ({reason})") from exc


class Store:
    """The artifact's folder at ``location``: reads for fetch, the manifest-last writes for publish."""

    def __init__(self, location: StoreLocation) -> None:
        self.location = location
        self.uri = location.uri()
        self.fs = open_filesystem(location)
        self.base = self.fs._strip_protocol(self.uri).rstrip("/")
        self._listing: dict[str, dict[str, Any]] | None = None
        self._stale: dict[str, list[str]] | None = None

    def key(self, path: str) -> str:
        """The object's path as the file system names it."""
        return f"{self.base}/{path}"

    # --- reading (fetch) ------------------------------------------------------------------------------------------

    def read(self, path: str) -> bytes:
        """A small object's bytes (the manifest); ``StorageError`` if it is missing or unreadable."""
        with store_errors(self.location.uri(path), "cannot read"):
            return bytes(self.fs.cat_file(self.key(path)))

    def stream(self, path: str, sink: Sink) -> None:
        """An object's bytes to ``sink`` in order: one streamed GET where the backend can (s3fs: one request, one
        object version), else reads of ``CHUNK_BYTES``; the caller hashes what arrives."""
        with store_errors(self.location.uri(path), "cannot read"):
            if getattr(type(self.fs), "open_async", None) not in (None, _base_open_async()):
                self._stream_async(self.key(path), sink)
                return
            with self.fs.open(self.key(path), "rb", block_size=CHUNK_BYTES, cache_type="none") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    sink(chunk)

    def _stream_async(self, key: str, sink: Sink) -> None:
        from fsspec.asyn import sync

        async def stream() -> None:
            handle = await self.fs.open_async(key, "rb")
            try:
                while chunk := await handle.read(CHUNK_BYTES):
                    sink(chunk)
            finally:
                await handle.close()

        sync(self.fs.loop, stream)

    # --- writing (publish) ----------------------------------------------------------------------------------------

    def existing(self, path: str) -> bytes | None:
        """The object's bytes if it is there (listed once, on first use), else ``None``."""
        return self.read(path) if path in self.listing() else None

    def listing(self) -> dict[str, dict[str, Any]]:
        """What is below the prefix (manifest path → the backend's info), from one listing; refuses a missing
        bucket or container, which a publish does not create."""
        if self._listing is None:
            with store_errors(self.uri, "cannot list"):
                if hasattr(self.fs, "split_path"):  # an object store: s3fs, gcsfs, adlfs
                    bucket = self.fs.split_path(self.base)[0]
                    if not self.fs.exists(bucket):
                        scheme = self.location.protocol
                        raise StorageError(
                            f"{scheme}://{bucket}: no such bucket (or no access to it: check the credentials); "
                            "create it first"
                        )
                found = self.fs.find(self.base, detail=True)
            self._listing = {self._relative(name): info for name, info in found.items()}
        return self._listing

    def has(self, entry: FileEntry) -> bool:
        """True if the object holds exactly ``entry``'s bytes: size listed, then the xxh3 its upload recorded, or (on
        a backend without metadata) its bytes re-hashed."""
        info = self.listing().get(entry.path)
        if info is None or info.get("size") != entry.size:
            return False
        uri = self.location.uri(entry.path)
        if self._keeps_metadata():
            recorded = (info.get("metadata") or {}).get(XXH3_METADATA)
            if recorded is None:  # S3 lists no user metadata: one HEAD
                with store_errors(uri, "cannot read"), contextlib.suppress(KeyError):
                    recorded = self.fs.getxattr(self.key(entry.path), XXH3_METADATA)
            return bool(recorded == entry.xxh3)
        check = VerifiedStream(entry, uri)
        try:
            self.stream(entry.path, check.update)
            check.check()
        except ReshardError:
            return False
        return True

    def put(self, entry: FileEntry, send: Callable[[Sink], None]) -> None:
        """Upload ``entry`` from ``send(sink)``, which raises if its bytes are not the manifest's: then the upload
        is discarded (aborted, never committed) and nothing new is visible under the name."""
        uri = self.location.uri(entry.path)
        self._abort_stale(entry.path)
        options = {}
        if self._keeps_metadata():
            options["Metadata" if "s3" in _protocols(self.fs) else "metadata"] = {XXH3_METADATA: entry.xxh3}
        handle: Any = None
        with store_errors(uri, "cannot write"):
            try:
                with self.fs.transaction:  # commits the file on a clean exit, discards (aborts) it on an exception
                    handle = self.fs.open(self.key(entry.path), "wb", block_size=PART_BYTES, **options)
                    send(handle.write)
                    handle.close()  # sends the last part; nothing is visible before the commit (adlfs commits here)
            except BaseException:
                with contextlib.suppress(AttributeError):  # None, or a BytesIO (memory://): nothing to flush
                    handle.closed = True  # else its __del__ would flush the bytes it still holds: a new upload
                raise

    def put_bytes(self, path: str, data: bytes) -> None:
        with store_errors(self.location.uri(path), "cannot write"):
            self.fs.pipe_file(self.key(path), data)

    def delete(self, path: str) -> None:
        with store_errors(self.location.uri(path), "cannot delete"):
            self.fs.rm_file(self.key(path))

    def _relative(self, name: str) -> str:
        return name[len(self.base) + 1 :] if name.startswith(self.base + "/") else name

    def _keeps_metadata(self) -> bool:
        return hasattr(self.fs, "getxattr")

    def _abort_stale(self, path: str) -> None:
        """S3 only (s3fs's ``call_s3``): abort multipart uploads of this key a killed publish left, whose parts are
        stored and billed until a lifecycle rule removes them (listed once, on the first put). GCS resumable uploads
        and Azure uncommitted blocks are not billed and expire by themselves."""
        if not hasattr(self.fs, "call_s3"):
            return
        bucket, key_prefix = self.fs.split_path(self.base)[:2]
        prefix = f"{key_prefix}/" if key_prefix else ""
        if self._stale is None:
            self._stale = {}
            with store_errors(self.uri, "cannot list multipart uploads"):
                for page in self._paged("list_multipart_uploads", Bucket=bucket, Prefix=prefix):
                    for upload in page.get("Uploads", []):
                        self._stale.setdefault(upload["Key"][len(prefix) :], []).append(upload["UploadId"])
        for upload_id in self._stale.pop(path, []):
            with store_errors(self.location.uri(path), "cannot abort a stale multipart upload"):
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=prefix + path, UploadId=upload_id)

    def _paged(self, method: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        while True:
            page = self.fs.call_s3(method, **kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            kwargs.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))


def _package(protocol: str) -> str:
    from fsspec.registry import known_implementations

    return str(known_implementations.get(protocol, {}).get("class", protocol)).partition(".")[0]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _protocols(fs: Any) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _base_open_async() -> Any:
    from fsspec.asyn import AsyncFileSystem

    return AsyncFileSystem.open_async
