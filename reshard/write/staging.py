"""Writing a folder so that it appears complete or not at all: stage beside it, fsync, rename into place.

One writer per output at a time: ``output_lock`` holds ``fcntl.flock`` on ``.NAME.lock`` beside it, so a second
run to the same output fails at once instead of sharing (and deleting) the first one's staging folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reshard.manifests import FileEntry
from reshard.manifests.errors import OutputError, OutputExistsError
from reshard.manifests.hashing import hash_file
from reshard.manifests.storage import atomic_write, fsync_dir, os_errors


def write_durably(path: Path, data: bytes) -> None:
    """Write a small file atomically and fsync it (``manifests.storage.atomic_write``)."""
    atomic_write(path, data)


def copy_hashed(paths: list[Path], folder: Path) -> list[FileEntry]:
    """Copy files verbatim into ``folder`` (config, tokenizer, generation files) and hash the copies.

    Each copy is made 0644 whatever the umask: ``copyfile`` leaves the mode to it, so a run under ``077`` would
    give an artifact whose config another (serving) user cannot read.
    """
    entries = []
    for path in paths:
        target = folder / path.name
        shutil.copyfile(path, target)
        os.chmod(target, 0o644)
        size, digest = hash_file(target)
        entries.append(FileEntry(path.name, size, digest))
    return entries


JOB_FILE = ".job"


def lock_path(out: Path) -> Path:
    """The lock file beside ``out`` that one writer of it holds."""
    return out.resolve().parent / f".{out.name}.lock"


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the output's lock for the block, or raise ``OutputError`` at once if another process holds it.

    The kernel drops a ``flock`` when its holder dies, so a killed run never blocks the next one. The lock file is
    removed on release; a process that locked a file already unlinked (it raced with that release) sees it is no
    longer the one at the path and fails as busy too.
    """
    import fcntl

    path = lock_path(out)
    with os_errors(out, OutputError, "cannot write", missing=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except (BlockingIOError, FileNotFoundError):
            same = False
        if not same:
            raise OutputError(
                f"{out}: another reshard is writing this output right now ({path} is locked); "
                "wait for it to finish or choose another output"
            )
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def remove_staging(out: Path) -> None:
    """Remove the staging folder of ``out`` (a run that failed on its input leaves nothing behind)."""
    shutil.rmtree(staging_path(out), ignore_errors=True)


def staging_path(out: Path) -> Path:
    """The hidden folder an artifact is built in before it is renamed to ``out``."""
    return out.resolve().parent / f".{out.name}.partial"


def prepare_staging(out: Path, job_id: str) -> Path:
    """Create the staging folder, or keep it if a run of the same job (``job_id``) left it: finished files in it
    are then reused. A folder left by another job is emptied."""
    staging = staging_path(out)
    job_file = staging / JOB_FILE
    if not (job_file.is_file() and job_file.read_text() == job_id):
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write_durably(job_file, job_id.encode())
    return staging


def promote_staging(staging: Path, out: Path, overwrite: bool) -> None:
    """Swap a complete staging folder into place as ``out`` (replacing an old ``out`` only with ``overwrite``)."""
    (staging / JOB_FILE).unlink(missing_ok=True)
    fsync_dir(staging)
    parent = staging.parent
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"{out}: appeared while writing (pass --overwrite to replace it)")
        retired = parent / f".{out.name}.old"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(out, retired)
        os.replace(staging, out)
        shutil.rmtree(retired)
    else:
        os.replace(staging, out)
    fsync_dir(parent)


@contextmanager
def staging_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``out``; on success swap it into place, on failure remove it.

    A reader therefore sees either no ``out`` (or the old one) or the complete new one, never a partial one.
    """
    staging = staging_path(out)
    with output_lock(out):
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with os_errors(out, OutputError, "cannot write", missing=False):
                staging.mkdir(parents=True)
            yield staging
            promote_staging(staging, out, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
