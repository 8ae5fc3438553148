"""A rank file renamed into place while it is loaded: checked and mapped through one descriptor, never two files.

A swapper process renames two conversions' rank files (same model, same sizes, other weights and artifact ids) over
one artifact's rank file as fast as it can, as a sync tool or ``cp`` then rename would, while this process loads the
artifact with ``verify=False``. Each load must either return the artifact's own weights or be refused (the other
file's header names another artifact id); a load returning the other conversion's bytes under this manifest's header
is the failure. The race is real only if the swaps reach the loads, so the test also needs refusals and own loads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import reshard
from reshard.loaders import load_state_dict
from reshard.loaders.fetch import _is_cached, _marker
from reshard.manifests import read_manifest
from reshard.manifests.errors import FileFormatError, IntegrityError
from reshard.manifests.hashing import hash_file
from tests.helpers.checkpoints import make_checkpoint

SWAPPER = """
import os, sys
own, other, target, stop = sys.argv[1:5]
swaps = 0
while not os.path.exists(stop):
    for source in (other, own):
        os.link(source, target + ".swap")
        os.replace(target + ".swap", target)
        swaps += 1
print(swaps)
"""


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One tiny llama converted twice from checkpoints with other weights: rank files of equal size, other bytes."""
    root = tmp_path_factory.mktemp("race")
    for name, seed in (("a", 0), ("b", 1)):
        reshard.convert(make_checkpoint("llama", root / f"src-{name}", seed=seed), root / name, tp=1, progress=False)
    return root / "a", root / "b"


@pytest.fixture
def pair(two: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the first artifact this test may rename files in, and the second one, read only."""
    shutil.copytree(two[0], tmp_path / "art")
    return tmp_path / "art", two[1]


def swapping(own: Path, other: Path, target: Path, stop: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SWAPPER, str(own), str(other), str(target), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_loads_racing_renames_are_own_or_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    art, other = pair
    name = read_manifest(art).rank_file(0).path
    own = tmp_path / "own.safetensors"
    os.link(art / name, own)  # the artifact's own file, kept under a second name to rename back
    assert (art / name).stat().st_size == (other / name).stat().st_size  # only the header's id and bytes differ
    expected = {key: value.clone() for key, value in load_state_dict(art).items()}

    stop = tmp_path / "stop"
    swapper = swapping(own, other / name, art / name, stop)
    outcome: Counter[str] = Counter()
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline and sum(outcome.values()) < 2000:
            try:
                loaded = load_state_dict(art, verify=False)
            except (IntegrityError, FileFormatError):
                outcome["refused"] += 1
                continue
            same = all(torch.equal(loaded[key], value) for key, value in expected.items())
            outcome["own" if same and loaded.keys() == expected.keys() else "foreign"] += 1
            del loaded
    finally:
        stop.touch()
        swaps = int(swapper.communicate(timeout=30)[0])
    print(f"loads: {dict(outcome)}; swaps: {swaps}")
    assert outcome["foreign"] == 0, outcome
    assert outcome["own"] > 0 and outcome["refused"] > 0, outcome  # the swaps did reach the loads


def test_a_file_renamed_in_just_before_the_mapping_is_not_the_one_mapped(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window the race hits, opened on purpose: another conversion's rank file renamed over this one after the
    header was checked and before the mapping. The bytes mapped are still the checked file's."""
    import reshard.loaders.rank_file as rank_file

    art, other = pair
    name = read_manifest(art).rank_file(0).path
    expected = load_state_dict(art)
    map_open = rank_file.map_open

    def renamed_first(fd: int) -> torch.Tensor:
        os.link(other / name, art / "incoming")
        os.replace(art / "incoming", art / name)
        return map_open(fd)

    monkeypatch.setattr(rank_file, "map_open", renamed_first)
    loaded = load_state_dict(art, verify=False)
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())
    monkeypatch.undo()
    with pytest.raises(IntegrityError, match="artifact"):  # the file now in place is the other conversion's
        load_state_dict(art)


def test_the_cache_marker_vouches_only_for_the_file_it_hashed(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached file replaced by another between its hash and its marker: the marker records the hashed file's
    inode, so the replacement is re-hashed (and evicted) on the next check instead of being taken for verified."""
    import reshard.loaders.fetch as fetch

    art, other = pair
    entry = read_manifest(art).rank_file(0)
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / entry.path
    os.link(art / entry.path, target)
    hash_open = fetch.hash_open

    def replaced_after_hashing(fd: int) -> tuple[int, str]:
        result = hash_open(fd)
        os.link(other / entry.path, tmp_path / "foreign")
        os.replace(tmp_path / "foreign", target)  # same size, other bytes
        return result

    monkeypatch.setattr(fetch, "hash_open", replaced_after_hashing)
    assert _is_cached(target, _marker(cache, entry.path), entry)  # the file hashed was the right one
    monkeypatch.undo()
    assert hash_file(target) != (entry.size, entry.xxh3)
    assert not _is_cached(target, _marker(cache, entry.path), entry)  # not vouched for: re-hashed, evicted
    assert not target.exists()
