"""``make attack``: hostile MQTT clients against one ``iotvault serve`` (embedded broker).

Runs the probes of the embedded broker's security review together, for ``--seconds``, against
a fresh server on loopback, while an honest device publishes QoS 1 events and times each
PUBACK. Prints, before / during / after: the server's open sockets and descriptors, its RSS,
the security-event rows, and the honest device's median and worst latency. Every loop is
bounded in count and time and only ever talks to 127.0.0.x.

Probes: CONNECT then close at once; connections that never send CONNECT; refused logins (one
client id, and many); malformed packets (wildcard topic with packets in its payload, QoS 3);
headers announcing huge packets; MQTT 5 CONNECTs; retained publishes on many topics; PUBRELs
with unknown packet ids.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.services import Server, base_env, free_port
from iotvault.broker.codec import Connect, PacketIdOnly, Publish, encode
from iotvault.config import Settings, load_settings
from iotvault.context import context
from iotvault.devices import register_device

HOST = "127.0.0.1"
TIMEOUT = 5.0


@dataclass
class Sample:
    sockets: int
    descriptors: int
    rss_mb: float
    rows: int
    latencies_ms: list[float] = field(default_factory=list)

    def line(self, name: str) -> str:
        lat = self.latencies_ms
        med = f"{statistics.median(lat):7.1f}" if lat else "      -"
        worst = f"{max(lat):7.1f}" if lat else "      -"
        return (
            f"{name:<8} sockets {self.sockets:5d}  descriptors {self.descriptors:5d}  "
            f"RSS {self.rss_mb:7.1f} MB  event rows {self.rows:6d}  "
            f"honest PUBACK median {med} ms, worst {worst} ms, {len(lat)} events"
        )


def measure(pid: int, settings: Settings) -> Sample:
    fds = list(Path(f"/proc/{pid}/fd").iterdir())
    sockets = 0
    for fd in fds:
        try:
            sockets += str(fd.readlink()).startswith("socket:")
        except OSError:
            continue
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    with context(settings) as ctx:
        rows = len(ctx.store.list_security_events(limit=10_000_000))
    return Sample(sockets, len(fds), rss, rows)


async def mqtt(port: int, source: str, packet: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    writer.write(packet)
    return reader, writer


def login(device: str, password: str) -> bytes:
    return encode(Connect(device, keep_alive=60, username=device, password=password.encode()))


async def honest(port: int, device: str, password: str, until: float, out: list[float]) -> None:
    """QoS 1 events, one at a time, each PUBACK timed; reconnects if dropped."""
    pid = 0
    while time.monotonic() < until:
        try:
            reader, writer = await mqtt(port, "127.0.0.200", login(device, password))
            if await asyncio.wait_for(reader.readexactly(4), TIMEOUT) != b"\x20\x02\x00\x00":
                raise ConnectionError("refused")
            while time.monotonic() < until:
                pid = pid % 65535 + 1
                start = time.monotonic()
                topic = f"iot-2/type/thermo/id/{device}/evt/reading/fmt/json"
                writer.write(encode(Publish(topic, b'{"d": {"t": 21.5}}', qos=1, packet_id=pid)))
                await asyncio.wait_for(reader.readexactly(4), TIMEOUT)
                out.append((time.monotonic() - start) * 1000)
                await asyncio.sleep(0.05)
            writer.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            out.append(TIMEOUT * 1000)  # counted as a worst case
            await asyncio.sleep(0.1)


Probe = Callable[[int, dict[str, str]], Awaitable[None]]


async def connect_and_close(port: int, creds: dict[str, str]) -> None:
    device, password = next(iter(creds.items()))
    _, writer = await mqtt(port, "127.0.0.11", login(device, password))
    writer.close()


async def idle(port: int, creds: dict[str, str]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=("127.0.0.12", 0))
    await asyncio.wait_for(reader.read(), 30)
    writer.close()


async def bad_login(port: int, creds: dict[str, str]) -> None:
    reader, writer = await mqtt(
        port, "127.0.0.13", encode(Connect("victim", username="victim", password=b"x"))
    )
    await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()


async def malformed(port: int, creds: dict[str, str]) -> None:
    device, password = list(creds.items())[1]
    reader, writer = await mqtt(port, "127.0.0.14", login(device, password))
    await asyncio.wait_for(reader.readexactly(4), TIMEOUT)
    body = b"\x00\x03a/+\x00\x01" + b"\xc0\x00" * 8 + b"\x30\xff\xff\xff\x5f"
    writer.write(b"\x32" + bytes([len(body)]) + body)
    await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()


async def oversize(port: int, creds: dict[str, str]) -> None:
    device, password = list(creds.items())[2]
    reader, writer = await mqtt(port, "127.0.0.15", login(device, password))
    await asyncio.wait_for(reader.readexactly(4), TIMEOUT)
    writer.write(b"\x30\xff\xff\xff\x5f" + b"x" * 65536)
    await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()


async def mqtt5(port: int, creds: dict[str, str]) -> None:
    body = b"\x00\x04MQTT\x05\x02\x00\x1e\x00\x00\x02v5"
    reader, writer = await mqtt(port, "127.0.0.16", b"\x10" + bytes([len(body)]) + body)
    await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()


async def retained_and_pubrels(port: int, creds: dict[str, str]) -> None:
    device, password = list(creds.items())[3]
    reader, writer = await mqtt(port, "127.0.0.17", login(device, password))
    await asyncio.wait_for(reader.readexactly(4), TIMEOUT)
    for i in range(50):
        topic = f"iot-2/type/thermo/id/{device}/evt/k{time.monotonic_ns() % 100_000}{i}/fmt/json"
        writer.write(
            encode(Publish(topic, b'{"d": "' + b"x" * 20_000 + b'"}', qos=1, retain=True, packet_id=i + 1))
        )
    writer.write(encode(PacketIdOnly(6, 999)) * 2000)
    await writer.drain()
    await asyncio.sleep(0.5)
    writer.close()


PROBES: dict[str, tuple[Probe, int]] = {  # name: (probe, how many run at once)
    "connect-and-close": (connect_and_close, 8),
    "idle (no CONNECT)": (idle, 40),
    "refused logins": (bad_login, 4),
    "malformed packets": (malformed, 2),
    "oversize headers": (oversize, 2),
    "MQTT 5": (mqtt5, 2),
    "retained + PUBRELs": (retained_and_pubrels, 1),
}


async def run_probe(  # noqa: PLR0917 -- one task per probe copy
    probe: Probe, port: int, creds: dict[str, str], until: float, counts: dict[str, int], name: str
) -> None:
    while time.monotonic() < until:
        try:
            await asyncio.wait_for(probe(port, creds), 30)
            counts[name] = counts.get(name, 0) + 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            counts[name] = counts.get(name, 0) + 1
            await asyncio.sleep(0.01)


async def attack(seconds: float) -> int:
    with tempfile.TemporaryDirectory(prefix="iotvault-attack-") as tmp:
        env = base_env()
        env.update(
            IOTVAULT_DATA_DIR=str(Path(tmp) / "data"),
            IOTVAULT_HTTP_PORT=str(free_port()),
            IOTVAULT_MQTT_PORT=str(free_port()),
            IOTVAULT_LOG_LEVEL="info",
        )
        settings = load_settings(environ=env)
        with context(settings) as ctx:
            creds = {
                d.device_id: d.credential for d in (register_device(ctx, "thermo", f"a{i}") for i in range(5))
            }
        honest_id = "a4"
        honest_pw = creds.pop(honest_id)
        port = settings.mqtt_port
        with Server(env, Path(tmp) / "server.log") as server:
            phase = min(10.0, seconds / 3)
            before = measure(server.pid, settings)
            await honest(port, honest_id, honest_pw, time.monotonic() + phase, before.latencies_ms)
            before = Sample(**{**measure(server.pid, settings).__dict__, "latencies_ms": before.latencies_ms})
            until = time.monotonic() + seconds
            counts: dict[str, int] = {}
            during_lat: list[float] = []
            tasks = [
                asyncio.create_task(run_probe(probe, port, creds, until, counts, name))
                for name, (probe, n) in PROBES.items()
                for _ in range(n)
            ]
            peak = measure(server.pid, settings)
            watch_until = until
            sampler_out: list[Sample] = []

            async def sampler() -> None:
                while time.monotonic() < watch_until:
                    await asyncio.sleep(2)
                    sampler_out.append(await asyncio.to_thread(measure, server.pid, settings))

            sampling = asyncio.create_task(sampler())
            await honest(port, honest_id, honest_pw, until, during_lat)
            await asyncio.gather(*tasks, sampling)
            samples = sampler_out or [peak]
            during = Sample(
                max(s.sockets for s in samples),
                max(s.descriptors for s in samples),
                max(s.rss_mb for s in samples),
                max(s.rows for s in samples),
                during_lat,
            )
            await asyncio.sleep(CONNECT_SETTLE_S)
            after = measure(server.pid, settings)
            await honest(port, honest_id, honest_pw, time.monotonic() + phase, after.latencies_ms)
        print(f"iotvault embedded broker under attack for {seconds:.0f} s (peaks shown for 'during')")
        for name, sample in (("before", before), ("during", during), ("after", after)):
            print(sample.line(name))
        print("probes run: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        half = len(samples) // 2
        first, second = samples[:half] or samples, samples[half:] or samples
        growth = max(x.rss_mb for x in second) - max(x.rss_mb for x in first)
        print(f"RSS growth over the second half of the attack: {growth:+.1f} MB (bounded if < 25 MB)")
        bounded = after.sockets <= before.sockets + 2 and growth < 25
        served = bool(during.latencies_ms) and statistics.median(during.latencies_ms) < 1000
        print(
            f"bounded: {'yes' if bounded else 'NO'}; "
            f"honest device served throughout: {'yes' if served else 'NO'}"
        )
        return 0 if bounded and served else 1


CONNECT_SETTLE_S = 6.0  # the CONNECT timeout (5 s) and a little, so idle probes are closed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the probes run (default 60)")
    args = parser.parse_args()
    return asyncio.run(attack(max(5.0, min(args.seconds, 900.0))))


if __name__ == "__main__":
    raise SystemExit(main())
