"""``make attack``: hostile MQTT clients against one ``iotvault serve`` (embedded broker).

Runs the probes of the embedded broker's security review together, for ``--seconds``, against
a fresh server on loopback, while an honest device publishes QoS 1 events and times each
PUBACK. Prints, before / during / after: the server's open sockets and descriptors, its RSS,
the security-event rows, and the honest device's median and worst latency. Every loop is
bounded in count and time and only ever talks to 127.0.0.x.

Probes: CONNECT then close at once; connections that never send CONNECT; refused logins (one
client id, and many); malformed packets (wildcard topic with packets in its payload, QoS 3);
headers announcing huge packets; MQTT 5 CONNECTs without a credential; MQTT 5 sessions that
send a topic alias or a property that runs past its packet; retained publishes on many topics;
PUBRELs with unknown packet ids.

The verdict is the bounds, each printed with its figure: sockets back to their baseline after
the attack, and every other descriptor too except the SQLite database's own files (its file and
WAL, opened once per pooled connection, which the summary lists), security-event rows at most
:data:`ROWS_PER_WINDOW` per aggregation window however many hostile connections, RSS growth
over the second half of the attack under :data:`RSS_GROWTH_MB`, and the honest device never
refused or timed out during or after the attack, its 95th percentile PUBACK latency during the
attack under :data:`P95_MS`.
The honest device runs in a process of its own, so the attackers' client-side load (all in
this process) is not counted in its latency.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.services import Server, base_env, free_port
from iotvault.broker.codec import Connect, PacketIdOnly, Publish, encode
from iotvault.broker.codec5 import Connect5, Publish5, encode5
from iotvault.config import Settings, load_settings
from iotvault.context import context
from iotvault.devices import register_device

HOST = "127.0.0.1"
TIMEOUT = 5.0
ROWS_PER_WINDOW = 50  # security-event rows a 60 s window may add: ~2 per probe kind and address
RSS_GROWTH_MB = 25.0  # over the second half of the attack
P95_MS = 1000.0  # the honest device's 95th percentile PUBACK latency while attacked
DATABASE_FILE = "iotvault.db"  # SQLite's file and its -wal, opened once per pooled connection


@dataclass
class Sample:
    sockets: int
    descriptors: int
    rss_mb: float
    rows: int
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # the honest device refused, dropped, timed out
    files: Counter[str] = field(default_factory=Counter)  # descriptors that are not sockets, by kind

    def line(self, name: str) -> str:
        lat = sorted(self.latencies_ms)
        med = f"{statistics.median(lat):6.1f}" if lat else "     -"
        p95 = f"{lat[int(0.95 * (len(lat) - 1))]:6.1f}" if lat else "     -"
        worst = f"{lat[-1]:7.1f}" if lat else "      -"
        return (
            f"{name:<7} sockets {self.sockets:4d}  descriptors {self.descriptors:4d}  "
            f"RSS {self.rss_mb:6.1f} MB  event rows {self.rows:5d}  honest PUBACK ms: median {med}, "
            f"p95 {p95}, worst {worst}; {len(lat)} acknowledged, {len(self.failures)} failed"
        )


def measure(pid: int, settings: Settings) -> Sample:
    fds = list(Path(f"/proc/{pid}/fd").iterdir())
    sockets = 0
    files: Counter[str] = Counter()
    for fd in fds:
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        sockets += target.startswith("socket:")
        if not target.startswith("socket:"):
            files[_kind_of(target)] += 1
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    with context(settings) as ctx:
        rows = len(ctx.store.list_security_events(limit=10_000_000))
    return Sample(sockets, len(fds), rss, rows, files=files)


def _kind_of(target: str) -> str:
    """A descriptor's kind for the summary: the file's name without its directory, or its type."""
    if target.startswith(("anon_inode:", "pipe:")):
        return target.split(":", maxsplit=1)[0] + ":" + target.split(":")[1].strip("[]").split("]")[0]
    return Path(target).name


async def mqtt(port: int, source: str, packet: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    writer.write(packet)
    return reader, writer


def login(device: str, password: str) -> bytes:
    return encode(Connect(device, keep_alive=60, username=device, password=password.encode()))


async def honest(port: int, device: str, password: str, until: float, sample: Sample) -> None:
    """QoS 1 events, one at a time, each PUBACK timed; a refusal, drop or timeout is a failure."""
    out = sample.latencies_ms
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
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            sample.failures.append(type(exc).__name__)
            await asyncio.sleep(0.1)


def honest_device(port: int, device: str, password: str, seconds: float) -> tuple[list[float], list[str]]:
    """:func:`honest` in a process of its own, so the attack's client load is not in its latency."""
    sample = Sample(0, 0, 0.0, 0)
    asyncio.run(honest(port, device, password, time.monotonic() + seconds, sample))
    return sample.latencies_ms, sample.failures


async def honest_apart(port: int, device: str, password: str, seconds: float, sample: Sample) -> None:
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        lat, failed = await loop.run_in_executor(pool, honest_device, port, device, password, seconds)
    sample.latencies_ms, sample.failures = lat, failed


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


async def mqtt5_violations(port: int, creds: dict[str, str]) -> None:
    """An MQTT 5 device that logs in, then sends a topic alias or a property past its packet."""
    device, password = list(creds.items())[4]
    reader, writer = await mqtt(port, "127.0.0.18", encode5(
        Connect5(device, keep_alive=60, username=device, password=password.encode())))  # fmt: skip
    await asyncio.wait_for(reader.read(5), TIMEOUT)
    topic = f"iot-2/type/thermo/id/{device}/evt/reading/fmt/json"
    if time.monotonic_ns() % 2:
        writer.write(encode5(Publish5(topic, b"{}", 1, packet_id=1, properties=((0x23, 1),))))
    else:
        body = b"\x00\x04a/bc\x00\x01\x7f\x26\x00\x01k"  # property length 127, 4 bytes there
        writer.write(b"\x32" + bytes([len(body)]) + body)
    await asyncio.wait_for(reader.read(), TIMEOUT)  # DISCONNECT 0x94 / 0x81, then the close
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
    "MQTT 5 no credential": (mqtt5, 2),
    "MQTT 5 violations": (mqtt5_violations, 1),
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
                d.device_id: d.credential for d in (register_device(ctx, "thermo", f"a{i}") for i in range(6))
            }
        honest_id = "a4"
        honest_pw = creds.pop(honest_id)
        port = settings.mqtt_port
        with Server(env, Path(tmp) / "server.log") as server:
            phase = min(10.0, seconds / 3)
            honest_before = Sample(0, 0, 0.0, 0)
            await honest_apart(port, honest_id, honest_pw, phase, honest_before)
            before = measure(server.pid, settings)
            before.latencies_ms, before.failures = honest_before.latencies_ms, honest_before.failures
            started = time.monotonic()
            until = started + seconds
            counts: dict[str, int] = {}
            tasks = [
                asyncio.create_task(run_probe(probe, port, creds, until, counts, name))
                for name, (probe, n) in PROBES.items()
                for _ in range(n)
            ]
            samples: list[tuple[float, Sample]] = []

            async def sampler() -> None:
                while time.monotonic() < until:
                    await asyncio.sleep(2)
                    samples.append(
                        (time.monotonic() - started, await asyncio.to_thread(measure, server.pid, settings))
                    )

            sampling = asyncio.create_task(sampler())
            honest_during = Sample(0, 0, 0.0, 0)
            await honest_apart(port, honest_id, honest_pw, until - time.monotonic(), honest_during)
            await asyncio.gather(*tasks, sampling)
            seen = [x for _, x in samples] or [measure(server.pid, settings)]
            during = Sample(
                max(x.sockets for x in seen),
                max(x.descriptors for x in seen),
                max(x.rss_mb for x in seen),
                max(x.rows for x in seen),
                honest_during.latencies_ms,
                honest_during.failures,
            )
            await asyncio.sleep(CONNECT_SETTLE_S)
            after = measure(server.pid, settings)
            honest_after = Sample(0, 0, 0.0, 0)
            await honest_apart(port, honest_id, honest_pw, phase, honest_after)
            after.latencies_ms, after.failures = honest_after.latencies_ms, honest_after.failures
        return report(seconds, before, during, after, counts, samples, settings.security_events_window_s)


def report(  # noqa: PLR0917 -- the figures of one run
    seconds: float,
    before: Sample,
    during: Sample,
    after: Sample,
    counts: dict[str, int],
    samples: list[tuple[float, Sample]],
    window_s: float,
) -> int:
    """Print the figures and the verdict of each bound; 0 if every bound held."""
    print(f"iotvault embedded broker under attack for {seconds:.0f} s (peaks shown for 'during')")
    for name, sample in (("before", before), ("during", during), ("after", after)):
        print(sample.line(name))
    grown = after.files - before.files
    db_files = sum(v for k, v in grown.items() if k.startswith(DATABASE_FILE))
    if grown:
        print("descriptors other than sockets, new after the attack: "
              + ", ".join(f"{k} x{v}" for k, v in sorted(grown.items())))  # fmt: skip
    hostile = sum(counts.values())
    print(f"hostile connections: {hostile} (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")")
    second_half = [x.rss_mb for t, x in samples if t >= seconds / 2]
    mid = [x.rss_mb for t, x in samples if t < seconds / 2]
    growth = (max(second_half) - mid[-1]) if second_half and mid else float("nan")
    windows = max(1, math.ceil((seconds + CONNECT_SETTLE_S) / window_s) + 1)
    rows_added = after.rows - before.rows
    rows_ok = rows_added <= ROWS_PER_WINDOW * windows
    served = not during.failures and not after.failures and bool(during.latencies_ms)
    lat = sorted(during.latencies_ms)
    p95 = lat[int(0.95 * (len(lat) - 1))] if lat else float("inf")
    half_mb = mid[-1] if mid else 0.0
    checks = {
        f"sockets back to baseline ({before.sockets} -> {after.sockets}, slack 2)": (
            after.sockets <= before.sockets + 2
        ),
        f"descriptors back to baseline, the database's own files apart ({before.descriptors} -> "
        f"{after.descriptors}, {db_files} database files opened meanwhile, slack 2)": (
            after.descriptors - db_files <= before.descriptors + 2
        ),
        f"security-event rows bounded ({rows_added} added for {hostile} hostile connections; "
        f"at most {ROWS_PER_WINDOW} x {windows} windows of {window_s:.0f} s)": rows_ok,
        f"RSS growth over the second half ({growth:+.1f} MB from {half_mb:.1f} MB at half time; "
        f"under {RSS_GROWTH_MB:.0f} MB)": growth < RSS_GROWTH_MB,
        f"honest device never refused or timed out ({len(during.failures)} failed during, "
        f"{len(after.failures)} after)": served,
        f"honest device's PUBACK p95 during the attack under {P95_MS:.0f} ms ({p95:.0f} ms)": p95 < P95_MS,
    }
    for what, held in checks.items():
        print(f"  {'ok  ' if held else 'FAIL'} {what}")
    ok = all(checks.values())
    print(f"bounded and served: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


CONNECT_SETTLE_S = 6.0  # the CONNECT timeout (5 s) and a little, so idle probes are closed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the probes run (default 60)")
    args = parser.parse_args()
    return asyncio.run(attack(max(5.0, min(args.seconds, 900.0))))


if __name__ == "__main__":
    raise SystemExit(main())
