"""A real S3-compatible server on 127.0.0.1 for tests: moto's server mode, with every request recorded.

moto implements the S3 protocol over HTTP; boto3 and s3fs talk to it through ``AWS_ENDPOINT_URL`` exactly as they
would to AWS or MinIO (s3fs's own suite does the same). The server wraps moto's WSGI app to record each request's
method, object path, User-Agent and response body bytes: what a client in this process or another really downloaded
(to within a MiB if it hangs up early). It can also refuse writes to chosen objects (HTTP 403) to break an upload.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from moto.server import DomainDispatcherApplication, ThreadedMotoServer, create_backend_app
from werkzeug.serving import make_server

PIECE_BYTES = 1024 * 1024
DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>AccessDenied</Code><Message>Access Denied (injected by the test)</Message></Error>"
)


@dataclass
class Request:
    """One HTTP request the server answered: ``path`` is ``/bucket/key``, ``sent`` the body bytes returned.

    Recorded when it arrives and counted before each chunk goes out, so a client never sees a response that is not
    in the log yet.
    """

    method: str
    path: str
    query: str
    agent: str = ""  # the User-Agent: botocore puts AWS_SDK_UA_APP_ID in it as "app/ID"
    sent: int = 0

    @property
    def is_write(self) -> bool:
        return self.method in ("PUT", "POST", "DELETE")


class RecordingMotoServer(ThreadedMotoServer):
    """``ThreadedMotoServer`` on a free loopback port, recording requests in ``self.requests``."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.requests: list[Request] = []
        self.deny_writes: set[str] = set()  # substrings of object paths whose PUT/POST get 403
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def _server_entry(self) -> None:  # ThreadedMotoServer's own, with the recording layer around the app
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(self._ip_address, self._port, self._recording(app), threaded=True)
        self._server_ready_event.set()
        self._server.serve_forever()

    def _recording(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        def handle(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
            method, path = environ["REQUEST_METHOD"], unquote(environ.get("PATH_INFO", ""))
            query = environ.get("QUERY_STRING", "")
            request = Request(method, path, query, environ.get("HTTP_USER_AGENT", ""))
            self._record(request)
            if method in ("PUT", "POST") and any(name in path for name in self.deny_writes):
                environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
                start_response("403 Forbidden", [("Content-Type", "application/xml")])
                yield DENIED
                return
            body = app(environ, start_response)
            try:
                for chunk in body:  # in pieces, so a client that hangs up early is not counted for the rest
                    for start in range(0, len(chunk), PIECE_BYTES):
                        piece = chunk[start : start + PIECE_BYTES]
                        request.sent += len(piece)
                        yield piece
            finally:
                if hasattr(body, "close"):
                    body.close()

        return handle

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def downloaded(self, needle: str = "") -> int:
        """Body bytes returned by GETs of objects whose path contains ``needle``."""
        return sum(r.sent for r in self.requests if r.method == "GET" and needle in r.path)

    def writes(self) -> list[Request]:
        return [r for r in self.requests if r.is_write]


def fresh_bucket(server: Any, monkeypatch: Any, tmp_path: Any, prefix: str = "test") -> tuple[Any, str]:
    """A new bucket on ``server``, with credentials, endpoint and region set the standard AWS way (so s3fs and boto3
    reach it as they would AWS or MinIO), no AWS config of this machine in the way, and the reshard cache in
    ``tmp_path``; the server's request log and refused writes start empty. Returns the s3fs file system and the
    bucket's name."""
    import uuid

    import s3fs

    env = {
        "AWS_ENDPOINT_URL": server.endpoint,
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
    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    server.requests.clear()
    server.deny_writes.clear()
    return fs, bucket
