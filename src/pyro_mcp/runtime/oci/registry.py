"""A client for the OCI distribution protocol: manifests, blobs, chunked uploads.

Only what environments need, written against the distribution spec:

- ``GET``/``HEAD``/``PUT`` manifests, ``HEAD``/``GET`` blobs (``Range`` to resume);
- uploads live in :mod:`pyro_mcp.runtime.oci.upload`;
- auth: a ``401`` names the scheme. ``Basic`` takes the credentials; ``Bearer`` sends us
  to the realm for a token (anonymously for pulls, with credentials to publish).

The registry is not trusted: every document is bounded before it is parsed, every blob
is hashed as it streams and checked against the digest it was asked for, and a
``Docker-Content-Digest`` that disagrees with the bytes is refused.

Timeouts and chunk size: :mod:`pyro_mcp.runtime.oci.transfer`.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import ssl
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyro_mcp.errors import (
    IntegrityError,
    NotFound,
    OperationTimeout,
    RegistryError,
    RegistryUnreachable,
    TooLarge,
)
from pyro_mcp.runtime.oci.credentials import Credentials
from pyro_mcp.runtime.oci.reference import Reference, check_digest, is_loopback
from pyro_mcp.runtime.oci.transfer import (
    REQUEST_TIMEOUT_ENV,
    UPLOAD_TIMEOUT_ENV,
    Meter,
    Progress,
    Tunables,
    mib,
    quiet,
)

MANIFEST_MAX_BYTES = 4 << 20
ERROR_BODY_MAX_BYTES = 64 << 10
TOKEN_MAX_BYTES = 1 << 20
READ_BYTES = 1 << 20
MAX_REDIRECTS = 5

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)

# --- the client -----------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: http.client.HTTPResponse
    connection: http.client.HTTPConnection
    url: str

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def read(self, limit: int, what: str) -> bytes:
        data = self.body.read(limit + 1)
        if len(data) > limit:
            self.close()
            raise TooLarge(f"{what} is larger than {limit} bytes")
        return data

    def close(self) -> None:
        self.connection.close()


class RegistryClient:
    """One registry host; ``credentials`` only when publishing."""

    def __init__(
        self,
        registry: str,
        *,
        api_host: str | None = None,
        credentials: Credentials | None = None,
        insecure: bool = False,
        tunables: Tunables | None = None,
    ) -> None:
        self.registry = registry
        self.host = api_host or registry
        self.credentials = credentials
        self.plain_http = is_loopback(self.host) or insecure
        self.scheme = "http" if self.plain_http else "https"
        self.tunables = tunables or Tunables.from_env()
        self._auth: dict[str, str] = {}  # scope -> Authorization header value
        self._ssl = ssl.create_default_context()

    # -- plumbing --------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}{path}"

    def _send(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        body: bytes | None,
        timeout: float,
        timeout_name: str,
        what: str,
    ) -> Response:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RegistryError(f"registry {self.registry} sent a bad address for {what}: {url!r}")
        trusted_http = self.plain_http and parts.netloc == self.host
        if parts.scheme == "http" and not trusted_http and not is_loopback(parts.netloc):
            raise RegistryError(
                f"registry {self.registry} sent {what} to plain-HTTP {parts.netloc}",
                hint="plain HTTP is used only for loopback registries or with --insecure",
            )
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(
                parts.netloc, timeout=timeout, context=self._ssl
            )
        else:
            connection = http.client.HTTPConnection(parts.netloc, timeout=timeout)
        try:
            connection.request(method, target, body=body, headers=headers)
            response = connection.getresponse()
        except TimeoutError as exc:
            connection.close()
            raise OperationTimeout(
                f"registry {self.registry} did not answer {what} within {timeout:g} s "
                f"({timeout_name})",
                hint=f"raise {timeout_name} for a slow link, or check the registry",
            ) from exc
        except ssl.SSLError as exc:
            connection.close()
            raise RegistryUnreachable(
                f"TLS with registry {self.registry} failed: {exc.reason or exc}",
                hint="a registry without TLS needs --insecure (loopback ones never do)",
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise RegistryUnreachable(
                f"cannot reach registry {self.registry} ({what}): {reason}"
            ) from exc
        return Response(response.status, response.headers, response, connection, url)

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        scope: str,
        what: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        upload: bool = False,
        follow: bool = False,
    ) -> Response:
        """One request with auth (a 401 is answered once) and, if ``follow``, redirects."""
        url = path_or_url if "://" in path_or_url else self.url(path_or_url)
        timeout = self.tunables.upload_timeout_s if upload else self.tunables.request_timeout_s
        timeout_name = UPLOAD_TIMEOUT_ENV if upload else REQUEST_TIMEOUT_ENV
        sent_auth = False
        for _attempt in range(MAX_REDIRECTS + 2):
            all_headers = {"User-Agent": "pyro-mcp", **(headers or {})}
            same_host = urllib.parse.urlsplit(url).netloc == self.host
            authorization = self._auth.get(scope) if same_host else None
            if authorization:
                all_headers["Authorization"] = authorization
            response = self._send(
                method,
                url,
                headers=all_headers,
                body=body,
                timeout=timeout,
                timeout_name=timeout_name,
                what=what,
            )
            if response.status == 401 and same_host and not sent_auth:
                challenge = response.header("WWW-Authenticate") or ""
                response.read(ERROR_BODY_MAX_BYTES, "an error answer")
                response.close()
                self._auth[scope] = self._authorize(challenge, scope, what)
                sent_auth = True
                continue
            if response.status == 401:
                detail = self._error_text(response)
                raise self._refused(what, detail)
            if follow and response.status in (301, 302, 303, 307, 308):
                location = response.header("Location")
                response.close()
                if not location:
                    raise RegistryError(f"registry {self.registry} redirected {what} nowhere")
                url = urllib.parse.urljoin(url, location)
                continue
            return response
        raise RegistryError(f"registry {self.registry}: too many redirects for {what}")

    def _refused(self, what: str, detail: str) -> RegistryError:
        if self.credentials is None:
            return RegistryError(
                f"registry {self.registry} requires credentials for {what} (401 Unauthorized"
                f"{': ' + detail if detail else ''})",
                hint="set PYRO_REGISTRY_USERNAME and PYRO_REGISTRY_TOKEN, or log in with docker",
            )
        return RegistryError(
            f"registry {self.registry} refused the credentials of user "
            f"{self.credentials.username!r} from {self.credentials.source} for {what} "
            f"(401 Unauthorized{': ' + detail if detail else ''})",
            hint="check the user name and token (PYRO_REGISTRY_USERNAME/PYRO_REGISTRY_TOKEN, "
            "or the docker config.json entry for this registry)",
        )

    def _authorize(self, challenge: str, scope: str, what: str) -> str:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.credentials is None:
                raise self._refused(what, "")
            if not self.plain_http or is_loopback(self.host):
                return self.credentials.basic()
            raise RegistryError(
                f"registry {self.registry} asks for a password over plain HTTP; refused"
            )
        if scheme == "bearer":
            return "Bearer " + self._token(params, scope, what)
        raise RegistryError(
            f"registry {self.registry} asks for {what} with an auth scheme pyro does not "
            f"speak: {challenge[:80]!r}"
        )

    def _token(self, params: dict[str, str], scope: str, what: str) -> str:
        realm = params.get("realm", "")
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RegistryError(f"registry {self.registry} names a bad token realm {realm!r}")
        if parts.scheme == "http" and not is_loopback(parts.netloc):
            raise RegistryError(
                f"registry {self.registry} sends us to plain-HTTP token realm {parts.netloc}; "
                "refused"
            )
        query = [("scope", scope)]
        if params.get("service"):
            query.insert(0, ("service", params["service"]))
        separator = "&" if parts.query else "?"
        url = realm + separator + urllib.parse.urlencode(query)
        headers = {"User-Agent": "pyro-mcp", "Accept": "application/json"}
        if self.credentials is not None:
            headers["Authorization"] = self.credentials.basic()
        response = self._send(
            "GET",
            url,
            headers=headers,
            body=None,
            timeout=self.tunables.request_timeout_s,
            timeout_name=REQUEST_TIMEOUT_ENV,
            what=f"a token for {what}",
        )
        try:
            if response.status == 401:
                raise self._refused(what, "the token service said 401")
            if response.status != 200:
                raise RegistryError(
                    f"the token service of {self.registry} answered {response.status} for {what}"
                )
            raw = response.read(TOKEN_MAX_BYTES, "the token answer")
        finally:
            response.close()
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise RegistryError(f"the token service of {self.registry} sent no JSON") from exc
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token or len(token) > 64 << 10:
            raise RegistryError(f"the token service of {self.registry} sent no token")
        return token

    def _error_text(self, response: Response) -> str:
        """The registry's error codes and messages (bounded), for our messages."""
        try:
            raw = response.read(ERROR_BODY_MAX_BYTES, "an error answer")
        except (TooLarge, OSError, http.client.HTTPException):
            return ""
        finally:
            response.close()
        try:
            errors = json.loads(raw).get("errors", [])
            texts = [
                f"{e.get('code', '')}: {e.get('message', '')}"[:200]
                for e in errors[:3]
                if isinstance(e, dict)
            ]
            return "; ".join(texts)
        except (ValueError, AttributeError):
            return raw[:200].decode(errors="replace").strip()

    def unexpected(self, response: Response, what: str) -> RegistryError:
        detail = self._error_text(response)
        return RegistryError(
            f"registry {self.registry} answered {response.status} to {what}"
            + (f": {detail}" if detail else "")
        )

    # -- manifests -------------------------------------------------------------------

    def get_manifest(self, ref: Reference) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of ``ref``'s manifest, checked against its digest."""
        what = f"the manifest of {ref}"
        response = self.request(
            "GET",
            f"/v2/{ref.repository}/manifests/{ref.target}",
            scope=pull_scope(ref.repository),
            what=what,
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
        )
        if response.status == 404:
            detail = self._error_text(response)
            raise NotFound(
                f"{ref} does not exist" + (f" ({detail})" if detail else ""),
                hint="check the repository and tag",
            )
        if response.status != 200:
            raise self.unexpected(response, f"GET {what}")
        try:
            body = response.read(MANIFEST_MAX_BYTES, what)
        finally:
            response.close()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        claimed = response.header("Docker-Content-Digest")
        if ref.digest and digest != ref.digest:
            raise IntegrityError(f"{what} hashes to {digest}, not the {ref.digest} asked for")
        if claimed and claimed != digest:
            raise IntegrityError(
                f"{what} hashes to {digest}, but the registry says it is {claimed}; refused"
            )
        media_type = (response.header("Content-Type") or "").split(";")[0].strip()
        return body, media_type, digest

    def put_manifest(self, ref: Reference, body: bytes, media_type: str) -> str:
        what = f"the manifest of {ref}"
        response = self.request(
            "PUT",
            f"/v2/{ref.repository}/manifests/{ref.target}",
            scope=push_scope(ref.repository),
            what=f"publishing {what}",
            headers={"Content-Type": media_type, "Content-Length": str(len(body))},
            body=body,
        )
        if response.status not in (200, 201):
            raise self.unexpected(response, f"PUT {what}")
        response.close()
        return "sha256:" + hashlib.sha256(body).hexdigest()

    # -- blobs -----------------------------------------------------------------------

    def blob_size(self, repository: str, digest: str, *, scope: str | None = None) -> int | None:
        """The size of a blob the repository holds, or None (HEAD; 404 -> None)."""
        response = self.request(
            "HEAD",
            f"/v2/{repository}/blobs/{digest}",
            scope=scope or pull_scope(repository),
            what=f"HEAD blob {digest[:19]}",
            follow=True,
        )
        response.body.read()
        response.close()
        if response.status == 404:
            return None
        if response.status != 200:
            raise RegistryError(f"registry {self.registry} answered {response.status} to HEAD")
        length = response.header("Content-Length")
        return int(length) if length and length.isdigit() else None

    def get_small_blob(self, repository: str, digest: str, limit: int, what: str) -> bytes:
        check_digest(digest, what=what)
        response = self._get_blob(repository, digest, what, offset=0)
        try:
            body = response.read(limit, what)
        finally:
            response.close()
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if actual != digest:
            raise IntegrityError(f"{what} hashes to {actual}, not {digest}; refused")
        return body

    def _get_blob(self, repository: str, digest: str, what: str, *, offset: int) -> Response:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = self.request(
            "GET",
            f"/v2/{repository}/blobs/{digest}",
            scope=pull_scope(repository),
            what=what,
            headers=headers,
            follow=True,
        )
        if response.status == 404:
            detail = self._error_text(response)
            raise NotFound(f"{what} ({digest}) is not in {self.registry}/{repository}: {detail}")
        if response.status not in (200, 206):
            raise self.unexpected(response, f"GET {what}")
        return response

    def download_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        partial: Path,
        *,
        what: str,
        progress: Progress = quiet,
    ) -> None:
        """Stream a blob into ``partial``, resuming what an earlier try left there.

        The bytes already in ``partial`` are hashed again (a hash state cannot be saved),
        then the rest is asked for with ``Range``. More bytes than ``size``, or a final
        digest other than ``digest``, removes the file and raises IntegrityError.
        """
        check_digest(digest, what=what)
        hasher = hashlib.sha256()
        have = 0
        if partial.exists():
            with open(partial, "rb") as handle:
                for block in iter(lambda: handle.read(READ_BYTES), b""):
                    hasher.update(block)
                    have += len(block)
            if have > size:
                partial.unlink()
                hasher, have = hashlib.sha256(), 0
        meter = Meter(what, size, progress)
        meter.done = have
        if have:
            progress(f"{what}: resuming at {mib(have)} of {mib(size)} MiB")
        if have < size:
            response = self._get_blob(repository, digest, what, offset=have)
            try:
                if have and response.status == 200:  # no Range support: from the start
                    progress(f"{what}: the registry cannot resume; starting again")
                    hasher, have, meter.done = hashlib.sha256(), 0, 0
                    partial.unlink()
                with open(partial, "ab") as out:
                    for block in _stream(response, self.registry, what):
                        have += len(block)
                        if have > size:
                            out.close()
                            partial.unlink()
                            raise IntegrityError(
                                f"{what} from {self.registry} is larger than its "
                                f"{size} bytes; refused"
                            )
                        out.write(block)
                        hasher.update(block)
                        meter.add(len(block))
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                response.close()
        if have < size:
            raise RegistryError(
                f"{what} from {self.registry} ended after {have} of {size} bytes "
                "(truncated); run the pull again to resume",
            )
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            partial.unlink()
            raise IntegrityError(
                f"{what} from {self.registry} hashes to {actual}, not {digest}; "
                "the download was removed"
            )


def _stream(response: Response, registry: str, what: str) -> Iterator[bytes]:
    while True:
        try:
            block = response.body.read1(READ_BYTES)
        except TimeoutError as exc:
            raise OperationTimeout(
                f"registry {registry} stopped sending {what} ({REQUEST_TIMEOUT_ENV})",
                hint="run the pull again: it resumes where this one stopped",
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise RegistryError(
                f"the download of {what} from {registry} broke off: {exc}",
                hint="run the pull again: it resumes where this one stopped",
            ) from exc
        if not block:
            return
        yield block


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…"`` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {key.lower(): value for key, value in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def push_scope(repository: str, source: str | None = None) -> str:
    scope = f"repository:{repository}:pull,push"
    return f"{scope} repository:{source}:pull" if source else scope
