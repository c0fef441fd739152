"""One connection's bytes: whole, validated packets in; gathered writes out. Pure asyncio.

:class:`PacketStream` reads the socket in chunks and cuts it into packets by their fixed
headers. A header that announces more than the maximum packet size ends the connection before
its body is read; a packet that :func:`iotvault.broker.codec.decode` refuses ends it before the
protocol layer sees any of it. The protocol layer (amqtt) then reads its bytes with
:meth:`PacketStream.read`, which serves *one packet at a time*: a read that would run past the
end of the current packet is a desynchronised parser and ends the connection too, so a packet
can never be parsed from its middle.

:class:`GatheringWriter` sends what one turn of the event loop wrote in one ``send()`` (the
PUBACKs of a committed batch), and closes the *transport itself*: a writer that drains before
closing raises on a peer that has gone and leaves the socket to the garbage collector (a
descriptor leak, one per client that sends CONNECT and closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any, Final

from iotvault.broker.codec import (
    PUBCOMP,
    PUBREL,
    MalformedPacketError,
    Packet,
    PacketIdOnly,
    Publish,
    decode,
    fixed_header_size,
)
from iotvault.broker.codec5 import Ack5, Disconnect5, encode5
from iotvault.broker.mqtt5 import DISCONNECT_WITH_WILL, V5Session, reason_for
from iotvault.broker.watson import DeviceTopics

__all__ = ["GatheringWriter", "PacketStream", "PacketTooLargeError", "addr", "host", "keep_alive", "settle"]

_log = logging.getLogger(__name__)

_PACKET_ID_NOT_FOUND: Final = 0x92

_READ_CHUNK: Final = 64 * 1024  # bytes asked of the socket at once
_FLUSH_AT: Final = 64 * 1024  # bytes the writer gathers before a drain sends them at once


class PacketTooLargeError(MalformedPacketError):
    """A fixed header announced more than the broker's maximum packet size."""

    def __init__(self, size: int, limit: int, *, at_least: bool = False) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"packet of {'at least ' if at_least else ''}{size} bytes is over the limit of {limit}"
        )


class GatheringWriter:
    """Writes of one turn of the loop go out in one ``send()``; nothing after :meth:`abort`."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.stream = writer
        self.transport = writer.transport
        self._loop = asyncio.get_running_loop()
        self._chunks: list[bytes] = []
        self._size = 0
        self.is_closed = False
        self.translate: Callable[[bytes], bytes] | None = None  # MQTT 5: what amqtt writes, re-encoded

    def write(self, data: bytes) -> None:
        if self.is_closed:
            return
        if not self._chunks:
            self._loop.call_soon(self.flush)
        self._chunks.append(data)
        self._size += len(data)

    def flush(self) -> None:
        if not self._chunks:
            return
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if self.translate is not None:
            data = self.translate(data)
        if not self.transport.is_closing():  # aborted: a write would only count lost calls
            self.transport.write(data)

    async def drain(self) -> None:
        if self._size >= _FLUSH_AT:
            self.flush()
        if not self.is_closed:
            await self.stream.drain()  # back-pressure (and a lost connection) as StreamWriter has them

    def close(self) -> None:
        """Send what waits, then close the transport; never raises, never waits."""
        if self.is_closed:
            return
        self.flush()
        self.is_closed = True
        self.transport.close()

    def abort(self) -> None:
        """Send what waits (acknowledgements of stored messages), then drop the connection."""
        self.flush()
        self.is_closed = True
        self.transport.abort()


class PacketStream:
    """The client's byte stream as whole, validated packets; see the module docstring.

    ``on_violation(reason)`` is told once when the connection ends because of what the client
    sent (malformed or oversized packet, a desynchronised parser); ``on_eof`` once when the
    protocol layer is first told the stream has ended (see the amqtt adapter).
    """

    def __init__(
        self,
        stream: asyncio.StreamReader,
        writer: GatheringWriter,
        max_packet_size: int,
        peer: object,
        *,
        max_inflight: int = 64,
    ) -> None:
        self._stream = stream
        self.writer = writer
        self._loop = asyncio.get_running_loop()
        self._max_packet_size = max_packet_size
        self.peer = peer
        self._buf = bytearray()  # read from the socket, not yet cut into packets
        self._current = b""  # the packet the protocol layer is reading
        self._pos = 0
        self._refused = False
        self.client_id = ""
        self.v5: V5Session | None = None  # an MQTT 5 client: packets translated for amqtt
        self.topics: DeviceTopics | None = None  # a Watson device: its relative topics mapped
        self.on_violation: Callable[[str], None] | None = None
        self.on_eof: Callable[[], None] | None = None
        self._eof_told = False
        self.task: asyncio.Future[object] | None = None  # the connection's task
        self._heard = 0.0
        self._silence_limit = 0.0
        self._silence_timer: asyncio.TimerHandle | None = None
        self._max_inflight = max_inflight
        self._inflight = 0
        self._room = asyncio.Event()
        self._room.set()
        self._refused_qos2: set[int] = set()  # MQTT 5: packet ids of QoS 2 PUBLISHes refused

    # ---- back-pressure ---------------------------------------------------------------------

    def hold(self) -> None:
        """A QoS 1/2 PUBLISH was read; past ``max_inflight`` unreleased ones the stream is not read."""
        self._inflight += 1
        if self._inflight >= self._max_inflight:
            self._room.clear()

    def release(self) -> None:
        self._inflight -= 1
        if self._inflight < self._max_inflight:
            self._room.set()

    # ---- packets ---------------------------------------------------------------------------

    async def next_packet(self) -> tuple[bytes, Packet] | None:
        """The next whole packet and what it decodes to; None at the end of the stream.

        Raises :class:`MalformedPacketError` (or :class:`PacketTooLargeError`); the caller ends the
        connection. A stream that ends inside a packet ends at the last whole one.
        """
        buf = self._buf
        while True:
            if len(buf) >= 2:
                size = fixed_header_size(bytes(buf[:5]))
                if size is None:
                    self._check_size(len(buf) + 128 ** (len(buf) - 1), at_least=True)
                if size is not None:
                    total = size[0] + size[1]
                    self._check_size(total)
                    if len(buf) >= total:
                        raw = bytes(buf[:total])
                        del buf[:total]
                        got = self.v5.inbound(raw) if self.v5 is not None else (raw, decode(raw))
                        return self.topics.inbound(*got) if self.topics is not None else got
            try:
                more = await self._stream.read(_READ_CHUNK)
            except OSError:  # reset by the peer: the same as its end, for what follows
                more = b""
            if not more:
                return None
            self._heard = self._loop.time()
            buf += more

    def _check_size(self, size: int, *, at_least: bool = False) -> None:
        if size > self._max_packet_size:
            raise PacketTooLargeError(size, self._max_packet_size, at_least=at_least)

    def serve(self, packet: bytes) -> None:
        """Make ``packet`` (read by :meth:`next_packet`) the one the protocol layer reads next."""
        self._current, self._pos = packet, 0

    async def read(self, n: int = -1) -> bytes:
        """Up to the rest of the current packet for the protocol layer; b"" once the stream ends."""
        if self._refused:
            return self._eof()
        left = len(self._current) - self._pos
        if left == 0:
            if not self._room.is_set():
                await self._room.wait()
                if self.closed:  # dropped while waiting
                    return self._eof()
            got = await self._next_for_protocol()
            if got is None:
                return self._eof()
            if isinstance(got[1], Publish) and got[1].qos:
                self.hold()  # released by the broker once the message is stored or refused
            self._current, self._pos, left = got[0], 0, len(got[0])
        if n < 0:
            n = left
        if n > left:
            self.violation("protocol layer out of step with the packet boundaries")
            return self._eof()
        pos = self._pos
        self._pos = pos + n
        return self._current[pos : pos + n]

    async def _next_for_protocol(self) -> tuple[bytes, Packet] | None:
        """The next packet for the protocol layer; None once the stream ends or was refused."""
        while True:
            try:
                got = await self.next_packet()
            except MalformedPacketError as exc:
                if reason_for(exc) == DISCONNECT_WITH_WILL:
                    self.abort()  # the stream's end, not a DISCONNECT, makes amqtt send the will
                else:
                    self.violation(exc.reason, reason_for(exc))
                return None
            if got is None or self._refused:
                return None
            if not self._answered_here(got[1]):
                return got

    def refused_qos2(self, packet_id: int) -> None:
        """An MQTT 5 QoS 2 PUBLISH was refused with a PUBREC reason code, which ends its flow.

        A client that sends its PUBREL anyway (paho-mqtt does) is answered here, PUBCOMP 0x92
        (packet identifier not found): amqtt never saw the PUBLISH, would only log the PUBREL
        and leave the client waiting for its PUBCOMP.
        """
        self._refused_qos2.add(packet_id)

    def _answered_here(self, packet: Packet) -> bool:
        if not self._refused_qos2:
            return False
        if isinstance(packet, Publish) and packet.packet_id is not None:
            self._refused_qos2.discard(packet.packet_id)  # the id is in use again: that flow ended
        elif (
            isinstance(packet, PacketIdOnly)
            and packet.packet_type == PUBREL
            and packet.packet_id in self._refused_qos2
        ):
            self._refused_qos2.discard(packet.packet_id)
            self.send(encode5(Ack5(PUBCOMP, packet.packet_id, _PACKET_ID_NOT_FOUND)))
            return True
        return False

    def _eof(self) -> bytes:
        if not self._eof_told:
            self._eof_told = True
            if self.on_eof is not None:
                self.on_eof()
        return b""

    # ---- ending ----------------------------------------------------------------------------

    def violation(self, reason: str, code: int = 0x81) -> None:
        """End the connection because of what the client sent, and say so once.

        ``code`` is the MQTT 5 DISCONNECT reason an MQTT 5 client is sent first (0x81 malformed).
        """
        if self._refused:
            return
        _log.warning(
            "MQTT client %r from %s: %s; closing the connection", self.client_id, addr(self.peer), reason
        )
        if self.on_violation is not None:
            self.on_violation(reason)
        self.disconnect(code)

    def disconnect(self, code: int) -> None:
        """Drop the connection; an MQTT 5 client is told why first (a DISCONNECT with ``code``)."""
        if self.v5 is not None and not self._refused:
            self.writer.write(encode5(Disconnect5(code)))
        self.abort()

    def abort(self) -> None:
        """Drop the connection now: nothing more is read, what was written goes first."""
        self._refused = True
        self.stop_watching()
        self.writer.abort()
        self._room.set()  # a read waiting for in-flight room sees the end at once

    @property
    def closed(self) -> bool:
        """Dropped, or closing: what is sent now would not arrive."""
        return self._refused or self.writer.transport.is_closing()

    def send(self, packet: bytes) -> None:
        """Send ``packet`` in order with what the protocol layer sends on this connection."""
        self.writer.write(packet)

    # ---- keep-alive ------------------------------------------------------------------------

    def watch_silence(self, limit_s: float) -> None:
        """Drop the connection once nothing has been read from it for ``limit_s`` seconds.

        One timer per connection, pushed back only when it fires: a read just notes the time.
        """
        self._silence_limit = limit_s
        self._heard = self._loop.time()
        self._silence_timer = self._loop.call_later(limit_s, self._check_silence)

    def stop_watching(self) -> None:
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None

    def _check_silence(self) -> None:
        quiet = self._loop.time() - self._heard
        if quiet < self._silence_limit:
            self._silence_timer = self._loop.call_later(self._silence_limit - quiet, self._check_silence)
            return
        self._silence_timer = None
        _log.info("MQTT client %r silent for too long; dropping the connection", self.client_id)
        self.abort()


_TCP_KEEPALIVE: Final = (60, 10, 3)  # idle seconds, interval, probes: a vanished peer ends in ~90 s


def keep_alive(writer: asyncio.StreamWriter) -> None:
    """TCP keep-alive, so that a client with MQTT keep-alive 0 that vanishes is noticed."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, probes = _TCP_KEEPALIVE
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)


def host(peer: object) -> str:
    """The address of a peer ``(host, port, ...)``."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


def addr(peer: object) -> str:
    """``host:port`` of a peer, for logs and security events."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


async def settle(*groups: set[asyncio.Future[Any]], grace_s: float = 10.0) -> None:
    """Wait a little for connections and hooks to finish after amqtt's shutdown; cancel the rest."""
    pending: set[asyncio.Future[Any]] = {task for group in groups for task in group if not task.done()}
    if not pending:
        return
    _, late = await asyncio.wait(pending, timeout=grace_s)
    for task in late:
        task.cancel()
    if late:
        _log.warning("%d MQTT connection(s) or hook(s) cancelled at shutdown", len(late))
        await asyncio.wait(late)
