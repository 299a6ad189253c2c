"""Blob uploads of the distribution protocol: chunked, resumable, mounted when possible.

``POST`` opens a session, ``PATCH`` sends chunks with ``Content-Range`` and ``PUT
?digest=`` completes it. After a failed chunk the session is asked how far it got (``GET``
-> ``Range``) and the upload goes on from there; a session file lets a later run go on
where an interrupted one stopped. ``POST ?mount=&from=`` links a blob the registry holds
in another repository without sending it.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from pathlib import Path

from pyro_mcp.errors import OperationTimeout, RegistryError, RegistryUnreachable
from pyro_mcp.runtime.oci.registry import RegistryClient, Response, push_scope
from pyro_mcp.runtime.oci.transfer import Meter, Progress, mib, quiet

CHUNK_RETRIES = 3


def mount_blob(client: RegistryClient, repository: str, digest: str, source: str) -> bool:
    """Ask the registry to link ``digest`` from repository ``source`` (True if it did)."""
    query = urllib.parse.urlencode({"mount": digest, "from": source})
    response = client.request(
        "POST",
        f"/v2/{repository}/blobs/uploads/?{query}",
        scope=push_scope(repository, source),
        what=f"mounting {digest[:19]} from {source}",
        headers={"Content-Length": "0"},
        body=b"",
    )
    response.body.read()
    response.close()
    if response.status == 201:
        return True
    if response.status == 202:  # not mountable: an upload session was opened; let it go
        location = response.header("Location")
        if location:
            _cancel_upload(client, repository, location)
        return False
    return False


def _cancel_upload(client: RegistryClient, repository: str, location: str) -> None:
    try:
        response = client.request(
            "DELETE",
            urllib.parse.urljoin(client.url("/"), location),
            scope=push_scope(repository),
            what="cancelling an unused upload",
        )
        response.close()
    except RegistryError:
        pass


def _start_upload(client: RegistryClient, repository: str) -> str:
    response = client.request(
        "POST",
        f"/v2/{repository}/blobs/uploads/",
        scope=push_scope(repository),
        what=f"starting an upload to {repository}",
        headers={"Content-Length": "0"},
        body=b"",
    )
    if response.status != 202:
        raise client.unexpected(response, f"POST an upload to {repository}")
    response.body.read()
    response.close()
    return _location(client, response, "the upload session")


def _upload_offset(client: RegistryClient, repository: str, location: str) -> int | None:
    """How many bytes the upload session holds (its ``Range``), or None if it is gone."""
    response = client.request(
        "GET",
        location,
        scope=push_scope(repository),
        what="the state of an upload",
    )
    response.body.read()
    response.close()
    if response.status != 204:
        return None
    return _range_end(response.header("Range"))


def upload_blob(
    client: RegistryClient,
    repository: str,
    source: Path,
    digest: str,
    size: int,
    *,
    what: str,
    session: Path | None = None,
    progress: Progress = quiet,
) -> None:
    """Upload ``source`` in chunks; ``session`` records the upload so a later run goes on.

    After a failed chunk the session is asked how far it got and the upload goes on
    from there (``CHUNK_RETRIES`` times per chunk).
    """
    location, offset = _resume(client, repository, digest, session)
    if location is None:
        location, offset = _start_upload(client, repository), 0
    elif offset:
        progress(f"{what}: resuming the upload at {mib(offset)} of {mib(size)} MiB")
    meter = Meter(what, size, progress)
    meter.done = offset
    chunk = client.tunables.chunk_bytes
    with open(source, "rb") as handle:
        while offset < size:
            handle.seek(offset)
            data = handle.read(min(chunk, size - offset))
            start = offset
            for attempt in range(CHUNK_RETRIES):
                try:
                    location = _patch(client, repository, location, offset, data)
                    offset += len(data)
                    break
                except (OperationTimeout, RegistryUnreachable):
                    got = _upload_offset(client, repository, location)
                    if attempt == CHUNK_RETRIES - 1 or got is None:
                        raise
                    if got != offset:  # part or all of the chunk landed after all
                        offset = got
                        break
            meter.add(offset - start)
            if session is not None:
                _save_session(session, repository, digest, location, offset)
    _finish(client, repository, location, digest, what)
    if session is not None:
        session.unlink(missing_ok=True)


def _patch(client: RegistryClient, repository: str, location: str, offset: int, data: bytes) -> str:
    end = offset + len(data) - 1
    response = client.request(
        "PATCH",
        location,
        scope=push_scope(repository),
        what=f"uploading bytes {offset}-{end}",
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(data)),
            "Content-Range": f"{offset}-{end}",
        },
        body=data,
        upload=True,
    )
    if response.status != 202:
        raise client.unexpected(response, f"PATCH bytes {offset}-{end}")
    response.body.read()
    response.close()
    return _location(client, response, "the upload session")


def _finish(client: RegistryClient, repository: str, location: str, digest: str, what: str) -> None:
    separator = "&" if "?" in location else "?"
    response = client.request(
        "PUT",
        f"{location}{separator}{urllib.parse.urlencode({'digest': digest})}",
        scope=push_scope(repository),
        what=f"completing the upload of {what}",
        headers={"Content-Length": "0"},
        body=b"",
        upload=True,
    )
    if response.status != 201:
        raise client.unexpected(response, f"PUT (complete) {what}")
    response.close()


def _location(client: RegistryClient, response: Response, what: str) -> str:
    location = response.header("Location")
    if not location:
        raise RegistryError(f"registry {client.registry} gave {what} no Location")
    return urllib.parse.urljoin(response.url, location)


def _resume(
    client: RegistryClient, repository: str, digest: str, session: Path | None
) -> tuple[str | None, int]:
    if session is None:
        return None, 0
    try:
        saved = json.loads(session.read_text())
    except (OSError, ValueError):
        return None, 0
    if not (
        isinstance(saved, dict)
        and saved.get("repository") == repository
        and saved.get("digest") == digest
        and isinstance(saved.get("location"), str)
    ):
        return None, 0
    location = str(saved["location"])
    if urllib.parse.urlsplit(location).netloc != client.host:
        return None, 0
    try:
        offset = _upload_offset(client, repository, location)
    except RegistryError:
        return None, 0
    if offset is None or offset != saved.get("offset"):
        return None, 0
    return location, offset


def _save_session(session: Path, repository: str, digest: str, location: str, offset: int) -> None:
    session.parent.mkdir(parents=True, exist_ok=True)
    tmp = session.with_suffix(".tmp")
    data = {"repository": repository, "digest": digest, "location": location, "offset": offset}
    tmp.write_text(json.dumps(data))
    os.replace(tmp, session)


def _range_end(value: str | None) -> int | None:
    """``0-N`` -> N + 1 bytes held; no header -> 0 bytes."""
    if not value:
        return 0
    match = re.fullmatch(r"(?:bytes=)?0-(\d+)", value.strip())
    return int(match.group(1)) + 1 if match else None
