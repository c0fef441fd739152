"""MQTT over WebSocket for the embedded broker: the handshake, then the same door as TCP.

What browsers and Watson's SDK (``transport: websockets``) speak: an HTTP/1.1 upgrade on path
``/mqtt`` with subprotocol ``mqtt``, then MQTT packets in binary WebSocket messages (MQTT
3.1.1 section 6; MQTT 5 section 6). The WebSocket protocol itself — handshake, framing, masking,
ping, close — is the ``websockets`` package's Sans-I/O :class:`~websockets.server.ServerProtocol`,
driven here over the connection's own asyncio streams. :func:`open_websocket` returns a reader
and a writer shaped like asyncio's, so :class:`~iotvault.broker.embedded.EmbeddedBroker` serves
the connection exactly as a TCP one: the same limits, CONNECT, authentication, framing of MQTT
packets (a packet may span messages, a message may hold several packets) and codec.

Refused: any other path (404), no ``mqtt`` subprotocol offered (400), a malformed request, a
text message or a message over ``max_size`` (the connection is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

__all__ = ["PATH", "SUBPROTOCOL", "open_websocket"]

_log = logging.getLogger(__name__)

PATH: Final = "/mqtt"
SUBPROTOCOL: Final = Subprotocol("mqtt")
_READ_CHUNK: Final = 64 * 1024


async def open_websocket(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, max_size: int
) -> tuple[_WebSocketReader, _WebSocketWriter] | None:
    """Complete the opening handshake; the MQTT byte streams inside it, or None if refused.

    The caller bounds the time this takes (the broker's connect timeout).
    """
    protocol = ServerProtocol(subprotocols=[SUBPROTOCOL], max_size=max_size, logger=_log)
    while True:
        data = await reader.read(_READ_CHUNK)
        if not data:
            return None
        protocol.receive_data(data)
        if protocol.handshake_exc is not None:
            return None  # not an HTTP request; the transport is closed by the caller
        events = protocol.events_received()
        if events:
            break
    request = events[0]
    assert isinstance(request, Request)  # noqa: S101 -- the first event of a server is its request
    response = _answer(protocol, request)
    protocol.send_response(response)
    _flush(protocol, writer)
    if response.status_code != 101:
        await writer.drain()
        return None
    inner = _WebSocketReader(protocol, reader, writer)
    inner.take(events[1:])  # frames that came with the request
    return inner, _WebSocketWriter(protocol, writer)


def _answer(protocol: ServerProtocol, request: Request) -> Response:
    if request.path.split("?", 1)[0] != PATH:
        return protocol.reject(404, f"MQTT over WebSocket is served on {PATH}\n")
    response = protocol.accept(request)
    if response.status_code == 101 and response.headers.get("Sec-WebSocket-Protocol") != SUBPROTOCOL:
        # accept() lets a client that offered no subprotocol in; MQTT requires "mqtt"
        return Response(
            400, "Bad Request", Headers([("Connection", "close")]), b"subprotocol mqtt required\n"
        )
    return response


def _flush(protocol: ServerProtocol, writer: asyncio.StreamWriter) -> bool:
    """Send what the protocol has to send; False once it asked for the connection to end."""
    for chunk in protocol.data_to_send():
        if chunk:
            writer.write(chunk)
        else:  # end of stream: the protocol is done with this connection
            with contextlib.suppress(OSError):
                writer.transport.close()
            return False
    return True


class _WebSocketReader:
    """What the broker uses of an :class:`asyncio.StreamReader`: the data of binary messages.

    Reads the socket only when asked, so a connection that is not read (back-pressure) is not
    buffered without bound; pings and closes are answered as they are read.
    """

    def __init__(
        self, protocol: ServerProtocol, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._protocol = protocol
        self._reader = reader
        self._writer = writer
        self._data = bytearray()
        self._ended = False
        self._text = False  # the message being continued is a text message

    def take(self, events: list[Any]) -> None:
        for event in events:
            if not isinstance(event, Frame) or event.opcode not in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                continue  # ping, pong and close are the protocol's
            if event.opcode is not Opcode.CONT:
                self._text = event.opcode is Opcode.TEXT
            if self._text:
                self._protocol.fail(1003, "MQTT is sent in binary messages")  # [MQTT-6.0.0-1]
                self._ended = True
                break
            self._data += event.data
        if not _flush(self._protocol, self._writer) or self._protocol.state is State.CLOSED:
            self._ended = True

    async def read(self, n: int = -1) -> bytes:
        while not self._data and not self._ended:
            try:
                data = await self._reader.read(_READ_CHUNK)
            except OSError:
                data = b""
            if not data:
                self._protocol.receive_eof()
                self._ended = True
                break
            self._protocol.receive_data(data)
            self.take(self._protocol.events_received())
        size = len(self._data) if n < 0 else min(n, len(self._data))
        out = bytes(self._data[:size])
        del self._data[:size]
        return out


class _WebSocketTransport:
    """What :class:`~iotvault.broker.framing.GatheringWriter` uses of a transport, for WebSocket."""

    def __init__(self, protocol: ServerProtocol, writer: asyncio.StreamWriter) -> None:
        self._protocol = protocol
        self._writer = writer

    def write(self, data: bytes) -> None:
        if self.is_closing():
            return
        self._protocol.send_binary(data)
        _flush(self._protocol, self._writer)

    def is_closing(self) -> bool:
        return self._writer.transport.is_closing() or self._protocol.state is not State.OPEN

    def close(self) -> None:
        if self._protocol.state is State.OPEN:
            self._protocol.send_close(1000)
            _flush(self._protocol, self._writer)
        self._writer.transport.close()

    def abort(self) -> None:
        self._writer.transport.abort()


class _WebSocketWriter:
    """What the broker uses of an :class:`asyncio.StreamWriter`, for a WebSocket connection."""

    def __init__(self, protocol: ServerProtocol, writer: asyncio.StreamWriter) -> None:
        self.transport = _WebSocketTransport(protocol, writer)
        self._writer = writer

    async def drain(self) -> None:
        await self._writer.drain()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._writer.get_extra_info(name, default)
