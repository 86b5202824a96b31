"""A Link over real TCP on 127.0.0.1 for the plumbing tests: the accepted side, past its handshake, and
the raw socket of its peer (which reads only if the test makes it)."""

from __future__ import annotations

import asyncio
import socket

from standby.plumbing.link import Link
from standby.proto.connection import Connection, Role
from tests.proto.test_connection import handshake


async def tcp_link(peer_rcvbuf: int | None = None) -> tuple[Link, socket.socket, asyncio.Server]:
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future())

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.set_result((r, w))

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    peer = socket.create_connection(("127.0.0.1", server.sockets[0].getsockname()[1]))
    if peer_rcvbuf is not None:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, peer_rcvbuf)
    reader, writer = await asyncio.wait_for(accepted, 5)
    conn = handshake(Connection(Role.CLIENT), Connection(Role.SERVER))[1]
    return Link(reader, writer, conn, "peer"), peer, server


def close(link: Link, peer: socket.socket, server: asyncio.Server) -> None:
    link.writer.transport.abort()
    peer.close()
    server.close()
