"""Fetch one rank's share of a published artifact into a local cache, verified while the bytes arrive.

A rank needs ``manifest.json``, the small non-rank files (config, tokenizer, generation config) and its own rank
file: never another rank's. Each file is streamed into a temporary name beside its target while its size and xxh3
are checked against the manifest, then renamed into place, so a corrupt or truncated download is never left in the
cache. Ranks sharing the cache take a lock per file (``fcntl.flock``): the first downloads, the others wait and
reuse it. A verified file gets a small marker (size, mtime, inode, hash) so later starts do not re-hash it.

Cache layout (``$RESHARD_CACHE``, else ``$XDG_CACHE_HOME/reshard``, else ``~/.cache/reshard``):

    SCHEME/BUCKET/PREFIX/MANIFEST_XXH3/   the artifact folder returned for SCHEME://BUCKET/PREFIX (s3, gs, az, ...)
        manifest.json, config.json, ..., rank-0000R-of-0000N.safetensors
        .reshard/                         per-file locks and verified markers
    hf/ORG/NAME/MANIFEST_XXH3/            the artifact folder returned for hf://ORG/NAME: hard links to the Hub
        manifest.json, ...                cache's verified blobs (copies if the caches are on two file systems)
        .reshard/                         per-file locks and verified markers
    models--ORG--NAME/                    the Hub cache when a cache_dir is given (else HF_HUB_CACHE)

Keying the folder by the manifest's hash means a republished artifact never mixes with an older one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from reshard.manifests.errors import IntegrityError, StorageError
from reshard.manifests.hashing import hash_bytes, hash_file, hash_open
from reshard.manifests.locations import HubLocation, StoreLocation, parse_location
from reshard.manifests.manifest import MANIFEST_NAME, FileEntry, Manifest, resolve_in
from reshard.manifests.progress import progress_bar
from reshard.manifests.storage import VerifiedStream, atomic_file, atomic_write

CACHE_ENV = "RESHARD_CACHE"
STATE_DIR = ".reshard"

RankArg = int | Callable[[Manifest], int]


def fetch_artifact(
    uri: str | os.PathLike[str],
    rank: RankArg,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    progress: bool = True,
) -> Path:
    """Download what ``rank`` needs of the artifact at ``uri`` and return the local folder holding it.

    Args:
        uri: any fsspec URL (``s3://BUCKET/PREFIX``, ``gs://``, ``az://``, ... with the scheme's package
            installed), ``hf://ORG/NAME[@REVISION]``, or a local folder (returned unchanged).
        rank: the rank file to fetch, or a function of the manifest returning it (e.g. the mesh check).
        cache_dir: the reshard cache root (default: see the module docstring); for hf:// also the Hub cache the
            files go to, as ``from_pretrained``'s ``cache_dir`` (without it: ``HF_HUB_CACHE``).
        token: Hub token for hf:// (default: the logged-in one; ``False``: none). Buckets ignore it: they take
            their credentials from their backend's settings.
        revision: the Hub branch, tag or commit for hf:// (the same as ``@REVISION`` in ``uri``; both given, they
            must agree). Refused for a bucket or a folder, which hold one artifact only.
        progress: show a byte progress bar while downloading (buckets; the Hub shows its own).

    Returns:
        A folder with ``manifest.json``, the non-rank files and this rank's file (other ranks on the same machine
        sharing the cache may have added theirs).

    Raises:
        IntegrityError: a downloaded file does not match the manifest's size or xxh3 (nothing is cached).
        ManifestError: the manifest is malformed, names a path outside the artifact, or has no such rank.
        StorageError: the object is missing or unreadable, the client for the scheme is not installed, or
            ``revision`` does not apply to ``uri``.

    Example:
        >>> folder = fetch_artifact("s3://bucket/models/SmolLM2-1.7B-tp8", rank=3)  # doctest: +SKIP
        >>> sorted(p.name for p in folder.iterdir())  # doctest: +SKIP
        ['config.json', 'manifest.json', 'rank-00003-of-00008.safetensors', ...]
    """
    text = os.fspath(uri)
    location = at_revision(text, revision)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if isinstance(location, StoreLocation):
        return _fetch_store(location, rank, root, progress)
    if isinstance(location, HubLocation):
        hub_cache = os.fspath(cache_dir) if cache_dir is not None else None
        return _fetch_hub(location, rank, root, token, hub_cache)
    return Path(text.removeprefix("file://"))


def at_revision(uri: str, revision: str | None) -> HubLocation | StoreLocation | None:
    """``parse_location(uri)`` with ``revision`` applied: a Hub location's revision (which an ``@REVISION`` in the
    URI must not contradict); for anything else a revision is refused, since it would be silently ignored."""
    location = parse_location(uri)
    if revision is None:
        return location
    if not isinstance(location, HubLocation):
        raise StorageError(f"{uri}: revision={revision!r} applies to hf:// artifacts only (this one has no revisions)")
    if location.revision is not None and location.revision != revision:
        raise StorageError(f"{uri}: revision={revision!r} contradicts the URI's @{location.revision}")
    return HubLocation(location.repo_id, revision)


def is_remote(path: str | os.PathLike[str]) -> bool:
    """True for the URIs ``fetch_artifact`` downloads from (``hf://`` and fsspec URLs but ``file://``)."""
    return parse_location(os.fspath(path)) is not None


def refetch_rank_file(
    uri: str | os.PathLike[str],
    folder: Path,
    manifest: Manifest,
    rank: int,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
) -> Path:
    """Evict ``rank``'s cached file (and its marker) from ``folder`` if its bytes no longer match ``manifest``, then
    ``fetch_artifact`` again; return the folder.

    For a file that failed a check after ``fetch_artifact`` returned it: its download was verified, so its bytes
    changed on disk since (the marker compares size, mtime and inode, not bytes). The file is re-hashed under its
    lock first, so a copy another process sharing the cache has already replaced is kept rather than evicted twice.
    """
    location = at_revision(os.fspath(uri), revision)
    entry = manifest.rank_file(rank)
    if isinstance(location, StoreLocation):
        state = folder
    elif isinstance(location, HubLocation):
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        state = root / "hf" / location.repo_id / hash_bytes((folder / MANIFEST_NAME).read_bytes())
    else:
        return folder
    local = folder / entry.path  # checked relative by Manifest.from_json
    with _locked(_state(state, entry.path, ".lock")):
        blob = local.resolve()  # a Hub snapshot entry is a symlink to its blob
        if not (blob.is_file() and hash_file(blob) == (entry.size, entry.xxh3)):
            blob.unlink(missing_ok=True)
            local.unlink(missing_ok=True)
            _marker(state, entry.path).unlink(missing_ok=True)
    return fetch_artifact(uri, rank, cache_dir=cache_dir, token=token, revision=revision)


def folder_identity(folder: Path) -> tuple[int, int] | None:
    """The folder's (device, inode), or ``None`` if it is missing: equal before reading the manifest and after mapping
    the rank file, every file was read from one folder, not across a ``reshard --overwrite`` that renamed another into
    place (each folder only ever holds one conversion's files)."""
    try:
        info = os.stat(folder)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def default_cache_dir() -> Path:
    """``$RESHARD_CACHE``, else ``$XDG_CACHE_HOME/reshard``, else ``~/.cache/reshard``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "reshard"


def needed_files(manifest: Manifest, rank: int) -> list[FileEntry]:
    """What ``rank`` downloads: every non-rank file and its own rank file, nothing of another rank, nor the
    tensors the model does not use."""
    own = manifest.rank_file(rank)  # raises ManifestError for a rank the artifact does not have
    unused = manifest.load_report.unused_file if manifest.load_report is not None else None
    return [entry for entry in manifest.files if entry.rank is None and entry.path != unused] + [own]


def _fetch_store(location: StoreLocation, rank: RankArg, root: Path, progress: bool) -> Path:
    from reshard.manifests.stores import Store  # imports fsspec: here, so that importing the runtime does not

    store = Store(location)
    manifest_uri = location.uri(MANIFEST_NAME)
    data = store.read(MANIFEST_NAME)
    manifest = Manifest.from_json(data.decode(errors="replace"), origin=manifest_uri)
    digest = hash_bytes(data)
    folder = root / location.protocol / location.root / digest  # root checked relative by parse_location
    entries = needed_files(manifest, rank(manifest) if callable(rank) else rank)
    folder.mkdir(parents=True, exist_ok=True)
    missing = sum(e.size for e in entries if not (folder / e.path).is_file())  # for the bar only; checked below
    with progress_bar(
        total=missing, desc=f"fetch {location.uri()} rank files", enabled=progress and missing > 0
    ) as bar:
        for entry in entries:
            target = resolve_in(folder, entry.path, manifest_uri)
            with _locked(_state(folder, entry.path, ".lock")):
                if _is_cached(target, _marker(folder, entry.path), entry):
                    continue
                object_uri = location.uri(entry.path)
                fill = functools.partial(store.stream, entry.path)
                written = _download(fill, target, entry, object_uri, bar.update)
                _write_marker(_marker(folder, entry.path), written, entry)
    manifest_path = folder / MANIFEST_NAME  # last: a cache folder with a manifest has this rank's files
    with _locked(_state(folder, MANIFEST_NAME, ".lock")):
        if not (manifest_path.is_file() and manifest_path.read_bytes() == data):
            atomic_write(manifest_path, data, durable=False)
    return folder


def _fetch_hub(
    location: HubLocation, rank: RankArg, root: Path, token: str | bool | None, hub_cache: str | None
) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def download(path: str, revision: str | None) -> Path:
        try:
            return Path(hf_hub_download(location.repo_id, path, revision=revision, token=token, cache_dir=hub_cache))
        except (OSError, EntryNotFoundError) as exc:  # not found, no access, offline, network
            raise StorageError(f"{location.uri(path, revision)}: cannot download ({exc})") from exc

    manifest_path = download(MANIFEST_NAME, location.revision)
    snapshot = manifest_path.parent
    # pin every later file to the commit the manifest came from, so a concurrent push cannot mix two artifacts
    commit = snapshot.name if len(snapshot.name) == 40 else location.revision
    data = manifest_path.read_bytes()
    manifest_uri = location.uri(MANIFEST_NAME, commit)
    manifest = Manifest.from_json(data.decode(errors="replace"), origin=manifest_uri)
    state = root / "hf" / location.repo_id / hash_bytes(data)
    for entry in needed_files(manifest, rank(manifest) if callable(rank) else rank):  # paths checked by from_json
        object_uri = location.uri(entry.path, commit)
        with _locked(_state(state, entry.path, ".lock")):
            for _ in range(2):  # a cached copy that fails is evicted and downloaded once more
                local = download(entry.path, commit)
                blob = local.resolve()  # the snapshot entry is a symlink to a blob (a copy where symlinks are missing)
                if _is_cached(blob, _marker(state, entry.path), entry):
                    break
                local.unlink(missing_ok=True)  # _is_cached removed the blob: drop the now dangling snapshot entry too
            else:
                raise IntegrityError(
                    f"{object_uri}: does not match the manifest's size {entry.size} and xxh3 {entry.xxh3}; "
                    "removed it from the Hub cache"
                )
            _link(blob, resolve_in(state, entry.path, manifest_uri))
    with _locked(_state(state, MANIFEST_NAME, ".lock")):  # last: a folder with a manifest has this rank's files
        if not ((state / MANIFEST_NAME).is_file() and (state / MANIFEST_NAME).read_bytes() == data):
            atomic_write(state / MANIFEST_NAME, data, durable=False)
    return state


def _link(blob: Path, target: Path) -> None:
    """Make ``target`` the verified Hub blob: a hard link (the bytes stay in the Hub cache only), or a copy where the
    two caches are on different file systems. The Hub's snapshot entries are symlinks into its ``blobs`` folder,
    outside the snapshot, where an artifact's files may not resolve."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.samefile(blob, target):
            return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(blob, partial)
    except OSError:  # another file system, or no hard links there
        shutil.copyfile(blob, partial)
    os.replace(partial, target)


def _download(
    fill: Callable[[Callable[[bytes], None]], None],
    target: Path,
    entry: FileEntry,
    object_uri: str,
    on_bytes: Callable[[int], None],
) -> os.stat_result:
    """Stream an object into a temporary file beside ``target`` while hashing it; rename only if it matches.

    ``fill(sink)`` calls ``sink`` with the object's bytes in order. Returns the stat of the file written (taken from
    its own descriptor, so its marker vouches for those bytes even if another file is renamed over ``target``).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.partial"):  # left by a killed process; we hold the lock
        stale.unlink(missing_ok=True)
    stream = VerifiedStream(entry, object_uri, on_bytes)
    with atomic_file(target) as out:  # renamed into place only if the block ends without an error

        def sink(chunk: bytes) -> None:
            stream.update(chunk)
            out.write(chunk)

        fill(sink)
        stream.check()
        out.flush()
        written = os.fstat(out.fileno())  # a rename keeps the inode and the mtime
    return written


def _is_cached(path: Path, marker: Path, entry: FileEntry) -> bool:
    """True if ``path`` holds exactly the manifest's bytes: its marker matches its stat, or a re-hash agrees.

    The stat compared and the bytes hashed are of one open descriptor, so a file renamed over ``path`` meanwhile is
    never vouched for by another file's marker or hash. A file that exists but does not match is removed, so it is
    downloaded again.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    try:
        info = os.fstat(fd)
        if info.st_size == entry.size:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(marker.read_text()) == _marker_record(info, entry):
                    return True
            if hash_open(fd) == (entry.size, entry.xxh3):
                _write_marker(marker, info, entry)
                return True
    finally:
        os.close(fd)
    path.unlink()
    marker.unlink(missing_ok=True)
    return False


def _marker_record(info: os.stat_result, entry: FileEntry) -> dict[str, Any]:
    """What a marker vouches for: the stat of the real file that was hashed (a Hub snapshot entry is a symlink to
    its blob, and ``path`` is resolved before it is opened)."""
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "inode": info.st_ino, "xxh3": entry.xxh3}


def _write_marker(marker: Path, info: os.stat_result, entry: FileEntry) -> None:
    atomic_write(marker, json.dumps(_marker_record(info, entry)).encode(), durable=False)


def _state(folder: Path, path: str, suffix: str) -> Path:
    return folder / STATE_DIR / (quote(path, safe="") + suffix)


def _marker(folder: Path, path: str) -> Path:
    return _state(folder, path, ".verified")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: released by the kernel even if the holder dies."""
    import fcntl  # POSIX only: imported here so that importing the runtime works everywhere

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


__all__ = [
    "CACHE_ENV",
    "default_cache_dir",
    "fetch_artifact",
    "folder_identity",
    "is_remote",
    "needed_files",
    "refetch_rank_file",
]
