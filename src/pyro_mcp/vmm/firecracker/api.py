"""A small client for Firecracker's REST API over its Unix socket.

One :class:`Resource` object per REST resource, declared in one table
(:meth:`FirecrackerAPI.__init__`). ``put``/``patch`` take the body as keyword arguments and
drop those that are None, so callers pass optional fields straight through. Any non-2xx
answer raises :class:`FirecrackerAPIError` carrying Firecracker's ``fault_message``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import string
from pathlib import Path
from typing import Any

from pyro_mcp.errors import VMError

DEFAULT_TIMEOUT_S = 10.0


class FirecrackerAPIError(VMError):
    """Firecracker refused an API request (its ``fault_message`` says why)."""

    def __init__(self, method: str, path: str, status: int, fault_message: str) -> None:
        super().__init__(f"Firecracker API {method} {path} failed ({status}): {fault_message}")
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault_message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: Path, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _drop_none(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if value is not None}


class Resource:
    """One REST resource; ``{name}`` fields in its path are filled from the body."""

    def __init__(self, api: FirecrackerAPI, path: str) -> None:
        self._api = api
        self.path = path
        self.path_fields = [f for _, f, _, _ in string.Formatter().parse(path) if f]

    def _path_for(self, body: dict[str, Any]) -> str:
        missing = [name for name in self.path_fields if body.get(name) is None]
        if missing:
            raise VMError(f"Firecracker API {self.path} needs {', '.join(missing)}")
        return self.path.format(**{name: body[name] for name in self.path_fields})

    def get(self, timeout_s: float | None = None, **ids: Any) -> Any:
        return self._api.request("GET", self._path_for(ids), None, timeout_s)

    def put(self, timeout_s: float | None = None, **body: Any) -> Any:
        body = _drop_none(body)
        return self._api.request("PUT", self._path_for(body), body, timeout_s)

    def patch(self, timeout_s: float | None = None, **body: Any) -> Any:
        body = _drop_none(body)
        return self._api.request("PATCH", self._path_for(body), body, timeout_s)


class FirecrackerAPI:
    """The API of one Firecracker process, reached through ``socket_path``."""

    def __init__(self, socket_path: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._conn: _UnixConnection | None = None
        # The resource table: attribute -> REST path (see Firecracker's swagger file).
        self.instance = Resource(self, "/")
        self.version = Resource(self, "/version")
        self.vm_config = Resource(self, "/vm/config")
        self.machine_config = Resource(self, "/machine-config")
        self.boot_source = Resource(self, "/boot-source")
        self.drives = Resource(self, "/drives/{drive_id}")
        self.network_interfaces = Resource(self, "/network-interfaces/{iface_id}")
        self.vsock = Resource(self, "/vsock")
        self.logger = Resource(self, "/logger")
        self.metrics = Resource(self, "/metrics")
        self.entropy = Resource(self, "/entropy")
        self.balloon = Resource(self, "/balloon")
        self.actions = Resource(self, "/actions")
        self.vm = Resource(self, "/vm")
        self.snapshot_create = Resource(self, "/snapshot/create")
        self.snapshot_load = Resource(self, "/snapshot/load")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self, method: str, path: str, body: dict[str, Any] | None, timeout_s: float | None = None
    ) -> Any:
        """Send one request; returns the decoded JSON answer (None when it has no body)."""
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        timeout = self.timeout_s if timeout_s is None else timeout_s
        # A kept-alive connection may have been closed by Firecracker: retry once on a new one.
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._conn or _UnixConnection(self.socket_path, timeout)
            self._conn = conn
            try:
                conn.timeout = timeout
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if reused and attempt == 1:
                    continue
                raise VMError(f"Firecracker API {method} {path}: connection lost: {exc}") from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise VMError(
                    f"Firecracker API {method} {path} at {self.socket_path}: {exc}"
                ) from exc
        if response.will_close:
            self.close()
        if not 200 <= response.status < 300:
            raise FirecrackerAPIError(method, path, response.status, _fault(data))
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise VMError(f"Firecracker API {method} {path}: answer is not JSON") from exc

    def __enter__(self) -> FirecrackerAPI:
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):
            self.close()


def _fault(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    try:
        decoded = json.loads(text)
    except ValueError:
        return text or "(no fault message)"
    if isinstance(decoded, dict) and "fault_message" in decoded:
        return str(decoded["fault_message"])
    return text
