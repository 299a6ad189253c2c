"""A guest agent that lies: the test double of a hostile guest.

Root in a guest can replace pyro's agent; this module is what the tests replace it with
(``install`` in tests/guest/hostile.py copies it over the agent inside a real guest; the
unit tests serve it in-process over a socketpair). It is the real agent, except where the
current *mode* says to misbehave. The host sets the mode with the extra operation
``hostile_mode`` {mode, ...options}; every other call sees the mode of the moment:

``honest``         behave (the default)
``flood_exec``     exec answers with endless stdout, far past any output cap
``flood_file``     get_file sends ``flood_bytes`` whatever ``max_bytes`` asked for
``slow_clock``     exec keeps its timeout ``factor`` times late (a guest clock running slow)
``stall``          answer nothing more (no result, no keepalive) after this call
``tear``           the next result is sent as half a frame, then the rest of the traffic
``lie_digest``     tree_manifest claims ``digest`` for the file ``path``
``lie_entry``      tree_manifest sets ``field`` to ``value`` in every entry it sends
``lie_exec``       exec answers with its honest result updated by ``value`` (a dict)
``flood_manifest`` tree_manifest streams entries without end
``huge_size``      get_file (sparse) claims to have covered ``size`` bytes
``bad_offsets``    get_file (sparse) sends its chunks with offsets going backwards
``stall_stop_all`` service_stop_all never answers (a service that will not stop)
``bomb_archive``   archive_get sends a small gzip tar whose pax header declares 1 GiB

Stdlib and pyro's own protocol only: the same file runs inside a guest.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from typing import Any

try:  # inside a guest the real agent was moved aside to real_agent
    from pyro_mcp.guest_agent import real_agent as base  # type: ignore[attr-defined]
except ImportError:
    from pyro_mcp.guest_agent import agent as base

from pyro_mcp.guest import protocol as p
from pyro_mcp.guest_agent.calls import Call

_mode: dict[str, Any] = {"mode": "honest"}
_mode_lock = threading.Lock()


def reset_mode() -> None:
    with _mode_lock:
        _mode.clear()
        _mode["mode"] = "honest"


def mode() -> dict[str, Any]:
    with _mode_lock:
        return dict(_mode)


def _set_mode(call: Call) -> tuple[dict[str, Any], bytes]:
    with _mode_lock:
        _mode.clear()
        _mode.update({"mode": "honest", **call.args})
    return {"mode": _mode["mode"]}, b""


def _data(call: Call, stream: str, payload: bytes, **header: Any) -> None:
    call.send(p.Frame(p.DATA, call.id, {"stream": stream, **header}, payload))


def _rewrite_manifest(
    call: Call, honest: Any, change: Callable[[dict[str, Any]], None]
) -> tuple[dict[str, Any], bytes]:
    """Run the honest tree_manifest with ``change`` applied to each entry it sends."""
    real_send = call.send

    def rewrite(frame: p.Frame) -> None:
        if frame.t == p.DATA and frame.header.get("stream") == "manifest":
            lines = []
            for line in frame.payload.split(b"\n"):
                if line:
                    item = json.loads(line)
                    change(item)
                    line = json.dumps(item, separators=(",", ":")).encode()
                lines.append(line)
            frame = p.Frame(frame.t, frame.id, frame.header, b"\n".join(lines))
        real_send(frame)

    call.send = rewrite  # type: ignore[method-assign]
    return honest(call)  # type: ignore[no-any-return]


class HostileAgent(base.Agent):  # type: ignore[name-defined,misc]
    """The real agent with its lies switched by ``hostile_mode``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handlers["hostile_mode"] = _set_mode
        honest = dict(self.handlers)

        def pick(op: str) -> Any:
            def handler(call: Call) -> tuple[dict[str, Any], bytes]:
                lie = getattr(self, f"_{mode()['mode']}_{op}", None)
                return lie(call, honest[op]) if lie is not None else honest[op](call)

            return handler

        for op in ("exec", "get_file", "tree_manifest", "service_stop_all", "archive_get"):
            self.handlers[op] = pick(op)

    # -- stalls and tears act on the channel itself ------------------------------------
    def _dispatch(self, frame: p.Frame) -> None:
        stalled = mode()["mode"] == "stall" and frame.t == p.CALL
        if stalled and frame.header.get("op") not in ("hello", "hostile_mode"):
            return  # swallowed: no answer, and no keepalive either
        super()._dispatch(frame)

    def _beat(self) -> None:
        while not self._done.wait(base.BEAT_S):
            if mode()["mode"] == "stall":
                continue
            for call in self._running():
                try:
                    call.send(p.Frame(p.DATA, call.id, {"stream": p.BEAT}))
                except OSError:
                    return

    def _run(self, call: Call) -> None:
        if mode()["mode"] == "tear" and call.op not in ("hostile_mode", "hello"):
            with _mode_lock:
                _mode["mode"] = "honest"  # one torn frame, then honest again
            answer = self._answer(call)
            if call.session is not None:
                answer.header["s"] = call.session
            # The answer with a payload, cut off in the middle: as if the agent died
            # mid-write. What it sends next must still get through.
            torn = p.Frame(answer.t, answer.id, answer.header, bytes(4096)).encode()
            self._write_raw(torn[: len(torn) // 2])
            with self._calls_lock:
                self._calls.pop(call.id, None)
            return
        super()._run(call)

    def _write_raw(self, data: bytes) -> None:
        with self._write_lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self.write_fd, view) :]

    # -- lies per operation ------------------------------------------------------------
    def _flood_exec_exec(self, call: Call, honest: Any) -> tuple[dict[str, Any], bytes]:
        chunk = b"x" * p.CHUNK
        sent = 0
        while not call.cancelled.is_set() and sent < (4 << 30):
            _data(call, "stdout", chunk)
            sent += len(chunk)
        return {"exit_code": 0, "stdout_truncated": False, "stdout_bytes": sent}, b""

    def _slow_clock_exec(self, call: Call, honest: Any) -> tuple[dict[str, Any], bytes]:
        # A guest whose clock runs slow keeps a command's timeout late by the host's clock.
        timeout = call.args.get("timeout_s")
        if isinstance(timeout, (int, float)):
            call.args["timeout_s"] = timeout * float(mode().get("factor", 100))
        return honest(call)  # type: ignore[no-any-return]

    def _flood_file_get_file(self, call: Call, honest: Any) -> tuple[dict[str, Any], bytes]:
        total = int(mode().get("flood_bytes", 128 << 20))
        chunk = b"y" * p.CHUNK
        sent = 0
        sparse = bool(call.args.get("sparse"))
        while sent < total and not call.cancelled.is_set():
            if sparse:
                _data(call, "file", chunk, offset=sent)
            else:
                _data(call, "file", chunk)
            sent += len(chunk)
        return {"size": 10, "sent": 10, "truncated": False, "mode": 0o644}, b""

    def _huge_size_get_file(self, call: Call, honest: Any) -> tuple[dict[str, Any], bytes]:
        size = int(mode().get("size", 1 << 60))
        _data(call, "file", b"z" * 100, offset=0)
        return {"size": size, "sent": size, "truncated": False, "mode": 0o644}, b""

    def _bad_offsets_get_file(self, call: Call, honest: Any) -> tuple[dict[str, Any], bytes]:
        _data(call, "file", b"a" * 100, offset=1000)
        _data(call, "file", b"b" * 100, offset=0)
        return {"size": 1100, "sent": 1100, "truncated": False, "mode": 0o644}, b""

    def _lie_digest_tree_manifest(self, call: Call, honest: Any) -> tuple[dict[str, Any], bytes]:
        options = mode()

        def change(item: dict[str, Any]) -> None:
            if item.get("path") == options.get("path") and item.get("type") == "file":
                item["sha256"] = options.get("digest")

        return _rewrite_manifest(call, honest, change)

    def _lie_entry_tree_manifest(self, call: Call, honest: Any) -> tuple[dict[str, Any], bytes]:
        options = mode()

        def change(item: dict[str, Any]) -> None:
            item[options["field"]] = options["value"]

        return _rewrite_manifest(call, honest, change)

    def _lie_exec_exec(self, call: Call, honest: Any) -> tuple[dict[str, Any], bytes]:
        value, payload = honest(call)
        return {**value, **mode()["value"]}, payload

    def _flood_manifest_tree_manifest(
        self, call: Call, honest: Any
    ) -> tuple[dict[str, Any], bytes]:
        line = b'{"path":"f%012d","type":"dir","mode":493,"size":0}\n'
        index = 0
        while not call.cancelled.is_set():
            _data(call, "manifest", b"".join(line % n for n in range(index, index + 4000)))
            index += 4000
        return {"entries": index}, b""

    def _bomb_archive_archive_get(self, call: Call, honest: Any) -> tuple[dict[str, Any], bytes]:
        import zlib

        # A ustar header of type "x" (pax) declaring 1 GiB of extended header, then zeros:
        # compresses to about a megabyte, and a careless reader allocates the gigabyte.
        declared = 1 << 30
        header = bytearray(512)
        header[0:9] = b"PaxHeader"
        header[100:108] = b"0000644\0"
        header[124:136] = f"{declared:011o}\0".encode()
        header[136:148] = b"00000000000\0"
        header[156:157] = b"x"
        header[257:263] = b"ustar\0"
        header[263:265] = b"00"
        header[148:156] = b" " * 8
        header[148:156] = f"{sum(header):06o}\0 ".encode()
        packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        _data(call, "tar", packer.compress(bytes(header)))
        zeros = bytes(1 << 20)
        for _ in range(declared >> 20):
            if call.cancelled.is_set():
                break
            piece = packer.compress(zeros)
            if piece:
                _data(call, "tar", piece)
        _data(call, "tar", packer.flush())
        return {"type": "dir", "mode": 0o755, "files": 0, "bytes": declared}, b""

    def _stall_stop_all_service_stop_all(
        self, call: Call, honest: Any
    ) -> tuple[dict[str, Any], bytes]:
        call.cancelled.wait(3600)
        return {"stopped": []}, b""


def main() -> None:
    base.Agent = HostileAgent
    base.main()


if __name__ == "__main__":
    main()
