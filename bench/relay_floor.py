#!/usr/bin/env python3
"""The floor of a Python relay: what any asyncio gate pays for the bytes alone.

A transparent TCP proxy on uvloop's protocols (callbacks, no coroutines): each client
connection gets its own backend connection, and bytes go across as they arrive, both
ways. No SMTP parsing, no policy, no pooling, no logging or metrics. bench/throughput.py
runs it as the target "Python relay floor" (--targets key floor) beside Portcullis, so
the distance between the two is the cost of what the gate does, and the distance from
the floor to Postfix is what Python itself allows on the machine.

Usage: bench/relay_floor.py LISTEN_PORT BACKEND_PORT [--processes N]
(binds 127.0.0.1; N processes, default one per CPU, share the socket as prefork servers)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

HOST = "127.0.0.1"


class BackendSide(asyncio.Protocol):
    def __init__(self, client: ClientSide):
        self.client = client

    def data_received(self, data: bytes) -> None:
        if not self.client.transport.is_closing():
            self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class ClientSide(asyncio.Protocol):
    def __init__(self, backend_port: int):
        self.backend_port = backend_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.backend: asyncio.Transport | None = None
        self.early: list[bytes] = []  # what the client sent before the backend answered
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            self.backend, _ = await asyncio.get_running_loop().create_connection(
                lambda: BackendSide(self), HOST, self.backend_port)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():  # the client left meanwhile
            self.backend.close()
            return
        self.backend.write(b"".join(self.early))

    def data_received(self, data: bytes) -> None:
        if self.backend is None:
            self.early.append(data)
        elif not self.backend.is_closing():
            self.backend.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.backend is not None:
            self.backend.close()


async def serve(listener: socket.socket, backend_port: int) -> None:
    server = await asyncio.get_running_loop().create_server(
        lambda: ClientSide(backend_port), sock=listener)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("listen_port", type=int)
    parser.add_argument("backend_port", type=int)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    listener = socket.create_server((HOST, args.listen_port), backlog=4096)
    for _ in range(args.processes - 1):
        if os.fork() == 0:
            break
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # as the gate runs
    except ImportError:
        pass
    asyncio.run(serve(listener, args.backend_port))


if __name__ == "__main__":
    main()
