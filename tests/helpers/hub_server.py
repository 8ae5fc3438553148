"""The Hub's file endpoint on 127.0.0.1, so that ``hf_hub_download`` runs unchanged (no network, no monkeypatched
download): ``HEAD``/``GET /ORG/NAME/resolve/REVISION/PATH`` answered from local folders, one per revision, with the
headers huggingface_hub reads (``X-Repo-Commit``, ``ETag``, ``Content-Length``). Every request is recorded with
its ``Authorization`` header, so a test sees what really reached the server.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class HubRequest:
    """One request the server answered: method, repo, revision as asked, file path, and the Authorization header."""

    method: str
    repo_id: str
    revision: str
    path: str
    authorization: str | None


class HubServer:
    """A loopback Hub serving folders as repo revisions: ``add("org/name", folder, "v1", commit=...)``."""

    def __init__(self) -> None:
        self.revisions: dict[tuple[str, str], tuple[str, Path]] = {}  # (repo, branch/tag/commit) -> (commit, folder)
        self.requests: list[HubRequest] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, repo_id: str, folder: Path, *names: str, commit: str) -> None:
        """Serve ``folder`` as ``repo_id`` at ``commit`` (40 hex digits) and under each branch or tag in ``names``."""
        for name in (commit, *names):
            self.revisions[(repo_id, name)] = (commit, folder)

    def files(self, repo_id: str) -> list[HubRequest]:
        """The requests for ``repo_id``'s files (huggingface_hub also asks the server for its own lists)."""
        with self._lock:
            return [request for request in self.requests if request.repo_id == repo_id]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def use(self, monkeypatch: Any) -> None:
        """Point this process's huggingface_hub at the server, online (the tests run with ``HF_HUB_OFFLINE=1``)."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with self._lock:
            self.requests.clear()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                parts = unquote(urlsplit(self.path).path).strip("/").split("/")
                repo_id, revision = "/".join(parts[:2]), parts[3] if len(parts) > 3 else ""
                path = "/".join(parts[4:])
                with hub._lock:
                    hub.requests.append(
                        HubRequest(self.command, repo_id, revision, path, self.headers.get("Authorization"))
                    )
                found = hub.revisions.get((repo_id, revision)) if parts[2:3] == ["resolve"] else None
                if found is None or not (found[1] / path).is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound" if found else "RevisionNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                commit, folder = found
                data = (folder / path).read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
