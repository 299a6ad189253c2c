"""The exception tree shared by every layer.

    PyroError                      base; every error pyro raises on purpose
    ├── InvalidArgument            a caller passed a bad value (names the field)
    ├── NotFound                   an unknown environment, id or name
    │   └── Expired                the workspace or VM's TTL ran out: it is deleted
    ├── InvalidState               not allowed in the current state (names the state)
    ├── Conflict                   a name or resource is already taken
    ├── OutsideRoot                a path escapes the root it is confined to
    ├── TooLarge                   a payload, file or archive exceeds a limit
    ├── RuntimeMissing             an artifact is not built or fetched yet (names the fix)
    ├── IntegrityError             a digest did not match; the artifact is not used
    ├── HostToolMissing            a host program is missing (names the Debian package)
    ├── ToolFailed                 a host program exited non-zero (carries its stderr tail)
    ├── BuildError                 an artifact build could not finish
    ├── VMError                    a VM could not be created, booted or controlled
    │   └── BootTimeout            a guest never became ready (carries the console tail)
    ├── AgentUnavailable           the guest agent link dropped (VM or agent died)
    ├── ProtocolViolation          the guest agent broke the protocol (damaged or
    │                              unasked-for data, a bad answer): its call fails
    ├── GuestError                 the guest agent refused a call (carries its code)
    ├── OperationTimeout           an operation ran past its deadline
    ├── NetworkUnavailable         the host cannot give a guest the network asked for
    │                              (no TUN device, no nftables, no rights; names the fix)
    ├── RegistryError              an OCI registry refused a request or sent something
    │   │                          unusable (names the registry and the fix)
    │   └── RegistryUnreachable    no connection to the registry at all
    ├── ModelServerError           a model server (Ollama, for `pyro demo ollama`) is
    │                              unreachable, refused a request or answered unusably
    ├── NodeLost                   the cluster node that held a workspace or ran a call
    │                              is gone (names the node): what it held is lost
    └── Cancelled                  the caller gave up; what the call ran was stopped

Lower-level errors (OSError, subprocess failures) are translated at the boundary with
``raise ... from exc`` so the message a user sees says what to do next.
"""

from __future__ import annotations


class PyroError(Exception):
    """Base of every error pyro raises on purpose."""

    code = "pyro_error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message

    def to_dict(self) -> dict[str, str]:
        data = {"error": self.code, "message": self.message}
        if self.hint:
            data["hint"] = self.hint
        return data


class InvalidArgument(PyroError):
    code = "invalid_argument"


class NotFound(PyroError):
    code = "not_found"


class Expired(NotFound):
    """The workspace or VM named outlived its TTL: it was (or is now being) deleted, so
    the operation is refused. A ``NotFound``: nothing of it can be used any more."""

    code = "expired"


class InvalidState(PyroError):
    code = "invalid_state"


class Conflict(PyroError):
    code = "conflict"


class OutsideRoot(PyroError):
    code = "outside_root"


class TooLarge(PyroError):
    code = "too_large"


class RuntimeMissing(PyroError):
    code = "runtime_missing"


class IntegrityError(PyroError):
    code = "integrity_error"


class HostToolMissing(PyroError):
    code = "host_tool_missing"


class ToolFailed(PyroError):
    code = "tool_failed"

    def __init__(self, message: str, *, hint: str | None = None, stderr_tail: str = "") -> None:
        super().__init__(message, hint=hint)
        self.stderr_tail = stderr_tail

    def __str__(self) -> str:
        text = super().__str__()
        if self.stderr_tail:
            text += "\n--- stderr (tail) ---\n" + self.stderr_tail
        return text


class BuildError(PyroError):
    code = "build_error"


class RegistryError(PyroError):
    """An OCI registry refused a request or answered something pyro cannot use."""

    code = "registry_error"


class RegistryUnreachable(RegistryError):
    """No connection to the registry (refused, no route, name not resolved)."""

    code = "registry_unreachable"


class ModelServerError(PyroError):
    """A model server (Ollama's chat API) is unreachable, refused a request, or answered
    something pyro cannot use (names the server and the fix)."""

    code = "model_server_error"


class VMError(PyroError):
    code = "vm_error"

    def __init__(self, message: str, *, hint: str | None = None, console_tail: str = "") -> None:
        super().__init__(message, hint=hint)
        self.console_tail = console_tail

    def __str__(self) -> str:
        text = super().__str__()
        if self.console_tail:
            text += "\n--- serial console (tail) ---\n" + self.console_tail
        return text

    def to_dict(self) -> dict[str, str]:
        data = super().to_dict()
        if self.console_tail:
            data["console_tail"] = self.console_tail
        return data


class BootTimeout(VMError):
    code = "boot_timeout"


class AgentUnavailable(PyroError):
    code = "agent_unavailable"


class ProtocolViolation(PyroError):
    code = "protocol_violation"


class GuestError(PyroError):
    code = "guest_error"

    def __init__(self, message: str, *, guest_code: str = "error", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.guest_code = guest_code

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "guest_code": self.guest_code}


class OperationTimeout(PyroError):
    code = "timeout"


class Cancelled(PyroError):
    """The caller gave up (an MCP cancellation, a closed session, a signal): what the
    operation ran was stopped (the guest command killed, a one-shot VM discarded)."""

    code = "cancelled"


class NodeLost(PyroError):
    """The cluster node that owns a workspace or VM (or ran a call) is gone: what it held
    is lost, never silently recreated elsewhere. Carries the node's name."""

    code = "node_lost"

    def __init__(self, message: str, *, node: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.node = node

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "node": self.node}


class NetworkUnavailable(PyroError):
    """The host cannot give a guest the network asked for (no TUN device, nftables
    missing, no rights to configure them): nothing of the VM's link is left behind."""

    code = "network_unavailable"
