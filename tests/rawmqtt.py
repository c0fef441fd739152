"""A device on a raw socket: exactly the bytes a test means (packet ids, the DUP flag, one write).

Client libraries choose packet ids and never resend on purpose; the fault tests need both.
MQTT 3.1.1, QoS 1, clean session.
"""

from __future__ import annotations

import contextlib
import socket
import time

from bench.publisher import connect_packet
from bench.publisher import publish_packet as bench_publish


def publish_packet(topic: str, payload: bytes, packet_id: int, *, dup: bool = False) -> bytes:
    return bench_publish(topic.encode(), payload, packet_id, dup=dup)


class RawDevice:
    def __init__(self, port: int, device_id: str, password: str, *, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(connect_packet(device_id, device_id, password))
        head = self._packet()
        if head[:1] != b"\x20" or head[3:4] != b"\x00":
            raise ConnectionError(f"refused: CONNACK {head.hex()}")
        self._buf = b""

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("connection closed")
            data += chunk
        return data

    def _packet(self) -> bytes:
        head = self._recv_exact(2)
        return head + self._recv_exact(head[1])  # the broker's answers here are all short

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def pubacks(self, n: int, timeout: float) -> list[int]:
        """The packet ids of the next ``n`` PUBACKs (fewer if ``timeout`` passes first)."""
        ids: list[int] = []
        deadline = time.monotonic() + timeout
        while len(ids) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                packet = self._packet()
            except TimeoutError:
                break
            if packet[:1] == b"\x40":
                ids.append(int.from_bytes(packet[2:4], "big"))
        return ids

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")
        self.sock.close()
