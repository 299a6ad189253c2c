"""Workspace secrets at rest: AES-256-GCM under one random key per host.

The key is ``<key dir>/secrets.key`` (``PYRO_KEY_DIR``, default
``~/.config/pyro-mcp/keys``): 32 random bytes, mode 0600 in a 0700 directory, created
the first time a secret is stored, and never inside the state directory, so the store
(which holds only names and ciphertext) reveals nothing without it. Each value is sealed
with a fresh 96-bit nonce and bound to its workspace and name (the associated data), so
a ciphertext moved to another row does not open. Values are opened only in memory, to be
handed to the guest agent and to redact what comes back.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pyro_mcp.errors import InvalidState

KEY_FILE = "secrets.key"
KEY_BYTES = 32
NONCE_BYTES = 12


@dataclass(frozen=True)
class Vault:
    """The host's secret key, in ``directory``; ``state_dir`` is where it must not be."""

    directory: Path
    state_dir: Path

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE

    def seal(self, workspace_id: str, name: str, value: str) -> bytes:
        """``value`` encrypted (nonce + ciphertext), creating the key on first use."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(self._key(create=True)).encrypt(
            nonce, value.encode("utf-8"), _bound_to(workspace_id, name)
        )
        return nonce + sealed

    def open(self, workspace_id: str, name: str, blob: bytes) -> str:
        """The value ``seal`` gave ``blob`` for; InvalidState when the key is missing or
        is not the one it was sealed with."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        key = self._key(create=False)
        try:
            plain = AESGCM(key).decrypt(
                blob[:NONCE_BYTES], blob[NONCE_BYTES:], _bound_to(workspace_id, name)
            )
        except InvalidTag:
            raise InvalidState(
                f"secret {name!r} of workspace {workspace_id} does not decrypt with the key "
                f"at {self.key_path}: the key was replaced, or the store was altered",
                hint="restore the original key file, or delete the workspace and create it "
                "again with its secrets",
            ) from None
        return plain.decode("utf-8")

    def _key(self, *, create: bool) -> bytes:
        self._check_apart()
        try:
            return self._read()
        except FileNotFoundError:
            if not create:
                raise InvalidState(
                    f"the secrets key {self.key_path} is missing: this host's workspace "
                    "secrets cannot be decrypted",
                    hint="restore the key file (PYRO_KEY_DIR), or delete the workspace and "
                    "create it again with its secrets",
                ) from None
        self._create()
        return self._read()

    def _check_apart(self) -> None:
        keys, state = self.directory.resolve(), self.state_dir.resolve()
        if keys.is_relative_to(state) or state.is_relative_to(keys):
            raise InvalidState(
                f"the secrets key directory {keys} overlaps the state directory {state}",
                hint="set PYRO_KEY_DIR to a directory outside PYRO_STATE_DIR",
            )

    def _read(self) -> bytes:
        fd = os.open(self.key_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise InvalidState(f"the secrets key {self.key_path} is not a file of ours")
            if info.st_mode & 0o077:
                raise InvalidState(
                    f"the secrets key {self.key_path} is readable by others "
                    f"(mode {stat.S_IMODE(info.st_mode):04o})",
                    hint=f"chmod 600 {self.key_path}",
                )
            key = os.read(fd, KEY_BYTES + 1)
        finally:
            os.close(fd)
        if len(key) != KEY_BYTES:
            raise InvalidState(f"the secrets key {self.key_path} is not {KEY_BYTES} bytes")
        return key

    def _create(self) -> None:
        _private_dirs(self.directory)
        temp = self.directory / f".{KEY_FILE}.{os.getpid()}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, self.key_path)  # never replaces a key another process made
        except FileExistsError:
            pass
        finally:
            temp.unlink()


def _private_dirs(directory: Path) -> None:
    """``directory`` and its missing parents, made 0700; the directory itself is made
    0700 even when it existed (the key must not sit where others can list it)."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)
    info = directory.stat()
    if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != 0o700:
        directory.chmod(0o700)


def _bound_to(workspace_id: str, name: str) -> bytes:
    return f"pyro-mcp secret v1\0{workspace_id}\0{name}".encode()
