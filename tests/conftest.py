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
    from tests.helpers.s3_server import RecordingMotoServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
