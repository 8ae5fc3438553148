"""Google Cloud Storage and Azure Blob Storage on 127.0.0.1 for tests, reached by gcsfs and adlfs exactly as they
reach the real services (their own settings: ``STORAGE_EMULATOR_HOST``, ``AZURE_STORAGE_CONNECTION_STRING``).

GCS: ``gcp-storage-emulator`` (PyPI) in this process, recording each request's method and path. gcsfs first asks
the Storage Control API over gRPC what kind of bucket it is; the emulator speaks no gRPC, and gcsfs waits 60 s per
bucket before falling back (and asks again on every operation, as it does not cache the failure). Setting
``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` before gcsfs is imported makes ``gcsfs.GCSFileSystem`` the plain HTTP
client, which is what a standard bucket gets anyway. Credentials: ``token="anon"`` through fsspec's own config (its
``FSSPEC_GS_TOKEN`` variable in child processes), so nothing asks a metadata server.

Azure: Azurite (npm ``azurite``, installed by ``make setup`` into ``.node/`` where npm exists) as a child process;
tests that need it skip, saying why, where it is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before anything imports gcsfs

# Azurite's well-known development account (public, documented; accepted by Azurite only)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
REPO = Path(__file__).resolve().parents[2]


class GcsEmulator:
    """``gcp-storage-emulator`` on a free loopback port, in memory; ``requests`` lists ``(method, path)``."""

    def __init__(self) -> None:
        from gcp_storage_emulator import server

        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        storage = server.Storage(use_memory_fs=True)
        outer = self

        class Recording(server.RequestHandler):  # type: ignore[misc, name-defined]
            def parse_request(self) -> bool:
                ok: bool = super().parse_request()
                if ok:
                    with outer._lock:
                        outer.requests.append((self.command, self.path))
                return ok

        # a thread per connection: torchrun's ranks download at the same time (the emulator's own server is serial)
        self._httpd = server.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Recording(storage, *a))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def downloads(self, needle: str) -> list[str]:
        """Paths of media GETs (object bytes) naming ``needle``."""
        return [p for m, p in self.requests if m == "GET" and "alt=media" in p and needle.replace("/", "%2F") in p]


def use_gcs(emulator: GcsEmulator, monkeypatch: Any) -> None:
    """Point gcsfs at ``emulator`` the standard way, anonymous, in this process and its children."""
    import fsspec.config
    import gcsfs

    if gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":  # imported before the variable was set: it would wait 60 s
        raise RuntimeError("gcsfs was imported without GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (see tests/conftest.py)")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.endpoint)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    monkeypatch.setenv("FSSPEC_GS_TOKEN", "anon")
    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon"})


def azurite_binary() -> str | None:
    """Azurite's blob server: ``.node/`` (``make setup``), else on PATH; ``None`` if it is not installed."""
    local = REPO / ".node" / "node_modules" / ".bin" / "azurite-blob"
    return str(local) if local.is_file() else shutil.which("azurite-blob")


class Azurite:
    """Azurite's blob service as a child process on a free loopback port, in memory."""

    def __init__(self, binary: str, workdir: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--inMemoryPersistence"]
        command += ["--skipApiVersionCheck", "--loose", "--silent"]
        self._process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT};"
        )

    def wait(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"azurite exited: {self._process.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"azurite did not listen on 127.0.0.1:{self.port} within {timeout} s")

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()


def use_azure(azurite: Azurite, monkeypatch: Any) -> None:
    """Point adlfs at ``azurite`` the standard way (its connection-string variable), here and in children."""
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
