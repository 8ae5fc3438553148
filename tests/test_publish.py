"""Publishing artifacts (folder, S3, Hub) and fetching one rank's share, against a real S3 server on loopback.

The S3 tests run moto's server mode (an S3 protocol implementation over HTTP) on 127.0.0.1; s3fs reaches it through
``AWS_ENDPOINT_URL`` as it would reach AWS or MinIO, and the server records what each client downloaded. The Hub
is tested at huggingface_hub's API boundary (``HfApi`` methods, ``hf_hub_download``): there is no network here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import reshard
from reshard.cli import main
from reshard.commands.publish import publish
from reshard.commands.verify import verify_artifact
from reshard.loaders.fetch import fetch_artifact, is_remote
from reshard.manifests import MANIFEST_NAME, read_manifest
from reshard.manifests.errors import IntegrityError, ManifestError, StorageError
from reshard.manifests.hashing import hash_bytes
from tests.helpers.distributed import run_torchrun
from tests.helpers.s3_server import RecordingMotoServer, fresh_bucket


@dataclass
class S3:
    server: RecordingMotoServer
    fs: Any
    bucket: str

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def keys(self, prefix: str) -> set[str]:
        base = f"{self.bucket}/{prefix}/"
        return {name[len(base) :] for name in self.fs.find(base)}


@pytest.fixture
def s3(s3_server: RecordingMotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3:
    """A fresh bucket; credentials, endpoint and region set the standard AWS way; the reshard cache in tmp_path."""
    fs, bucket = fresh_bucket(s3_server, monkeypatch, tmp_path, "test")
    return S3(s3_server, fs, bucket)


@pytest.fixture
def artifact(tiny: Any) -> Path:
    return tiny.artifact("llama", tp=2, tokenizer=True)


def non_rank_bytes(artifact: Path) -> int:
    return sum(f.size for f in read_manifest(artifact).files if f.rank is None)


# --- folders -------------------------------------------------------------------------------------------------


def test_publish_to_folder_is_a_complete_artifact_and_a_rerun_rewrites_nothing(artifact: Path, tmp_path: Path) -> None:
    where = publish(artifact, f"{tmp_path / 'models'}/", progress=False)
    dest = tmp_path / "models" / artifact.name
    assert where == str(dest)
    assert verify_artifact(dest) == []
    assert (dest / MANIFEST_NAME).read_bytes() == (artifact / MANIFEST_NAME).read_bytes()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dest.iterdir()}
    publish(artifact, str(dest), progress=False)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dest.iterdir()} == before


def test_publish_refuses_a_broken_artifact_before_writing_anything(artifact: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(artifact, tmp_path / "broken")
    rank1 = broken / read_manifest(broken).rank_file(1).path
    rank1.write_bytes(rank1.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match=r"rank-00001-of-00002\.safetensors has \d+ bytes"):
        publish(broken, str(tmp_path / "dest"), progress=False)
    assert not (tmp_path / "dest").exists()


def test_publish_refuses_a_file_changed_behind_the_manifest(artifact: Path, tmp_path: Path) -> None:
    changed = shutil.copytree(artifact, tmp_path / "changed")
    rank0 = changed / read_manifest(changed).rank_file(0).path
    data = bytearray(rank0.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: caught while copying, and the copy is discarded
    rank0.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="changed since the manifest was written"):
        publish(changed, str(tmp_path / "dest"), progress=False)
    assert not (tmp_path / "dest" / rank0.name).exists()
    assert not (tmp_path / "dest" / MANIFEST_NAME).exists()
    assert not list((tmp_path / "dest").glob(".*partial"))


def test_cli_publish_and_one_line_errors(artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["publish", str(artifact), str(tmp_path / "out"), "-q"])
    assert f"published {tmp_path / 'out'}" in capsys.readouterr().out
    assert verify_artifact(tmp_path / "out") == []
    with pytest.raises(SystemExit) as exited:
        main(["publish", str(artifact), "nosuch://bucket/x", "-q"])
    assert exited.value.code == StorageError.exit_code
    assert "nosuch://bucket/x: unsupported scheme" in capsys.readouterr().err


# --- S3: publish -----------------------------------------------------------------------------------------------


def test_publish_to_s3_lists_every_file_with_its_hash_and_sends_the_manifest_last(artifact: Path, s3: S3) -> None:
    where = publish(artifact, s3.uri("models/"), progress=False)
    prefix = f"models/{artifact.name}"
    assert where == s3.uri(prefix)
    manifest = read_manifest(artifact)
    assert s3.keys(prefix) == {f.path for f in manifest.files} | {MANIFEST_NAME}
    for entry in manifest.files:
        assert s3.fs.metadata(f"{s3.bucket}/{prefix}/{entry.path}")["xxh3"] == entry.xxh3  # x-amz-meta-xxh3
    writes = s3.server.writes()
    assert writes[-1].path.endswith(f"/{MANIFEST_NAME}") and writes[-1].method == "PUT"
    assert sum(w.path.endswith(f"/{MANIFEST_NAME}") for w in writes) == 1


def test_s3_publish_retry_after_a_failed_upload_sends_only_what_is_missing(artifact: Path, s3: S3) -> None:
    s3.server.deny_writes.add("rank-00001")
    with pytest.raises(StorageError, match=r"rank-00001-of-00002\.safetensors"):
        publish(artifact, s3.uri("tp2"), progress=False)
    present = s3.keys("tp2")
    assert MANIFEST_NAME not in present  # a reader sees no artifact at all
    assert "rank-00000-of-00002.safetensors" in present and "rank-00001-of-00002.safetensors" not in present

    s3.server.deny_writes.clear()
    s3.server.requests.clear()
    publish(artifact, s3.uri("tp2"), progress=False)
    written = {w.path.rsplit("/", 1)[-1] for w in s3.server.writes()}
    assert written == {"rank-00001-of-00002.safetensors", MANIFEST_NAME}
    assert s3.keys("tp2") == {f.path for f in read_manifest(artifact).files} | {MANIFEST_NAME}

    s3.server.requests.clear()
    publish(artifact, s3.uri("tp2"), progress=False)  # complete already: nothing is written
    assert s3.server.writes() == []


def test_republishing_another_artifact_removes_the_old_manifest_first(artifact: Path, s3: S3, tiny: Any) -> None:
    publish(artifact, s3.uri("model"), progress=False)
    other = tiny.artifact("llama_tied", tp=2)
    s3.server.deny_writes.add("rank-00001")
    with pytest.raises(StorageError):
        publish(other, s3.uri("model"), progress=False)
    # rank 0 is already the new one, so the old manifest must be gone: no reader can pair it with the new file
    assert MANIFEST_NAME not in s3.keys("model")


def test_publish_to_a_missing_bucket_is_a_one_line_error(artifact: Path, s3: S3) -> None:
    with pytest.raises(StorageError, match="no such bucket"):
        publish(artifact, "s3://no-such-bucket-here/x", progress=False)


# --- S3: fetch --------------------------------------------------------------------------------------------------


def test_each_rank_downloads_only_its_own_file(artifact: Path, s3: S3, tmp_path: Path) -> None:
    uri = publish(artifact, s3.uri("tp2"), progress=False)
    manifest = read_manifest(artifact)
    manifest_size = (artifact / MANIFEST_NAME).stat().st_size
    for rank in (0, 1):
        s3.server.requests.clear()
        folder = fetch_artifact(uri, rank, cache_dir=tmp_path / f"node{rank}", progress=False)
        own, other = manifest.rank_file(rank).path, manifest.rank_file(1 - rank).path
        assert s3.server.downloaded(own) == manifest.rank_file(rank).size
        assert s3.server.downloaded(other) == 0
        assert not [r for r in s3.server.requests if other in r.path]  # not even a HEAD
        assert s3.server.downloaded() == manifest_size + non_rank_bytes(artifact) + manifest.rank_file(rank).size
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
            [MANIFEST_NAME, own, *(f.path for f in manifest.files if f.rank is None)]
        )
        for entry in [*(f for f in manifest.files if f.rank is None), manifest.rank_file(rank)]:
            assert (folder / entry.path).read_bytes() == (artifact / entry.path).read_bytes()


def test_a_second_start_reuses_the_cache_and_ranks_share_it(artifact: Path, s3: S3, tmp_path: Path) -> None:
    uri = publish(artifact, s3.uri("tp2"), progress=False)
    cache = tmp_path / "shared"
    first = fetch_artifact(uri, 0, cache_dir=cache, progress=False)
    s3.server.requests.clear()
    assert fetch_artifact(uri, 0, cache_dir=cache, progress=False) == first
    assert s3.server.downloaded() == (artifact / MANIFEST_NAME).stat().st_size  # the manifest only
    s3.server.requests.clear()
    second = fetch_artifact(uri, lambda manifest: 1, cache_dir=cache, progress=False)
    assert second == first  # one folder holding both ranks' files
    assert s3.server.downloaded("rank-00001") == read_manifest(artifact).rank_file(1).size
    assert s3.server.downloaded("config.json") == 0


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_or_truncated_object_is_named_and_never_cached(
    artifact: Path, s3: S3, tmp_path: Path, damage: str
) -> None:
    uri = publish(artifact, s3.uri("tp2"), progress=False)
    name = read_manifest(artifact).rank_file(1).path
    data = bytearray((artifact / name).read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[-100:]
    s3.fs.pipe_file(f"{s3.bucket}/tp2/{name}", bytes(data))
    cache = tmp_path / "cache"
    message = "xxh3 .* does not match" if damage == "flip" else "truncated"
    with pytest.raises(IntegrityError, match=rf"^{uri}/{name}: {message}"):
        fetch_artifact(uri, 1, cache_dir=cache, progress=False)
    left = [p.name for p in cache.rglob("*") if p.is_file()]
    assert not [n for n in left if "rank-" in n and not n.endswith(".lock")]
    with pytest.raises(IntegrityError):  # still refused on the next start: nothing bad was kept
        fetch_artifact(uri, 1, cache_dir=cache, progress=False)
    fetch_artifact(uri, 0, cache_dir=cache, progress=False)  # the intact rank is unaffected


def test_a_cached_file_changed_on_disk_is_downloaded_again(artifact: Path, s3: S3, tmp_path: Path) -> None:
    uri = publish(artifact, s3.uri("tp2"), progress=False)
    folder = fetch_artifact(uri, 0, cache_dir=tmp_path / "c", progress=False)
    rank0 = folder / read_manifest(artifact).rank_file(0).path
    data = bytearray(rank0.read_bytes())
    data[0] ^= 0xFF
    rank0.write_bytes(bytes(data))
    s3.server.requests.clear()
    fetch_artifact(uri, 0, cache_dir=tmp_path / "c", progress=False)
    assert rank0.read_bytes() == (artifact / rank0.name).read_bytes()
    assert s3.server.downloaded(rank0.name) == rank0.stat().st_size


@pytest.mark.parametrize("stages", [1, 2])
def test_torchrun_ranks_fetch_only_their_file_and_load_it(
    artifact: Path, s3: S3, tmp_path: Path, tiny: Any, stages: int
) -> None:
    """tp 2, or 2 pipeline stages (tp 1): each rank fetches the manifest, the small files and its own file only."""
    if stages > 1:
        artifact = tmp_path / "pp2"
        reshard.convert(tiny.checkpoint("llama", num_hidden_layers=3), artifact, tp=1, pp=stages, progress=False)
    uri = publish(artifact, s3.uri("tp2"), progress=False)
    s3.server.requests.clear()
    worker = Path(__file__).parent / "workers" / "fetch_and_load.py"
    run_torchrun(worker, uri, str(artifact), str(tmp_path / "nodes"), str(tmp_path), nproc=2, timeout=120)
    manifest = read_manifest(artifact)
    small = sorted(f.path for f in manifest.files if f.rank is None)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["equal"]
        assert seen["files"] == sorted([MANIFEST_NAME, *small, manifest.rank_file(rank).path])
        got = [r for r in s3.server.requests if f"app/rank{rank} " in r.agent and r.method == "GET"]
        own, other = manifest.rank_file(rank), manifest.rank_file(1 - rank)
        assert sum(r.sent for r in got if r.path.endswith(own.path)) == own.size
        assert not [r for r in s3.server.requests if f"app/rank{rank} " in r.agent and other.path in r.path]


FETCH_IN_CHILD = """
import sys, time
from reshard.loaders.fetch import fetch_artifact
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # both processes start fetching at the same moment
print(fetch_artifact(sys.argv[1], 0, cache_dir=sys.argv[2], progress=False))
"""


def test_two_processes_sharing_a_cache_download_a_file_once(artifact: Path, s3: S3, tmp_path: Path) -> None:
    uri = publish(artifact, s3.uri("tp2"), progress=False)
    s3.server.requests.clear()
    start_at = str(time.time() + 3)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", FETCH_IN_CHILD, uri, str(tmp_path / "shared"), start_at],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "AWS_SDK_UA_APP_ID": f"child{index}"},  # botocore adds "app/childN" to its User-Agent
        )
        for index in range(2)
    ]
    outputs = [child.communicate(timeout=60) for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    manifest = read_manifest(artifact)
    by_child = [[r for r in s3.server.requests if f"app/child{index} " in r.agent] for index in range(2)]
    assert all(by_child)  # both reached the server (each reads the manifest)
    for entry in [*(f for f in manifest.files if f.rank is None), manifest.rank_file(0)]:
        got = [
            sum(r.sent for r in requests if r.method == "GET" and r.path.endswith(f"/{entry.path}"))
            for requests in by_child
        ]
        assert sorted(got) == [0, entry.size], (entry.path, got)  # one child downloaded it, the other reused it
    assert s3.server.downloaded("rank-00001") == 0


def test_a_manifest_path_leaving_the_artifact_is_refused(artifact: Path, s3: S3, tmp_path: Path) -> None:
    uri = publish(artifact, s3.uri("evil"), progress=False)
    manifest = json.loads((artifact / MANIFEST_NAME).read_text())
    config = next(f for f in manifest["files"] if f["path"] == "config.json")
    config["path"] = "../../../escaped.json"
    s3.fs.pipe_file(f"{s3.bucket}/evil/{MANIFEST_NAME}", json.dumps(manifest).encode())
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(ManifestError, match="leaves the artifact"):
        fetch_artifact(uri, 0, cache_dir=cache, progress=False)
    assert not list(tmp_path.rglob("escaped.json"))


def test_fetch_errors_name_what_is_wrong(artifact: Path, s3: S3, tmp_path: Path) -> None:
    uri = publish(artifact, s3.uri("tp2"), progress=False)
    with pytest.raises(ManifestError, match="no file for rank 2"):
        fetch_artifact(uri, 2, cache_dir=tmp_path, progress=False)
    with pytest.raises(StorageError, match=rf"{s3.uri('nothing')}/manifest.json: no such object"):
        fetch_artifact(s3.uri("nothing"), 0, cache_dir=tmp_path, progress=False)


def test_local_paths_pass_through_and_import_stays_light(artifact: Path) -> None:
    assert fetch_artifact(artifact, 0) == artifact
    assert not is_remote(artifact) and is_remote("s3://b/p") and is_remote("hf://o/n")
    code = (
        "import sys, torch; before = set(sys.modules); import reshard.loaders.fetch; print(*set(sys.modules) - before)"
    )
    added = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not {m.split(".")[0] for m in added} & {"s3fs", "huggingface_hub", "tqdm", "xxhash", "botocore", "fsspec"}


# --- the Hub, at huggingface_hub's API boundary -------------------------------------------------------------------


def test_publish_to_the_hub_is_one_commit_with_every_file_a_model_card_and_the_manifest(
    artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls: list[tuple[str, dict[str, Any]]] = []

    def record(name: str) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> None:
            calls.append((name, {"args": args, **kwargs}))

        return call

    for name in ("create_repo", "create_branch", "create_commit"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, record(name))
    assert publish(artifact, "hf://my-org/tiny-tp2@v1", progress=False) == "hf://my-org/tiny-tp2@v1"
    assert [name for name, _ in calls] == ["create_repo", "create_branch", "create_commit"]
    commit = calls[-1][1]
    assert commit["args"][0] == "my-org/tiny-tp2" and commit["revision"] == "v1"
    operations = commit["args"][1]
    paths = [op.path_in_repo for op in operations]
    manifest = read_manifest(artifact)
    assert sorted(paths) == sorted([*(f.path for f in manifest.files), "README.md", MANIFEST_NAME])
    by_path = {op.path_in_repo: op for op in operations}
    assert by_path[MANIFEST_NAME].path_or_fileobj == (artifact / MANIFEST_NAME).read_bytes()
    card = by_path["README.md"].path_or_fileobj.decode()
    assert card.startswith("---\nlibrary_name: reshard\n")
    assert "| mesh | tp=2 |" in card and 'load_model("hf://my-org/tiny-tp2@v1")' in card
    for entry in manifest.files:
        assert f"`{entry.path}`" in card and entry.xxh3 in card


class FakeHub:
    """``hf_hub_download`` over a folder, into a Hub-style cache (blobs + snapshot symlinks); records each call."""

    commit = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, repo: Path, cache: Path) -> None:
        self.repo, self.cache, self.calls = repo, cache, []

    def __call__(self, repo_id: str, filename: str, *, revision: str | None = None, **kwargs: Any) -> str:
        self.calls.append((repo_id, filename, revision))
        data = (self.repo / filename).read_bytes()
        blob = self.cache / "blobs" / hash_bytes(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        entry = self.cache / "snapshots" / self.commit / filename
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.unlink(missing_ok=True)
        entry.symlink_to(blob)
        return str(entry)


@pytest.fixture
def hub(artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    import huggingface_hub

    fake = FakeHub(shutil.copytree(artifact, tmp_path / "remote"), tmp_path / "hub-cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return fake


def test_fetch_from_the_hub_downloads_only_the_needed_files_pinned_to_one_commit(
    artifact: Path, hub: FakeHub, tmp_path: Path
) -> None:
    folder = fetch_artifact("hf://my-org/tiny-tp2@main", 1, cache_dir=tmp_path / "reshard")
    manifest = read_manifest(artifact)
    assert hub.calls[0] == ("my-org/tiny-tp2", MANIFEST_NAME, "main")
    later = hub.calls[1:]
    assert {revision for _, _, revision in later} == {FakeHub.commit}
    assert sorted(name for _, name, _ in later) == sorted(
        [*(f.path for f in manifest.files if f.rank is None), manifest.rank_file(1).path]
    )
    # the artifact folder is reshard's, of hard links to the Hub cache's blobs (its snapshot entries are symlinks
    # out of the snapshot, which a manifest's paths may not be)
    assert folder == tmp_path / "reshard" / "hf" / "my-org" / "tiny-tp2" / hash_bytes(
        (artifact / MANIFEST_NAME).read_bytes()
    )
    name = manifest.rank_file(1).path
    assert (folder / name).samefile(hub.cache / "snapshots" / FakeHub.commit / name) and not (
        folder / name
    ).is_symlink()
    assert (folder / name).read_bytes() == (artifact / name).read_bytes()
    assert read_manifest(folder) == manifest


def test_a_corrupt_hub_download_is_removed_from_the_hub_cache(artifact: Path, hub: FakeHub, tmp_path: Path) -> None:
    name = read_manifest(artifact).rank_file(0).path
    data = bytearray((hub.repo / name).read_bytes())
    data[100] ^= 0x01
    (hub.repo / name).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"^hf://my-org/tiny-tp2@{FakeHub.commit}/{name}: does not match"):
        fetch_artifact("hf://my-org/tiny-tp2", 0, cache_dir=tmp_path / "reshard")
    assert not (hub.cache / "snapshots" / FakeHub.commit / name).exists()
    assert not (hub.cache / "blobs" / hash_bytes(bytes(data))).exists()


def test_convert_push_to_publishes_the_new_artifact(tiny: Any, s3: S3, tmp_path: Path) -> None:
    """``reshard --tp 2 MODEL --push-to s3://...`` converts, then publishes what it wrote (manifest last)."""
    import subprocess
    import sys

    source = tiny.checkpoint("llama")
    out = tmp_path / "art"
    command = [sys.executable, "-m", "reshard", "--tp", "2", str(source), "-o", str(out), "-q"]
    result = subprocess.run([*command, "--push-to", s3.uri("pushed")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"published {s3.uri('pushed')}" in result.stdout
    assert s3.keys("pushed") == {f.path for f in read_manifest(out).files} | {MANIFEST_NAME}
