"""Writing a folder so that it appears complete or not at all: stage beside it, fsync, rename into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reshard.errors import OutputExistsError
from reshard.loaders.integrity import hash_file
from reshard.manifests import FileEntry


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


@contextmanager
def staging_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``out``; on success swap it into place, on failure remove it.

    A reader therefore sees either no ``out`` (or the old one) or the complete new one, never a partial one.
    """
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        fsync_dir(staging)
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
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
