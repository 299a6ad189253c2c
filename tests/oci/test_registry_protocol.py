"""The distribution protocol's harder corners: timeouts that fire and say which, the
token flow, resumable chunked uploads, the PYRO_OCI_* tunables. Servers here are ours,
on loopback: a hanging one, a token-issuing one, and the real registry."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tests.oci.conftest import TOKEN, USER
from tests.registry import Registry

from pyro_mcp.errors import InvalidArgument, OperationTimeout
from pyro_mcp.runtime.oci import upload
from pyro_mcp.runtime.oci.credentials import Credentials
from pyro_mcp.runtime.oci.reference import parse_reference
from pyro_mcp.runtime.oci.registry import RegistryClient
from pyro_mcp.runtime.oci.transfer import Tunables

QUICK = Tunables(request_timeout_s=0.5, upload_timeout_s=0.5, chunk_bytes=4096)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


def test_a_registry_that_never_answers_fires_the_request_timeout(silent_server: str) -> None:
    client = RegistryClient(silent_server, tunables=QUICK)
    started = time.monotonic()
    with pytest.raises(OperationTimeout) as caught:
        client.get_manifest(parse_reference(f"{silent_server}/pyro/debian:12"))
    assert time.monotonic() - started < 5
    assert caught.value.message == (
        f"registry {silent_server} did not answer the manifest of {silent_server}/pyro/"
        "debian:12 within 0.5 s (PYRO_OCI_REQUEST_TIMEOUT_SECONDS)"
    )


def test_an_upload_that_hangs_fires_the_upload_timeout(tmp_path: Path) -> None:
    patches: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(202)
            self.send_header("Location", "/v2/pyro/x/blobs/uploads/u1")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_PATCH(self) -> None:
            patches.append(self.headers["Content-Range"])
            time.sleep(3)  # never in time

        def do_GET(self) -> None:  # the session holds nothing yet
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    server, host = serve(Handler)
    try:
        blob = tmp_path / "blob"
        blob.write_bytes(b"x" * 10000)
        digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
        client = RegistryClient(host, tunables=QUICK)
        with pytest.raises(OperationTimeout) as caught:
            upload.upload_blob(client, "pyro/x", blob, digest, 10000, what="blob")
        assert caught.value.message == (
            f"registry {host} did not answer uploading bytes 0-4095 within 0.5 s "
            "(PYRO_OCI_UPLOAD_TIMEOUT_SECONDS)"
        )
        assert patches == ["0-4095"] * 3  # each chunk is tried three times
    finally:
        server.shutdown()


def test_the_token_flow_gets_an_anonymous_token_for_the_scope() -> None:
    asked: list[str] = []
    manifest = json.dumps({"schemaVersion": 2, "layers": []}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/token"):
                asked.append(self.path)
                assert "Authorization" not in self.headers  # anonymous
                body = json.dumps({"token": "t-123"}).encode()
            elif self.headers.get("Authorization") != "Bearer t-123":
                self.send_response(401)
                realm = f"http://{self.headers['Host']}/token"
                self.send_header(
                    "WWW-Authenticate", f'Bearer realm="{realm}",service="fake-registry"'
                )
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            else:
                body = manifest
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server, host = serve(Handler)
    try:
        client = RegistryClient(host, tunables=QUICK)
        body, _type, digest = client.get_manifest(parse_reference(f"{host}/team/env:1"))
        assert body == manifest
        assert digest == "sha256:" + hashlib.sha256(manifest).hexdigest()
        assert asked == ["/token?service=fake-registry&scope=repository%3Ateam%2Fenv%3Apull"]
        client.get_manifest(parse_reference(f"{host}/team/env:1"))
        assert len(asked) == 1  # the token is kept for its scope
    finally:
        server.shutdown()


def test_an_interrupted_chunked_upload_resumes_where_it_stopped(
    registries: tuple[Registry, Registry], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth, anonymous = registries
    client = RegistryClient(auth.host, credentials=Credentials(USER, TOKEN, "test"), tunables=QUICK)
    data = bytes(range(256)) * 100  # 25600 bytes: 7 chunks of 4096
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    session = tmp_path / "session.json"
    real_patch = upload._patch
    sent: list[int] = []

    def killed_at_the_fourth_chunk(
        client: RegistryClient, repository: str, location: str, offset: int, chunk: bytes
    ) -> str:
        if len(sent) == 3:
            raise KeyboardInterrupt  # the process is stopped here
        sent.append(offset)
        return real_patch(client, repository, location, offset, chunk)

    monkeypatch.setattr(upload, "_patch", killed_at_the_fourth_chunk)
    with pytest.raises(KeyboardInterrupt):
        upload.upload_blob(client, "pyro/x", blob, digest, len(data), what="blob", session=session)
    assert json.loads(session.read_text())["offset"] == 3 * 4096
    later = RegistryClient(auth.host, credentials=Credentials(USER, TOKEN, "test"), tunables=QUICK)
    resent: list[int] = []

    def spy(
        client: RegistryClient, repository: str, location: str, offset: int, chunk: bytes
    ) -> str:
        resent.append(offset)
        return real_patch(client, repository, location, offset, chunk)

    monkeypatch.setattr(upload, "_patch", spy)
    upload.upload_blob(later, "pyro/x", blob, digest, len(data), what="blob", session=session)
    assert sent == [0, 4096, 8192]
    assert resent == [12288, 16384, 20480, 24576]  # from where it stopped, not from 0
    assert not session.exists()
    status, body = anonymous.get(f"/v2/pyro/x/blobs/{digest}")
    assert (status, body) == (200, data)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PYRO_OCI_REQUEST_TIMEOUT_SECONDS", "nan"),
        ("PYRO_OCI_REQUEST_TIMEOUT_SECONDS", "inf"),
        ("PYRO_OCI_UPLOAD_TIMEOUT_SECONDS", "-1"),
        ("PYRO_OCI_UPLOAD_TIMEOUT_SECONDS", "1e12"),
        ("PYRO_OCI_UPLOAD_CHUNK_SIZE_BYTES", "12abc"),
        ("PYRO_OCI_UPLOAD_CHUNK_SIZE_BYTES", "99999999999999"),
    ],
)
def test_bad_tunables_are_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidArgument) as caught:
        Tunables.from_env()
    assert caught.value.message.startswith(f"{name}={value!r} is not a")


def test_tunables_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYRO_OCI_REQUEST_TIMEOUT_SECONDS", "7.5")
    monkeypatch.setenv("PYRO_OCI_UPLOAD_TIMEOUT_SECONDS", "900")
    monkeypatch.setenv("PYRO_OCI_UPLOAD_CHUNK_SIZE_BYTES", "1048576")
    assert Tunables.from_env() == Tunables(7.5, 900.0, 1 << 20)
