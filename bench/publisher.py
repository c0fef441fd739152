"""Load: many devices publishing QoS 1 events over raw MQTT 3.1.1 sockets, pipelined.

Why not a client library: one paho-mqtt process tops out near 2k QoS 1 events/s, so with a
library the publisher, not the back end, would set the pace (see the design notes). Here each
device is one TCP connection with a window of unacknowledged PUBLISH packets; every PUBACK that
arrives frees a slot, which is refilled at once from the same ``data_received`` call. Packets
are pre-encoded: a per-device prefix (fixed header and topic) + the packet id + one of a pool
of ready JSON payloads, so a message costs a bytes join, not a JSON encoding.

Run by :mod:`bench.run` as ``python -m bench.publisher`` with a JSON job on stdin's first
line. It connects every device (CONNECT with the device's real credential), prints
``{"ready": true}``, waits for ``go`` on stdin, publishes, and prints one JSON result line:
events sent and acknowledged, the monotonic times of the first PUBLISH and the last PUBACK
(``time.monotonic`` is the system-wide CLOCK_MONOTONIC on Linux, so the orchestrator can
compare it with other processes' times), and its own CPU seconds.

``rate`` 0 publishes as fast as the broker acknowledges; a positive ``rate`` (events/s for
this process) paces the sends with a token bucket topped up every 10 ms.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

KEEPALIVE_S = 0  # runs are bounded; no PINGREQ traffic to muddle the figures
TICK_S = 0.01


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def publish_packet(topic: bytes, payload: bytes, packet_id: int, *, dup: bool = False) -> bytes:
    """One QoS 1 PUBLISH; ``dup`` marks a resend (same packet id) of one not acknowledged."""
    body = len(topic).to_bytes(2, "big") + topic + packet_id.to_bytes(2, "big") + payload
    return bytes([0x32 | (0x08 if dup else 0)]) + _varint(len(body)) + body


def connect_packet(client_id: str, username: str | None, password: str | None) -> bytes:
    flags = 0x02  # clean session: the publishers keep no state between runs
    payload = _utf8(client_id)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
    if password is not None:
        flags |= 0x40
        payload += _utf8(password)
    variable = _utf8("MQTT") + bytes([4, flags]) + KEEPALIVE_S.to_bytes(2, "big")
    body = variable + payload
    return b"\x10" + _varint(len(body)) + body


def payload_pool(n: int, seed: int) -> list[bytes]:
    """Realistic sensor readings, about 150 bytes of JSON each."""
    rnd = random.Random(seed)
    pool = []
    for i in range(n):
        doc = {
            "d": {
                "temperature": round(rnd.uniform(-10, 40), 2),
                "humidity": round(rnd.uniform(10, 90), 1),
                "pressure": round(rnd.uniform(980, 1040), 1),
                "battery": rnd.randint(5, 100),
                "rssi": rnd.randint(-95, -40),
                "seq": i,
            },
            "ts": f"2026-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}.{rnd.randint(0, 999):03d}Z",
            "fw": "2.4.1",
        }
        pool.append(json.dumps(doc, separators=(",", ":")).encode())
    return pool


@dataclass
class Device:
    device_id: str
    type_id: str
    password: str | None


class Connection(asyncio.Protocol):
    """One device's connection: CONNECT, then a window of QoS 1 PUBLISH packets."""

    def __init__(self, job: Job, device: Device, to_send: int) -> None:
        self.job = job
        self.device = device
        self.remaining = to_send
        self.inflight = 0
        self.acked = 0
        self.sent = 0
        self.next_pid = 1
        topic = f"iot-2/type/{device.type_id}/id/{device.device_id}/evt/reading/fmt/json".encode()
        self._topic = len(topic).to_bytes(2, "big") + topic
        # the remaining length differs per payload length: one prefix per distinct length
        self._prefixes: dict[int, bytes] = {}
        self._pool_i = random.randrange(len(job.pool))
        self._buf = b""
        self.transport: asyncio.Transport | None = None
        self.connacked: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP connection's transport
        transport.write(  # type: ignore[attr-defined]
            connect_packet(self.device.device_id, self.device.device_id, self.device.password)
        )

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        i, end = 0, len(buf)
        acks = 0
        while end - i >= 2:
            kind = buf[i] & 0xF0
            length = buf[i + 1]  # every packet a publisher receives is short (length < 128)
            if end - i < 2 + length:
                break
            if kind == 0x40:  # PUBACK
                acks += 1
            elif kind == 0x20 and not self.connacked.done():  # CONNACK
                self.connacked.set_result(buf[i + 3])
            i += 2 + length
        self._buf = buf[i:]
        if acks:
            self.inflight -= acks
            self.acked += acks
            self.job.on_acks(self, acks)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connacked.done():
            self.connacked.set_exception(exc or ConnectionResetError("closed before CONNACK"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.job.on_lost(self)

    # -- sending
    def room(self) -> int:
        return min(self.job.window - self.inflight, self.remaining)

    def send(self, n: int) -> None:
        pool, size = self.job.pool, len(self.job.pool)
        parts: list[bytes] = []
        pid = self.next_pid
        k = self._pool_i
        for _ in range(n):
            payload = pool[k]
            k = k + 1 if k + 1 < size else 0
            prefix = self._prefixes.get(len(payload))
            if prefix is None:
                rl = len(self._topic) + 2 + len(payload)
                prefix = self._prefixes[len(payload)] = b"\x32" + _varint(rl) + self._topic
            parts += (prefix, pid.to_bytes(2, "big"), payload)
            pid = pid + 1 if pid < 65535 else 1
        self.next_pid, self._pool_i = pid, k
        self.remaining -= n
        self.inflight += n
        self.sent += n
        if self.transport is not None:
            self.transport.write(b"".join(parts))


class Job:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.host: str = spec["host"]
        self.port: int = spec["port"]
        self.window: int = spec["window"]
        self.rate: float = spec.get("rate", 0.0)
        self.pool = payload_pool(256, spec.get("seed", 1))
        self.devices = [Device(*d) for d in spec["devices"]]
        self.per_device: int = spec["per_device"]
        self.conns: list[Connection] = []
        self.budget = float("inf") if self.rate <= 0 else 0.0
        self.t_first = 0.0
        self.t_last_ack = 0.0
        self.done = asyncio.get_running_loop().create_future()
        self.outstanding = 0
        self.lost = 0

    def on_acks(self, conn: Connection, n: int) -> None:
        self.t_last_ack = time.monotonic()
        self.outstanding -= n
        if self.outstanding <= 0 and not self.done.done():
            self.done.set_result(None)
            return
        self._fill(conn)

    def on_lost(self, conn: Connection) -> None:
        if conn.inflight or conn.remaining:
            self.lost += 1
            if not self.done.done():
                self.done.set_exception(ConnectionError(f"device {conn.device.device_id}: connection lost"))

    def _fill(self, conn: Connection) -> None:
        n = conn.room()
        if n <= 0:
            return
        if self.budget < n:
            n = int(self.budget)
            if n <= 0:
                return
        self.budget -= n
        conn.send(n)

    async def connect_all(self) -> None:
        loop = asyncio.get_running_loop()
        for d in self.devices:
            _, conn = await loop.create_connection(
                functools.partial(Connection, self, d, self.per_device), self.host, self.port
            )
            self.conns.append(conn)
        codes = await asyncio.gather(*(c.connacked for c in self.conns))
        refused = [c.device.device_id for c, rc in zip(self.conns, codes, strict=True) if rc != 0]
        if refused:
            raise ConnectionRefusedError(f"CONNACK refused {len(refused)} devices, e.g. {refused[0]}")
        self.outstanding = sum(c.remaining for c in self.conns)

    async def publish(self) -> None:
        self.t_first = time.monotonic()
        if self.outstanding == 0:
            return
        if self.rate <= 0:
            for c in self.conns:
                self._fill(c)
            await self.done
            return
        last, start, n = self.t_first, 0, len(self.conns)
        while not self.done.done():
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            # at most a tick and a half of credit, so a stall is not followed by a burst
            self.budget = min(self.budget + (now - last) * self.rate, self.rate * TICK_S * 1.5 + 1)
            last = now
            for i in range(n):  # round robin: each tick starts one device further on
                if self.budget < 1:
                    break
                self._fill(self.conns[(start + i) % n])
            start = (start + 1) % n
        await self.done

    async def close(self) -> None:
        for c in self.conns:
            if c.transport is not None and not c.transport.is_closing():
                c.transport.write(b"\xe0\x00")  # DISCONNECT
                c.transport.close()
        if self.conns:
            await asyncio.wait([c.closed for c in self.conns], timeout=5)


async def main() -> None:
    spec = json.loads(sys.stdin.readline())
    loop = asyncio.get_running_loop()
    job = Job(spec)
    await job.connect_all()
    print(json.dumps({"ready": True}), flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        await job.close()
        return
    cpu0 = time.process_time()
    error = None
    try:
        await asyncio.wait_for(job.publish(), timeout=spec.get("timeout", 600))
    except (ConnectionError, TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    cpu = time.process_time() - cpu0
    sent = sum(c.sent for c in job.conns)
    acked = sum(c.acked for c in job.conns)
    await job.close()
    result = {
        "sent": sent,
        "acked": acked,
        "t_first": job.t_first,
        "t_last_ack": job.t_last_ack,
        "cpu_s": cpu,
        "error": error,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
