"""Publish and fetch through the one fsspec store, on every backend that runs here: S3 (moto), GCS
(gcp-storage-emulator with gcsfs), Azure Blob Storage (Azurite with adlfs) and fsspec's in-memory file system, which
reshard names nowhere: a scheme with its package installed needs no line of reshard.

Each backend gets the same tests, through the same URLs a user writes; S3-only wire details (request counts per
rank, multipart uploads) are in test_publish.py and test_trust_ops.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reshard.commands.publish import publish
from reshard.loaders.fetch import fetch_artifact
from reshard.manifests import MANIFEST_NAME, read_manifest
from reshard.manifests.errors import IntegrityError, StorageError
from tests.helpers.distributed import run_torchrun

BACKENDS = ["s3", "gs", "az", "memory"]


@dataclass
class Bucket:
    scheme: str
    name: str
    fs: Any
    emulator: Any = None

    def uri(self, prefix: str) -> str:
        return f"{self.scheme}://{self.name}/{prefix}"

    def key(self, prefix: str, path: str) -> str:
        return f"{self.fs._strip_protocol(self.uri(prefix))}/{path}"

    def listing(self, prefix: str) -> dict[str, dict[str, Any]]:
        """What the backend lists below the prefix now (manifest path → info: size, etag/generation/mtime)."""
        self.fs.invalidate_cache()
        base = self.fs._strip_protocol(self.uri(prefix))
        found = self.fs.find(base, detail=True)
        return {name[len(base) + 1 :]: info for name, info in found.items()}


@pytest.fixture(params=BACKENDS)
def bucket(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Bucket:
    """A fresh bucket (container) on one backend, reached through the backend's own settings; cache in tmp_path."""
    import fsspec

    scheme = request.param
    monkeypatch.setenv("RESHARD_CACHE", str(tmp_path / "cache"))
    if scheme == "s3":
        from tests.helpers.s3_server import fresh_bucket

        fs, name = fresh_bucket(request.getfixturevalue("s3_server"), monkeypatch, tmp_path, "stores")
        return Bucket(scheme, name, fs)
    emulator = None
    if scheme == "gs":
        from tests.helpers.emulators import use_gcs

        emulator = request.getfixturevalue("gcs_emulator")
        use_gcs(emulator, monkeypatch)
    elif scheme == "az":
        from tests.helpers.emulators import use_azure

        use_azure(request.getfixturevalue("azurite"), monkeypatch)
    fs = fsspec.filesystem(scheme, skip_instance_cache=True)
    name = f"stores-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return Bucket(scheme, name, fs, emulator)


@pytest.fixture
def artifact(tiny: Any) -> Path:
    return tiny.artifact("llama", tp=2, tokenizer=True)


def test_publish_then_each_rank_fetches_exactly_its_share(artifact: Path, bucket: Bucket, tmp_path: Path) -> None:
    where = publish(artifact, bucket.uri("models/"), progress=False)
    prefix = f"models/{artifact.name}"
    assert where == bucket.uri(prefix)
    manifest = read_manifest(artifact)
    listed = bucket.listing(prefix)
    assert set(listed) == {f.path for f in manifest.files} | {MANIFEST_NAME}
    if hasattr(bucket.fs, "getxattr"):  # the upload that sent each file recorded its xxh3 on the object
        for entry in manifest.files:
            assert bucket.fs.getxattr(bucket.key(prefix, entry.path), "xxh3") == entry.xxh3
    small = [f.path for f in manifest.files if f.rank is None]
    for rank in (0, 1):
        if bucket.emulator is not None:
            bucket.emulator.requests.clear()
        folder = fetch_artifact(where, rank, cache_dir=tmp_path / f"node{rank}", progress=False)
        own = manifest.rank_file(rank).path
        assert folder.parent == tmp_path / f"node{rank}" / bucket.scheme / bucket.name / prefix  # SCHEME/ROOT/DIGEST
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
            [MANIFEST_NAME, own, *small]
        )
        for path in [MANIFEST_NAME, own, *small]:
            assert (folder / path).read_bytes() == (artifact / path).read_bytes()
        if bucket.emulator is not None:  # the GCS emulator's log: this rank asked for its bytes, never the other's
            assert bucket.emulator.downloads(f"{prefix}/{own}")
            assert bucket.emulator.downloads(f"{prefix}/{manifest.rank_file(1 - rank).path}") == []


def test_a_rerun_rewrites_nothing_and_a_retry_sends_only_what_is_missing(artifact: Path, bucket: Bucket) -> None:
    uri = publish(artifact, bucket.uri("tp2"), progress=False)
    first = bucket.listing("tp2")
    publish(artifact, uri, progress=False)
    assert bucket.listing("tp2") == first  # same etag / generation / mtime: nothing was written again
    rank1 = read_manifest(artifact).rank_file(1).path
    for path in (rank1, MANIFEST_NAME):  # as a publish that failed before these left it
        bucket.fs.rm_file(bucket.key("tp2", path))
    publish(artifact, uri, progress=False)
    again = bucket.listing("tp2")
    assert set(again) == set(first)
    assert {path for path in again if again[path] != first[path]} <= {rank1, MANIFEST_NAME}
    assert {path for path in first if path not in (rank1, MANIFEST_NAME) and again[path] != first[path]} == set()


def test_bytes_changed_behind_the_manifest_are_never_committed(artifact: Path, bucket: Bucket, tmp_path: Path) -> None:
    changed = shutil.copytree(artifact, tmp_path / "changed")
    rank0 = changed / read_manifest(changed).rank_file(0).path
    data = bytearray(rank0.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: caught while sending, after every part went out
    rank0.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="changed since the manifest was written"):
        publish(changed, bucket.uri("m"), progress=False)
    listed = bucket.listing("m")
    assert rank0.name not in listed and MANIFEST_NAME not in listed  # the upload was discarded, not committed


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_object_is_named_and_never_cached(
    artifact: Path, bucket: Bucket, tmp_path: Path, damage: str
) -> None:
    uri = publish(artifact, bucket.uri("tp2"), progress=False)
    name = read_manifest(artifact).rank_file(1).path
    data = bytearray((artifact / name).read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[-100:]
    bucket.fs.pipe_file(bucket.key("tp2", name), bytes(data))
    message = "xxh3 .* does not match" if damage == "flip" else "truncated"
    with pytest.raises(IntegrityError, match=rf"^{uri}/{name}: {message}"):
        fetch_artifact(uri, 1, cache_dir=tmp_path / "cache", progress=False)
    assert not [p for p in (tmp_path / "cache").rglob("rank-*") if p.is_file() and not p.name.endswith(".lock")]
    fetch_artifact(uri, 0, cache_dir=tmp_path / "cache", progress=False)  # the intact rank is unaffected


def test_missing_objects_and_buckets_are_one_line(artifact: Path, bucket: Bucket, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=rf"^{bucket.uri('nothing')}/manifest.json: no such object$"):
        fetch_artifact(bucket.uri("nothing"), 0, cache_dir=tmp_path, progress=False)
    if bucket.scheme == "memory":
        return  # no buckets in memory://: a prefix is created by writing below it
    missing = f"{bucket.scheme}://no-such-bucket-{uuid.uuid4().hex[:8]}"
    with pytest.raises(
        StorageError, match=rf"^{missing}: no such bucket \(or no access to it: check the credentials\)"
    ):
        publish(artifact, f"{missing}/x", progress=False)


def test_torchrun_ranks_load_straight_from_gcs(
    artifact: Path, gcs_emulator: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """gs:// end to end under torchrun: each rank's ``load_state_dict(gs://...)`` equals the local artifact's."""
    import fsspec

    from tests.helpers.emulators import use_gcs

    use_gcs(gcs_emulator, monkeypatch)
    name = f"torchrun-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("gs", skip_instance_cache=True).mkdir(name)
    uri = publish(artifact, f"gs://{name}/tp2", progress=False)
    gcs_emulator.requests.clear()
    worker = Path(__file__).parent / "workers" / "fetch_and_load.py"
    run_torchrun(worker, uri, str(artifact), str(tmp_path / "nodes"), str(tmp_path), nproc=2, timeout=180)
    manifest = read_manifest(artifact)
    small = sorted(f.path for f in manifest.files if f.rank is None)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["equal"]
        assert seen["files"] == sorted([MANIFEST_NAME, *small, manifest.rank_file(rank).path])
        assert len(gcs_emulator.downloads(f"tp2/{manifest.rank_file(rank).path}")) >= 1


MISSING_PACKAGE = """
import sys
sys.modules[sys.argv[1]] = None  # as if it were not installed
from reshard.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize(
    ("package", "url", "extra"),
    [("gcsfs", "gs://bucket/x", "gcs"), ("adlfs", "az://container/x", "azure"), ("s3fs", "s3://b/x", "s3")],
)
def test_a_missing_package_names_its_pip_extra(artifact: Path, package: str, url: str, extra: str) -> None:
    command = [sys.executable, "-c", MISSING_PACKAGE, package, "publish", str(artifact), url, "-q"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == StorageError.exit_code, result.stderr
    scheme = url.partition(":")[0]
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(f"{url}: {scheme}:// needs {package}: pip install 'reshard[{extra}]'")
    )
    assert "Traceback" not in result.stderr


def test_an_unknown_scheme_is_refused_by_fetch_too(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"^nosuch://b/x: unsupported scheme"):
        fetch_artifact("nosuch://b/x", 0, cache_dir=tmp_path, progress=False)


def test_a_read_only_file_system_is_one_line(artifact: Path) -> None:
    """http:// is an fsspec file system that only reads: publishing to it fails on the first file, in one line."""
    with pytest.raises(StorageError, match=r"^http://127\.0\.0\.1:9/x/\S+: cannot write \(this file system does not"):
        publish(artifact, "http://127.0.0.1:9/x", progress=False)


def test_no_credentials_is_one_line(
    artifact: Path, s3_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.helpers.s3_server import fresh_bucket

    _, name = fresh_bucket(s3_server, monkeypatch, tmp_path, "nocreds")
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(variable)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup either
    with pytest.raises(
        StorageError, match=rf"^s3://{name}: no such bucket \(or no access to it: check the credentials"
    ):
        publish(artifact, f"s3://{name}/x", progress=False)  # s3fs falls back to unsigned requests, which S3 refuses
