"""Trust and operations: damaged inputs are refused, not laundered; the output side fails in one line and cleans up.

A re-shard or consolidation reads the old rank files through their headers and copies bytes without looking at
them, so without a check a flipped byte (or two tensors' offsets swapped in a header) would come out as a new
artifact whose manifest vouches for it. Every input file is hashed against the manifest before anything is
promoted; publishing sends only bytes it hashed in the same pass.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import reshard
from reshard.cli import main
from reshard.commands.publish import publish
from reshard.manifests import MANIFEST_NAME, FileEntry, read_manifest
from reshard.manifests.errors import IntegrityError, OutputError
from reshard.manifests.storage import VerifiedStream, atomic_write, os_errors, verified_copy
from tests.helpers.checkpoints import make_checkpoint

# --- damaged artifacts ------------------------------------------------------------------------------------------


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0x01  # inside the last tensor's bytes: headers and sizes stay valid
    path.write_bytes(bytes(data))


def swap_offsets(path: Path) -> None:
    """Swap two same-shaped tensors' ``data_offsets`` in the header; the file keeps its size and stays readable."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    names = [n for n in header if n != "__metadata__" and n.endswith("input_layernorm.weight")][:2]
    assert len(names) == 2
    first, second = (header[n] for n in names)
    assert first["shape"] == second["shape"] and first["dtype"] == second["dtype"]
    first["data_offsets"], second["data_offsets"] = second["data_offsets"], first["data_offsets"]
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= length
    path.write_bytes(data[:8] + raw + b" " * (length - len(raw)) + data[8 + length :])


DAMAGES: dict[str, Callable[[Path], None]] = {"flip": flip_byte, "swap": swap_offsets}


@pytest.fixture(scope="module")
def source_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trust")
    source = make_checkpoint("llama", root / "ckpt")
    out = root / "art-tp2"
    reshard.convert(source, out, tp=2, progress=False)
    return out


@pytest.fixture(params=sorted(DAMAGES))
def damaged(request: pytest.FixtureRequest, source_artifact: Path, tmp_path: Path) -> Path:
    copy = Path(shutil.copytree(source_artifact, tmp_path / "damaged"))
    DAMAGES[request.param](copy / read_manifest(copy).rank_file(1).path)
    assert _exit_code(["verify", str(copy), "-q"]) == IntegrityError.exit_code
    return copy


def _exit_code(argv: list[str]) -> int | None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code  # type: ignore[return-value]


def _nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_reshard_refuses_a_damaged_artifact_and_leaves_nothing(damaged: Path, tmp_path: Path) -> None:
    out = tmp_path / "tp1"
    assert _exit_code(["--tp", "1", str(damaged), "-o", str(out), "-q"]) == IntegrityError.exit_code
    _nothing_left(out)


def test_consolidate_refuses_a_damaged_artifact_and_leaves_nothing(damaged: Path, tmp_path: Path) -> None:
    out = tmp_path / "whole"
    assert _exit_code(["consolidate", str(damaged), "-o", str(out), "-q"]) == IntegrityError.exit_code
    _nothing_left(out)


def test_publish_to_a_folder_refuses_a_damaged_artifact(damaged: Path, tmp_path: Path) -> None:
    dest = tmp_path / "published"
    assert _exit_code(["publish", str(damaged), str(dest), "-q"]) == IntegrityError.exit_code
    assert not (dest / MANIFEST_NAME).exists()
    assert not [p for p in dest.rglob("*") if "rank-00001" in p.name] if dest.exists() else True


def test_an_intact_artifact_still_reshards_and_consolidates(source_artifact: Path, tmp_path: Path) -> None:
    assert _exit_code_or_zero(["--tp", "1", str(source_artifact), "-o", str(tmp_path / "tp1"), "-q"]) == 0
    assert _exit_code_or_zero(["consolidate", str(source_artifact), "-o", str(tmp_path / "c"), "-q"]) == 0
    assert _exit_code_or_zero(["verify", str(tmp_path / "tp1"), "-q"]) == 0
    assert not list(tmp_path.glob(".*"))  # no lock or staging folder left


def _exit_code_or_zero(argv: list[str]) -> int | None:
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code  # type: ignore[return-value]
    return 0


# --- publishing: S3 and the Hub ----------------------------------------------------------------------------------


@pytest.fixture
def s3(s3_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Any, str]:
    """A fresh bucket on the moto server, reached the standard AWS way (as in test_publish)."""
    from tests.helpers.s3_server import fresh_bucket

    fs, bucket = fresh_bucket(s3_server, monkeypatch, tmp_path, "trust")
    return fs, bucket


def _uploads(fs: Any, bucket: str) -> list[str]:
    return [u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])]


def test_s3_publish_of_changed_bytes_aborts_its_upload(
    source_artifact: Path, s3: tuple[Any, str], tmp_path: Path
) -> None:
    fs, bucket = s3
    changed = Path(shutil.copytree(source_artifact, tmp_path / "changed"))
    flip_byte(changed / read_manifest(changed).rank_file(1).path)
    with pytest.raises(IntegrityError, match="changed since the manifest was written"):
        publish(changed, f"s3://{bucket}/m", progress=False)
    assert _uploads(fs, bucket) == []  # the multipart upload was aborted, not left to be billed
    assert not fs.exists(f"{bucket}/m/rank-00001-of-00002.safetensors")
    assert not fs.exists(f"{bucket}/m/{MANIFEST_NAME}")


def test_s3_publish_aborts_uploads_a_killed_publish_left(source_artifact: Path, s3: tuple[Any, str]) -> None:
    fs, bucket = s3
    mine = "m/rank-00000-of-00002.safetensors"
    for key in (mine, "other/rank-00000-of-00002.safetensors"):
        fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    publish(source_artifact, f"s3://{bucket}/m", progress=False)
    assert _uploads(fs, bucket) == ["other/rank-00000-of-00002.safetensors"]  # only this artifact's keys
    assert fs.exists(f"{bucket}/{mine}")


def _fake_hub(monkeypatch: pytest.MonkeyPatch, upload: Callable[[Any], None]) -> list[Any]:
    """``HfApi`` with no network: create_commit runs ``upload`` on each operation, as the uploader would."""
    import huggingface_hub

    commits: list[Any] = []

    def create_commit(self: Any, repo_id: str, operations: list[Any], **kwargs: Any) -> None:
        for operation in operations:
            upload(operation)
        commits.append(operations)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    return commits


def _sha256_as_sent(operation: Any) -> None:
    """What hf_xet does: hash the bytes it sends and report the sha256 (``upload_info.sha256 = ...``)."""
    import hashlib

    if isinstance(operation.path_or_fileobj, str):
        operation.upload_info.sha256 = hashlib.sha256(Path(operation.path_or_fileobj).read_bytes()).digest()


def test_hub_publish_refuses_damaged_bytes_before_any_upload(damaged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commits = _fake_hub(monkeypatch, _sha256_as_sent)
    with pytest.raises(IntegrityError, match="changed since the manifest was written"):
        publish(damaged, "hf://org/damaged", progress=False)
    assert commits == []


def test_hub_publish_refuses_bytes_changed_during_the_upload(
    source_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = Path(shutil.copytree(source_artifact, tmp_path / "copy"))
    rank1 = copy / read_manifest(copy).rank_file(1).path

    def upload(operation: Any) -> None:
        if operation.path_in_repo == rank1.name:
            flip_byte(rank1)  # after reshard's check, before the uploader reads it
        _sha256_as_sent(operation)

    commits = _fake_hub(monkeypatch, upload)
    with pytest.raises(IntegrityError, match=rf"{rank1.name}: changed since the manifest"):
        publish(copy, "hf://org/copy", progress=False)
    assert commits == []  # create_commit never reached its commit call


def test_hub_publish_of_an_intact_artifact_commits_every_file(
    source_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = _fake_hub(monkeypatch, _sha256_as_sent)
    publish(source_artifact, "hf://org/intact", progress=False)
    assert len(commits) == 1
    assert {op.path_in_repo for op in commits[0]} >= {f.path for f in read_manifest(source_artifact).files}


# --- fetching -----------------------------------------------------------------------------------------------------


def test_a_corrupt_hub_cache_entry_is_evicted_and_fetched_again(
    source_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    from reshard.loaders.fetch import fetch_artifact
    from tests.test_publish import FakeHub

    class CachingHub(FakeHub):
        """Like the real ``hf_hub_download``: a file already in the Hub cache is returned as is, unchecked."""

        def __call__(self, repo_id: str, filename: str, *, revision: str | None = None, **kwargs: Any) -> str:
            entry = self.cache / "snapshots" / self.commit / filename
            if entry.exists():
                self.calls.append((repo_id, filename, revision))
                return str(entry)
            return super().__call__(repo_id, filename, revision=revision, **kwargs)

    fake = CachingHub(Path(shutil.copytree(source_artifact, tmp_path / "remote")), tmp_path / "hub-cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    folder = fetch_artifact("hf://org/m", 0, cache_dir=tmp_path / "reshard", progress=False)
    name = read_manifest(source_artifact).rank_file(0).path
    flip_byte((folder / name).resolve())  # bit rot in the Hub's cached blob
    calls = len(fake.calls)
    again = fetch_artifact("hf://org/m", 0, cache_dir=tmp_path / "reshard", progress=False)
    assert (again / name).read_bytes() == (source_artifact / name).read_bytes()
    assert [f for _, f, _ in fake.calls[calls:]].count(name) == 2  # the bad copy, then a fresh one


# --- the output side ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "llama")


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A real read-only file system: a read-only bind mount (we run as root, so chmod would not stop writes)."""
    source, mount = tmp_path / "ro-source", tmp_path / "ro"
    source.mkdir()
    mount.mkdir()
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reshard", *argv], capture_output=True, text=True, timeout=300)


def test_a_read_only_output_is_one_line_and_exit_11(checkpoint: Path, read_only: Path) -> None:
    for argv in (["--tp", "2", str(checkpoint), "-o", str(read_only / "out"), "-q"],):
        done = _cli(*argv)
        assert done.returncode == OutputError.exit_code, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.strip().count("\n") == 0
        assert "Read-only file system" in done.stderr


def test_a_read_only_consolidate_output_is_exit_11(source_artifact: Path, read_only: Path) -> None:
    done = _cli("consolidate", str(source_artifact), "-o", str(read_only / "whole"), "-q")
    assert done.returncode == OutputError.exit_code, done.stderr
    assert "Traceback" not in done.stderr and "Read-only file system" in done.stderr


def test_a_second_conversion_to_the_same_output_fails_at_once(checkpoint: Path, tmp_path: Path) -> None:
    import fcntl

    from reshard.write.staging import lock_path, staging_path

    out = tmp_path / "out"
    lock = lock_path(out)
    with open(lock, "a") as held:  # another reshard holds the output
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        staging_path(out).mkdir()  # and is writing into its staging folder
        (staging_path(out) / "rank-00000-of-00002.safetensors.tmp").write_bytes(b"in progress")
        done = _cli("--tp", "2", str(checkpoint), "-o", str(out), "-q")
        assert done.returncode == OutputError.exit_code, done.stderr
        assert "another reshard is writing this output" in done.stderr and "Traceback" not in done.stderr
        assert (staging_path(out) / "rank-00000-of-00002.safetensors.tmp").exists()  # the other run is untouched
    shutil.rmtree(staging_path(out))
    assert _cli("--tp", "2", str(checkpoint), "-o", str(out), "-q").returncode == 0
    assert not lock.exists() and (out / MANIFEST_NAME).is_file()


INTERRUPT_AT_FINISH = """
import os, signal, sys
import reshard.commands.convert as convert
from reshard.cli import main

def finish(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` would, once every rank file is written
    raise AssertionError("SIGTERM did not interrupt")

convert._finish = finish
main(sys.argv[1:])
"""


def test_sigterm_keeps_the_staging_folder_and_the_same_command_resumes(checkpoint: Path, tmp_path: Path) -> None:
    from reshard.write.staging import lock_path, staging_path

    out = tmp_path / "out"
    argv = ["--tp", "2", str(checkpoint), "-o", str(out), "-q"]
    done = subprocess.run([sys.executable, "-c", INTERRUPT_AT_FINISH, *argv], capture_output=True, text=True)
    assert done.returncode == 130, done.stderr
    assert "interrupted" in done.stderr and "the same command resumes" in done.stderr
    assert "Traceback" not in done.stderr
    kept = sorted(p.name for p in staging_path(out).glob("*.safetensors"))
    assert kept == ["rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]
    assert not out.exists() and not lock_path(out).exists()
    resumed = _cli(*argv)
    assert resumed.returncode == 0, resumed.stderr
    assert _cli("verify", str(out), "-q").returncode == 0
    assert not staging_path(out).exists()


def test_a_run_failing_on_bad_input_removes_its_staging_folder(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import reshard.commands.convert as convert
    from reshard.manifests.errors import FileFormatError
    from reshard.write.staging import staging_path

    def bad_input(*args: Any, **kwargs: Any) -> None:
        raise FileFormatError("source: damaged (injected)")

    monkeypatch.setattr(convert, "write_part", bad_input)
    out = tmp_path / "out"
    assert _exit_code(["--tp", "2", str(checkpoint), "-o", str(out), "-q"]) == FileFormatError.exit_code
    _nothing_left(out)
    assert not staging_path(out).exists()


# --- the shared helpers ----------------------------------------------------------------------------------------------


def test_verified_copy_passes_exact_bytes_and_refuses_others(tmp_path: Path) -> None:
    from reshard.manifests.hashing import hash_bytes

    data = b"x" * 1000
    entry = FileEntry("f", len(data), hash_bytes(data))
    got: list[bytes] = []
    verified_copy([data[:300], data[300:]], got.append, entry, "uri")
    assert b"".join(got) == data
    with pytest.raises(IntegrityError, match="truncated, 999 of the 1000"):
        verified_copy([data[:-1]], lambda c: None, entry, "uri")
    with pytest.raises(IntegrityError, match="longer than the 1000 bytes"):
        verified_copy([data, b"y"], lambda c: None, entry, "uri")
    with pytest.raises(IntegrityError, match=r"^uri: xxh3 .* does not match"):
        verified_copy([b"y" * 1000], lambda c: None, entry, "uri")
    stream = VerifiedStream(entry, "uri")
    stream.update(data)
    stream.check()


def test_atomic_write_leaves_the_target_whole_or_untouched(tmp_path: Path) -> None:
    from reshard.manifests.storage import atomic_file

    target = tmp_path / "sub" / "file"
    atomic_write(target, b"one")
    with pytest.raises(RuntimeError), atomic_file(target) as out:
        out.write(b"two, half")
        raise RuntimeError("failed halfway")
    assert target.read_bytes() == b"one"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file"]


def test_os_errors_become_one_line_storage_or_output_errors(tmp_path: Path) -> None:
    from reshard.manifests.errors import StorageError

    with pytest.raises(StorageError, match=r"^s3://b/k: no such object$"), os_errors("s3://b/k", StorageError):
        raise FileNotFoundError(2, "No such file or directory")
    read_only = pytest.raises(OutputError, match=r"^/out: cannot write \(Read-only file system\)$")
    with read_only, os_errors("/out", OutputError, "cannot write", missing=False):
        raise OSError(30, "Read-only file system")
    missing = pytest.raises(OutputError, match=r"^/out: cannot write \(No such file or directory\)$")
    with missing, os_errors("/out", OutputError, "cannot write", missing=False):
        os.mkdir(tmp_path / "x" / "y")  # reported as a failed write, not as a missing object
    with pytest.raises(IntegrityError), os_errors("u", StorageError):  # reshard's own errors pass through
        raise IntegrityError("u: bad")
