"""Loading trusts nothing it has not checked: a cache whose bytes rotted, an artifact overwritten while ranks load.

A fetched rank file that fails at load (``verify=True`` finds a tensor's bytes changed, though its marker still
matches) is evicted and downloaded once more; if the stored object itself is bad the load fails in one line. Under
torchrun, ranks loading in a loop while another process overwrites the artifact with a different conversion
either all get one artifact or all raise a reshard error: never rank 0 from one and rank 1 from the other.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import reshard
from reshard.commands.publish import publish
from reshard.loaders import load_state_dict
from reshard.manifests import read_manifest
from reshard.manifests.errors import IntegrityError
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.s3_server import RecordingMotoServer


@pytest.fixture(scope="module")
def s3_server() -> Iterator[RecordingMotoServer]:
    server = RecordingMotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: RecordingMotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Any, str]:
    """A fresh bucket on the loopback server (s3fs reaches it through ``AWS_ENDPOINT_URL``), the cache in tmp_path."""
    import s3fs

    env = {
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "RESHARD_CACHE": str(tmp_path / "cache"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    s3_server.requests.clear()
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
