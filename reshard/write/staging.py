"""Writing a folder so that it appears complete or not at all: stage beside it, fsync, rename into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reshard.manifests import FileEntry
from reshard.manifests.errors import OutputExistsError
from reshard.manifests.hashing import hash_file


def write_durably(path: Path, data: bytes) -> None:
    """Write and fsync a small file."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_hashed(paths: list[Path], folder: Path) -> list[FileEntry]:
    """Copy files verbatim into ``folder`` (config, tokenizer, generation files) and hash the copies."""
    entries = []
    for path in paths:
        target = folder / path.name
        shutil.copyfile(path, target)
        size, digest = hash_file(target)
        entries.append(FileEntry(path.name, size, digest))
    return entries


JOB_FILE = ".job"


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
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        promote_staging(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
