"""Two `Link`s joined in memory (no sockets, no TLS), past the HELLO/WELCOME exchange, to drive a process
server session as its peer would — the way h11's tests join two connections by a fake link."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from standby.plumbing.link import Link
from standby.proto.connection import Connection, Role
from tests.proto.test_connection import handshake


class MemoryWriter:
    """The writing half of an in-memory stream: what is written arrives at the peer's StreamReader."""

    def __init__(self, peer: asyncio.StreamReader) -> None:
        self.peer = peer
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no socket, no TLS: no peer certificate

    def write(self, data: bytes | bytearray) -> None:
        if self.closing:
            raise ConnectionResetError("closed")
        self.peer.feed_data(bytes(data))

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.peer.feed_eof()

    async def wait_closed(self) -> None:
        pass


def link_pair(client_role: str) -> tuple[Link, Link]:
    """(client, server): the peer of role `client_role` and the process server's side ("ps"), each
    validating replies to its own requests as the daemons do."""
    client_conn, server_conn = handshake(Connection(Role.CLIENT), Connection(Role.SERVER))
    to_client, to_server = asyncio.StreamReader(), asyncio.StreamReader()
    client = Link(to_client, cast(asyncio.StreamWriter, MemoryWriter(to_server)), client_conn, "process server")
    server = Link(to_server, cast(asyncio.StreamWriter, MemoryWriter(to_client)), server_conn, client_role)
    client.role, server.role = client_role, "ps"
    return client, server
