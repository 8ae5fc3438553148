"""Loading trusts nothing it has not checked: a cache whose bytes rotted, an artifact overwritten while ranks load.

A fetched rank file that fails at load (``verify=True`` finds a tensor's bytes changed, though its marker still
matches) is evicted and downloaded once more; if the stored object itself is bad the load fails in one line. Under
torchrun, ranks loading in a loop while another process overwrites the artifact with a different conversion
either all get one artifact or all raise a reshard error: never rank 0 from one and rank 1 from the other.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import reshard
from reshard.commands.publish import publish
from reshard.loaders import load_state_dict
from reshard.manifests import errors, read_manifest
from reshard.manifests.errors import IntegrityError, ManifestError, ReshardError
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.distributed import run_torchrun
from tests.helpers.s3_server import RecordingMotoServer, fresh_bucket


@pytest.fixture
def s3(s3_server: RecordingMotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Any, str]:
    """A fresh bucket on the loopback server (s3fs reaches it through ``AWS_ENDPOINT_URL``), the cache in tmp_path."""
    fs, bucket = fresh_bucket(s3_server, monkeypatch, tmp_path, "test")
    return fs, bucket


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama at tp=1: it loads in this process, no mesh needed."""
    root = tmp_path_factory.mktemp("load")
    out = root / "art"
    reshard.convert(make_checkpoint("llama", root / "src"), out, tp=1, progress=False)
    return out


def flipped(data: bytes, at: int) -> bytes:
    """``data`` with one bit of byte ``at`` flipped: same size, other bytes."""
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_a_cached_rank_file_that_rotted_is_fetched_again_once(
    artifact: Path, s3: tuple[Any, str], s3_server: RecordingMotoServer, tmp_path: Path
) -> None:
    _, bucket = s3
    uri = publish(artifact, f"s3://{bucket}/tp1", progress=False)
    name = read_manifest(artifact).rank_file(0).path
    load_state_dict(uri)  # fetched and cached, with its verified marker
    [cached] = (tmp_path / "cache").rglob(name)
    stat = cached.stat()
    cached.write_bytes(flipped(cached.read_bytes(), stat.st_size - 10))  # a tensor byte, same size
    os.utime(cached, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the marker (size, mtime, inode) still matches

    s3_server.requests.clear()
    state = load_state_dict(uri, verify=True)
    assert s3_server.downloaded(name) == stat.st_size  # downloaded exactly once more
    assert cached.read_bytes() == (artifact / name).read_bytes()
    expected = load_state_dict(artifact)
    assert all(state[key].equal(tensor) for key, tensor in expected.items())


def test_a_bad_object_behind_a_rotted_cache_is_one_integrity_error(
    artifact: Path, s3: tuple[Any, str], s3_server: RecordingMotoServer, tmp_path: Path
) -> None:
    fs, bucket = s3
    uri = publish(artifact, f"s3://{bucket}/tp1", progress=False)
    name = read_manifest(artifact).rank_file(0).path
    load_state_dict(uri)
    [cached] = (tmp_path / "cache").rglob(name)
    stat = cached.stat()
    at = stat.st_size - 10
    cached.write_bytes(flipped(cached.read_bytes(), at))
    os.utime(cached, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fs.pipe_file(f"{bucket}/tp1/{name}", flipped((artifact / name).read_bytes(), at))  # the stored object too

    s3_server.requests.clear()
    with pytest.raises(IntegrityError) as caught:
        load_state_dict(uri, verify=True)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{uri}/{name}: ") and "does not match" in message
    assert s3_server.downloaded(name) == stat.st_size  # one more download, then refused
    assert not cached.exists()  # nothing bad is left in the cache


LOAD_LOOP = """
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from reshard.loaders.state_dict import open_artifact
from reshard.manifests import errors
from reshard.manifests.errors import ReshardError
from reshard.manifests.hashing import hash_bytes

art, out, loads = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
records = []
for _ in range(loads):
    try:
        loaded = open_artifact(art)
    except ReshardError as exc:  # agreed: every rank raises the same error
        records.append({"error": type(exc).__name__, "message": str(exc)})
        continue
    hashes = {}
    for name, tensor in loaded.tensors.items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        hashes[name] = hash_bytes(local.contiguous().view(-1).view(torch.uint8).numpy().data)
    records.append({"artifact": loaded.manifest.artifact, "hashes": hashes})
rank = dist.get_rank()
(out / f"rank{rank}.json").write_text(json.dumps(records))
dist.barrier()
(out / "done").touch()
dist.destroy_process_group()
"""

OVERWRITE_LOOP = """
import sys, time
from pathlib import Path
from reshard.cli import main

art, stop, sources = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
codes, deadline = [], time.monotonic() + 120
while not stop.exists() and time.monotonic() < deadline:
    try:
        main(["--tp", "2", sources[len(codes) % 2], "-o", art, "--overwrite", "-q"])
        codes.append(0)
    except SystemExit as exc:
        codes.append(exc.code if isinstance(exc.code, int) else 1)
print("codes:", *codes)
"""


def is_reshard_error(record: dict[str, str]) -> bool:
    """One of reshard's error kinds (not the base class ``agreed`` gives a bug), one line per failed rank, and no
    other exception's ``Kind: message`` inside."""
    kind = getattr(errors, record["error"], None)
    if not (isinstance(kind, type) and issubclass(kind, ReshardError) and kind is not ReshardError):
        return False
    lines = record["message"].splitlines()
    if len(lines) > 1 and not all(re.match(r"rank [01] of 2: ", line) for line in lines):
        return False
    return not any(re.match(r"(rank [01] of 2: )?\w+(Error|Exception): ", line) for line in lines)


def test_loads_during_overwrites_are_never_mixed(tmp_path: Path) -> None:
    """2 ranks load 200 times while another process re-converts the artifact from A or B in turn: each load gives
    every rank the same artifact, whose manifest matches the tensors, or raises one reshard error on every rank."""
    sources = [make_checkpoint("llama", tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 1))]
    versions = {}  # (rank, tensor) xxh3 -> which source, from reference conversions of each
    ids = {}
    for source in sources:
        reshard.convert(source, tmp_path / f"ref-{source.name}", tp=2, progress=False)
        manifest = read_manifest(tmp_path / f"ref-{source.name}")
        ids[manifest.artifact] = source.name
        for tensor in manifest.tensors:
            for rank in (0, 1):
                versions[rank, tensor.name, tensor.slice_for(rank).xxh3] = source.name
    art, out = tmp_path / "art", tmp_path / "out"
    out.mkdir()
    reshard.convert(sources[0], art, tp=2, progress=False)
    (tmp_path / "load.py").write_text(LOAD_LOOP)
    writer = subprocess.Popen(
        [sys.executable, "-c", OVERWRITE_LOOP, str(art), str(out / "done"), *map(str, sources)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        run_torchrun(tmp_path / "load.py", str(art), str(out), "200", nproc=2, timeout=90)
    finally:
        (out / "done").touch()
        written, stderr = writer.communicate(timeout=60)
    codes = Counter(written.splitlines()[-1].split()[1:])
    assert set(codes) == {"0"}, stderr  # every overwrite succeeded (the lock is never contended: one writer)

    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    outcome: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for first, second in zip(*ranks, strict=True):
        if "error" in first or "error" in second:
            assert first == second  # agreed: the same error on both ranks
            assert is_reshard_error(first), first
            outcome["refused"] += 1
            kinds[first["error"]] += 1
            continue
        seen = [
            {versions.get((rank, name, digest), "unknown") for name, digest in record["hashes"].items()}
            | {ids.get(record["artifact"], "unknown")}
            for rank, record in enumerate((first, second))
        ]
        outcome["ok" if len(seen[0] | seen[1]) == 1 and "unknown" not in seen[0] else "mixed"] += 1
    print(f"loads: {dict(outcome)}; overwrites: {sum(codes.values())}; refusals: {dict(kinds)}")
    assert outcome["mixed"] == 0, outcome
    assert outcome["ok"] > 0


def test_a_folder_replaced_between_the_header_check_and_the_mapping_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overwrite of the whole folder landing between the rank file's header check and its mapping: the mapping
    is of the checked file (one descriptor), and the folder's identity tells the manifest may be stale."""
    import reshard.loaders.rank_file as rank_file

    for name, seed in (("a", 0), ("b", 1)):
        reshard.convert(make_checkpoint("llama", tmp_path / f"src-{name}", seed=seed), tmp_path / name, tp=1)
    art, other = tmp_path / "a", tmp_path / "b"
    map_open = rank_file.map_open

    def overwritten_first(fd: int) -> Any:  # what reshard --overwrite does: retire the folder, promote another
        os.replace(art, tmp_path / "retired")
        os.replace(other, art)
        return map_open(fd)

    monkeypatch.setattr(rank_file, "map_open", overwritten_first)
    with pytest.raises(ManifestError, match=rf"^{art}: replaced while loading"):
        load_state_dict(art)
