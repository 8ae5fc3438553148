"""Conversion split over processes (``--workers``, torchrun) and resumed after SIGKILL: always the same bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reshard
import reshard.planning.job
from reshard.request import ConversionRequest
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.distributed import free_port

TP = 4


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama_h24", tmp_path_factory.mktemp("src") / "llama")


@pytest.fixture(scope="module")
def reference(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "art"
    reshard.convert(source, out, tp=TP, progress=False)
    return out


def assert_same_artifact(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def cli(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "reshard", *args], env=env, stderr=subprocess.PIPE, text=True, **kwargs
    )


def test_workers_give_the_single_process_bytes(source: Path, reference: Path, tmp_path: Path):
    process = cli("--tp", str(TP), str(source), "-o", str(tmp_path / "art"), "--workers", "2", "-q")
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr
    assert_same_artifact(reference, tmp_path / "art")


def test_torchrun_gives_the_single_process_bytes(source: Path, reference: Path, tmp_path: Path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
        "-m", "reshard", "--tp", str(TP), str(source), "-o", str(tmp_path / "art"), "-q",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_artifact(reference, tmp_path / "art")


SLOW_WORKER = """
import sys
if "--worker" in sys.argv and sys.argv[sys.argv.index("--worker") + 1] == "1/2":
    import time
    import reshard.write.engine as write
    original = write.Streamer.copy
    def slow(*args, **kwargs):
        time.sleep(0.2)
        return original(*args, **kwargs)
    write.Streamer.copy = slow
"""


def test_killed_conversion_resumes_with_finished_files(source: Path, reference: Path, tmp_path: Path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_WORKER)  # slows worker 1 only, in the child processes
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    out, partial = tmp_path / "art", tmp_path / ".art.partial"
    args = ("--tp", str(TP), str(source), "-o", str(out), "--workers", "2", "-q")
    process = cli(*args, env=env, start_new_session=True)
    finished = [partial / "rank-00000-of-00004.safetensors.done", partial / "rank-00002-of-00004.safetensors.done"]
    deadline = time.monotonic() + 120
    while not all(p.exists() for p in finished) and time.monotonic() < deadline:
        assert process.poll() is None, "the conversion finished before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the whole job: parent and workers
    process.wait()
    assert not out.exists() and not (partial / "manifest.json").exists()
    assert not (partial / "rank-00001-of-00004.safetensors").exists()  # unfinished files never get their name
    kept = {p.name: os.stat(partial / p.name.removesuffix(".done")).st_mtime_ns for p in finished}

    result = subprocess.run([sys.executable, "-m", "reshard", *args], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert_same_artifact(reference, out)
    for name, mtime in kept.items():  # finished files were reused, not rewritten
        assert os.stat(out / name.removesuffix(".done")).st_mtime_ns == mtime
    assert not partial.exists()


def test_corrupted_finished_file_is_redone(source: Path, reference: Path, tmp_path: Path):
    out = tmp_path / "art"
    partial = tmp_path / ".art.partial"
    job = reshard.planning.job.build_job(ConversionRequest(str(source), out, TP))
    job_id = job.fingerprint()
    reshard.write.staging.prepare_staging(out, job_id)
    reshard.commands.convert.write_part(job, partial, [0, 1], job_id, progress=False)
    damaged = partial / "rank-00001-of-00004.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    reshard.convert(source, out, tp=TP, progress=False)
    assert_same_artifact(reference, out)
