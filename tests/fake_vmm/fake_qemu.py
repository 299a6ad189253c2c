"""A stand-in for QEMU in the unit tests: pyro's real QEMU argv, a real guest agent.

Started with the command line ``vmm/qemu/vm.py`` builds, it listens on every agent port's
Unix socket (``-chardev socket,id=agentN,path=...,server=on``) and on the QMP socket, and
serves pyro's real guest agent (host-safe, as ``fake_firecracker.py`` does; its state in
``<run dir>/vmm/agent-run``) on each connection to an agent port; it exits when the agent
is asked to shut down. When
``PYRO_FAKE_VMM_LOG`` is set, it appends ``qemu <pid> <vm id>`` to that file.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

from fake_firecracker import host_safe_agent


def _options(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def _socket_path(spec: str) -> str | None:
    fields = dict(item.partition("=")[::2] for item in spec.split(",")[1:])
    return fields.get("path")


def _serve(path: str, agent: bool) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    while True:
        conn, _ = listener.accept()
        if agent:
            threading.Thread(target=_agent, args=(conn,), daemon=True).start()
        else:
            conn.close()  # QMP: nothing here needs it


def _agent(conn: socket.socket) -> None:
    with conn:
        host_safe_agent()(conn.fileno(), poweroff=lambda: os._exit(0)).serve()


def main(argv: list[str]) -> int:
    src = os.environ.get("PYRO_FAKE_VMM_SRC")
    if src:
        sys.path.insert(0, src)
    name = next(iter(_options(argv, "-name")), "pyro-?")
    record = os.environ.get("PYRO_FAKE_VMM_LOG")
    if record:
        with open(record, "a") as handle:
            handle.write(f"qemu {os.getpid()} {name.removeprefix('pyro-')}\n")
    qmp = next(iter(_options(argv, "-qmp")), "")
    qmp_path = qmp.removeprefix("unix:").split(",")[0]
    # The agent's state in the VM's own directory (where QEMU makes its sockets).
    os.environ["PYRO_AGENT_RUN_DIR"] = os.path.join(os.path.dirname(qmp_path), "agent-run")
    sockets = [(qmp_path, False)] if qmp else []
    for chardev in _options(argv, "-chardev"):
        if chardev.startswith("socket,id=agent"):
            sockets.append((_socket_path(chardev) or "", True))
    for path, agent in sockets:
        threading.Thread(target=_serve, args=(path, agent), daemon=True).start()
    sys.stdout.write("fake qemu: guest running\n")
    sys.stdout.flush()
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
