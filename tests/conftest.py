"""Shared test settings and fixtures.

No test may reach the network (there is none here; fail fast instead of retrying).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.helpers.checkpoints import CheckpointCache
    from tests.helpers.emulators import Azurite, GcsEmulator
    from tests.helpers.s3_server import RecordingMotoServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# read by gcsfs when imported: its plain HTTP client, no gRPC probe per bucket (see tests/helpers/emulators.py)
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> CheckpointCache:
    """Tiny checkpoints and their artifacts, each built once per session: ``tiny.artifact("qwen2", tp=2)``."""
    from tests.helpers.checkpoints import CheckpointCache

    return CheckpointCache(Path(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[RecordingMotoServer]:
    """A real S3-compatible server on loopback (moto), shared by every test that publishes to or fetches from S3."""
    from tests.helpers.s3_server import RecordingMotoServer

    server = RecordingMotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    """A GCS emulator on loopback (``gcp-storage-emulator``) for gcsfs; skips, saying why, where either is missing."""
    pytest.importorskip("gcsfs", reason="gs:// tests need gcsfs (pip install '.[test]')")
    pytest.importorskip("gcp_storage_emulator", reason="gs:// tests need gcp-storage-emulator (pip install '.[test]')")
    from tests.helpers.emulators import GcsEmulator

    emulator = GcsEmulator()
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """Azurite's blob service on loopback for adlfs; skips, saying why, where Azurite (npm) or adlfs is missing."""
    pytest.importorskip("adlfs", reason="az:// tests need adlfs (pip install -e '.[test]')")
    from tests.helpers.emulators import Azurite, azurite_binary

    binary = azurite_binary()
    if binary is None:
        pytest.skip("az:// tests need Azurite: `make setup` installs it with npm (npm install --prefix .node azurite)")
    server = Azurite(binary, tmp_path_factory.mktemp("azurite"))
    server.wait()
    yield server
    server.stop()
