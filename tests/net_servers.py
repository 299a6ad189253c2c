"""Test servers for the private network of the guest networking tests (stdlib only).

``net_servers.py http ADDRESS PORT NAME``: answers every request with ``hello from NAME``.
``net_servers.py dns ADDRESS PORT NAME=IP...``: an authoritative DNS server (UDP and TCP)
for those names (A records, TTL 60; anything else NXDOMAIN).
Each prints ``ready`` once it listens.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve_http(address: str, port: int, name: str) -> None:
    body = f"hello from {name}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer((address, port), Handler)
    print("ready", flush=True)
    server.serve_forever()


def _name(data: bytes, at: int) -> tuple[str, int]:
    labels = []
    while data[at]:
        length = data[at]
        labels.append(data[at + 1 : at + 1 + length].decode().lower())
        at += 1 + length
    return ".".join(labels), at + 1


def answer(query: bytes, zone: dict[str, str]) -> bytes:
    ident, _flags, _count = struct.unpack("!HHH", query[:6])
    name, end = _name(query, 12)
    qtype, _qclass = struct.unpack("!HH", query[end : end + 4])
    question = query[12 : end + 4]
    address = zone.get(name)
    if address is None:
        return struct.pack("!HHHHHH", ident, 0x8183, 1, 0, 0, 0) + question
    if qtype != 1:
        return struct.pack("!HHHHHH", ident, 0x8180, 1, 0, 0, 0) + question
    record = struct.pack("!HHHLH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(address)
    return struct.pack("!HHHHHH", ident, 0x8180, 1, 1, 0, 0) + question + record


def serve_dns(address: str, port: int, zone: dict[str, str]) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((address, port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((address, port))
    tcp.listen(8)

    def tcp_loop() -> None:
        while True:
            conn, _ = tcp.accept()
            with conn:
                size = struct.unpack("!H", conn.recv(2))[0]
                reply = answer(conn.recv(size), zone)
                conn.sendall(struct.pack("!H", len(reply)) + reply)

    threading.Thread(target=tcp_loop, daemon=True).start()
    print("ready", flush=True)
    while True:
        query, peer = udp.recvfrom(4096)
        udp.sendto(answer(query, zone), peer)


def main() -> None:
    kind, address, port, *rest = sys.argv[1:]
    if kind == "http":
        serve_http(address, int(port), rest[0])
    else:
        serve_dns(address, int(port), dict(item.split("=", 1) for item in rest))


if __name__ == "__main__":
    main()
