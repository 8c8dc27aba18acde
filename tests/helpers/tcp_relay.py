"""A TCP relay whose outbound connections leave from a source address the test chooses.

To the service, the relay is the client: the peer it reports must be one of the
relay's outbound socket addresses, which the test knows exactly.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from contextlib import contextmanager


@contextmanager
def relay(target: str, source_host: str):
    """Yields (listen "host:port", the list of "host:port" the relay connected from)."""
    host, port = target.rsplit(":", 1)
    outbound: list[str] = []
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict = {}

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    pipes: set[asyncio.Task] = set()

    async def on_client(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((source_host, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, int(port)))
        outbound.append("%s:%d" % sock.getsockname())
        server_reader, server_writer = await asyncio.open_connection(sock=sock)
        for task in (pipe(client_reader, server_writer), pipe(server_reader, client_writer)):
            pipes.add(loop.create_task(task))

    async def serve() -> None:
        server = await asyncio.start_server(on_client, "127.0.0.1", 0)
        state["address"] = "127.0.0.1:%d" % server.sockets[0].getsockname()[1]
        state["stop"] = asyncio.Event()
        ready.set()
        await state["stop"].wait()
        server.close()
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield state["address"], outbound
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(timeout=10)
        loop.close()
