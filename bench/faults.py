"""Fault injection: numbered QoS 1 events, while iotvault and what it depends on are broken.

``make faults`` runs the long version, ``python -m bench.faults --short`` (and the test suite,
``tests/integration/test_faults_suite.py``) a short one. Two scenarios, each on services of its
own (never the machine's shared PostgreSQL or Mosquitto):

* **external**: a private Mosquitto and a private PostgreSQL (``lock_timeout`` 2 s). Faults:
  SIGKILL of iotvault, table locks held across commits (``events``, ``devices``), a Mosquitto
  restart, PostgreSQL stopped for a while, SIGTERM with live-stream (SSE) clients open.
* **embedded**: the embedded broker and SQLite on a small tmpfs (root only). Faults: SIGKILL,
  the disk filled and freed, SIGTERM with SSE clients open.

Throughout, devices publish numbered events and resend what was not acknowledged (same packet
id, DUP flag), an API client reads events and ``/readyz`` is sampled. At the end every stored
event is decrypted and counted. The run fails on any lost or duplicated event, an undecryptable
one, a 5xx other than 503-with-``Retry-After``, an API call that hangs, or a shutdown that
does not end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.private_pg import PrivatePostgres, PrivatePostgresError
from bench.publisher import connect_packet, publish_packet
from bench.services import Mosquitto, base_env, free_port, mosquitto_binary, stop_process, tail, wait_port

WINDOW = 20  # unacknowledged messages a device keeps in flight
REPORT_S = 3.0  # /readyz must report an outage within this of its start (its probe: every 2 s)
RECOVER_S = 10.0  # ... and be ready again within this of its end (commit retries: every 5 s at most)
API_TIMEOUT_S = 10.0  # an API call slower than this is a hang


@dataclass
class Plan:
    devices: int = 4
    rate: float = 40.0  # events a second per device
    seconds: float = 30.0  # how long each device keeps publishing new events
    outage_s: float = 10.0  # PostgreSQL stopped for this long
    lock_s: float = 5.0  # table locks held this long
    disk_full_s: float = 5.0
    kills: int = 1  # SIGKILLs of iotvault per scenario


SHORT = Plan(devices=3, rate=25.0, seconds=25.0, outage_s=6.0, lock_s=4.0, disk_full_s=4.0, kills=1)
LONG = Plan(devices=8, rate=60.0, seconds=150.0, outage_s=10.0, lock_s=6.0, disk_full_s=8.0, kills=3)


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        b = (await reader.readexactly(1))[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first, await reader.readexactly(length)


# ---- devices --------------------------------------------------------------------------
@dataclass
class Device:
    """Publishes ``seq`` 0, 1, 2 … at a steady rate; resends the unacknowledged on reconnect."""

    device_id: str
    password: str | None
    port: int
    total: int
    rate: float
    topic: bytes = b""
    next_seq: int = 0
    next_pid: int = 1
    unacked: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # pid -> (seq, payload)
    acked: set[int] = field(default_factory=set)
    resent: int = 0
    resent_seqs: set[int] = field(default_factory=set)
    reconnects: int = 0

    def __post_init__(self) -> None:
        self.topic = f"iot-2/type/thermo/id/{self.device_id}/evt/reading/fmt/json".encode()

    @property
    def done(self) -> bool:
        return self.next_seq >= self.total and not self.unacked

    def _pid(self) -> int:
        while True:
            pid = self.next_pid
            self.next_pid = pid + 1 if pid < 65535 else 1
            if pid not in self.unacked:
                return pid

    async def run(self, started: float, deadline: float) -> None:
        while not self.done and time.monotonic() < deadline:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                await self._session(started, deadline)
            if not self.done:
                self.reconnects += 1
                await asyncio.sleep(0.5)

    async def _session(self, started: float, deadline: float) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 5)
        try:
            writer.write(connect_packet(self.device_id, self.device_id, self.password))
            kind, body = await asyncio.wait_for(_read_packet(reader), 10)
            if kind != 0x20 or body[1] != 0:
                raise ConnectionError("CONNACK refused")
            for pid, (seq, payload) in sorted(self.unacked.items()):
                writer.write(publish_packet(self.topic, payload, pid, dup=True))
                self.resent += 1
                self.resent_seqs.add(seq)
            await writer.drain()
            while not self.done and time.monotonic() < deadline:
                due = min(self.total, int((time.monotonic() - started) * self.rate) + 1)
                while len(self.unacked) < WINDOW and self.next_seq < due:
                    seq, pid = self.next_seq, self._pid()
                    payload = json.dumps({"seq": seq, "device": self.device_id}).encode()
                    self.unacked[pid] = (seq, payload)
                    writer.write(publish_packet(self.topic, payload, pid))
                    self.next_seq += 1
                await writer.drain()
                try:
                    kind, body = await asyncio.wait_for(_read_packet(reader), 0.05)
                except TimeoutError:
                    continue
                if kind & 0xF0 == 0x40:
                    entry = self.unacked.pop(int.from_bytes(body[:2], "big"), None)
                    if entry is not None:
                        self.acked.add(entry[0])
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()


# ---- iotvault -------------------------------------------------------------------------
class Iotvault:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = int(env["IOTVAULT_HTTP_PORT"])

    def start(self, timeout: float = 90.0) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iotvault", "serve"],
                env=self.env,
                stdout=fh,
                stderr=fh,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FaultRunError(f"iotvault exited with {self.proc.returncode}:\n{tail(self.log)}")
            with self.log.open("rb") as fh:
                fh.seek(offset)
                if b" ready:" in fh.read():
                    wait_port(self.http)
                    return
            time.sleep(0.05)
        raise FaultRunError(f"iotvault not ready after {timeout}s:\n{tail(self.log)}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def terminate(self, timeout: float) -> float:
        """SIGTERM; the seconds it took to exit (FaultRunError if longer than ``timeout``)."""
        assert self.proc is not None  # noqa: S101 - a run's own bookkeeping
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
            raise FaultRunError(f"SIGTERM: iotvault still running after {timeout}s") from None
        code = self.proc.returncode
        self.proc = None
        if code != 0:
            raise FaultRunError(f"SIGTERM: iotvault exited with {code}:\n{tail(self.log)}")
        return time.monotonic() - started

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=20)
            self.proc = None


class FaultRunError(Exception):
    """A fault run failed: what broke, for the report."""


class ServiceMissingError(FaultRunError):
    """A service a scenario needs is not installed or cannot be started here (not a failure of iotvault)."""


# ---- the API client and the readiness sampler ------------------------------------------
@dataclass
class ApiWatch:
    port: int
    auth: str
    device_ids: list[str]
    statuses: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    readiness: list[tuple[float, str]] = field(default_factory=list)  # (time, status) changes
    samples: list[tuple[float, str]] = field(default_factory=list)  # every readyz answer
    _stop: threading.Event = field(default_factory=threading.Event)

    def _loop(self) -> None:
        base = f"http://127.0.0.1:{self.port}"
        headers = {"Authorization": self.auth}
        i = 0
        with httpx.Client(timeout=API_TIMEOUT_S) as client:
            while not self._stop.is_set():
                device = self.device_ids[i % len(self.device_ids)]
                i += 1
                self._call(client, f"{base}/iotf/devices/{device}?count=5", headers, "read")
                self._call(client, f"{base}/readyz", {}, "readyz")
                self._stop.wait(0.1)

    def _call(self, client: httpx.Client, url: str, headers: dict[str, str], what: str) -> None:
        try:
            r = client.get(url, headers=headers)
        except httpx.TimeoutException:
            self.statuses[f"{what} hang"] += 1
            self.problems.append(f"{what}: no answer within {API_TIMEOUT_S:.0f}s")
            return
        except httpx.TransportError:
            self.statuses[f"{what} down"] += 1
            self._ready("down")
            return
        self.statuses[f"{what} {r.status_code}"] += 1
        if r.status_code >= 500 and not (r.status_code == 503 and r.headers.get("retry-after")):
            self.problems.append(f"{what}: {r.status_code} {r.text[:200]}")
        if what == "readyz":
            state = (
                "ready"
                if r.status_code == 200
                else "not ready: "
                + ", ".join(f"{f['dependency']} ({f['reason']})" for f in r.json().get("failing", []))
            )
            self._ready(state)

    def _ready(self, state: str) -> None:
        now = time.monotonic()
        self.samples.append((now, state))
        if not self.readiness or self.readiness[-1][1] != state:
            self.readiness.append((now, state))

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        t = threading.Thread(target=self._loop, daemon=True, name="api-watch")
        t.start()
        try:
            yield
        finally:
            self._stop.set()
            t.join(API_TIMEOUT_S + 5)


def open_sse(port: int, device_id: str, auth: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"GET /iotf/devices/{device_id}/stream HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: {auth}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    if b" 200 " not in sock.recv(4096):
        raise FaultRunError("the live stream did not open")
    return sock


# ---- a scenario -----------------------------------------------------------------------
@dataclass
class Report:
    scenario: str
    published: int = 0
    acknowledged: int = 0
    stored: int = 0
    duplicates: int = 0
    # stored twice because the device resent it to a restarted external broker, which passes a
    # resend on as a new message (QoS 1 is at-least-once between the device and the broker;
    # README, "The dedupe window, and exactly-once beyond it")
    broker_resends: int = 0
    lost: int = 0
    undecryptable: int = 0
    resent: int = 0
    api: dict[str, int] = field(default_factory=dict)
    readiness: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def print(self) -> None:
        print(f"\n== {self.scenario}")
        for line in self.faults:
            print(f"   fault  {line}")
        print(
            f"   published {self.published}  acknowledged {self.acknowledged}  stored {self.stored}  "
            f"duplicates {self.duplicates}  lost {self.lost}  undecryptable {self.undecryptable}  "
            f"(resent {self.resent})"
        )
        if self.broker_resends:
            print(
                f"   and {self.broker_resends} stored twice that devices resent to a restarted external "
                "broker (at-least-once through the broker: README, exactly-once)"
            )
        print("   API answers: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.api.items())))
        for line in self.readiness:
            print(f"   readyz {line}")
        for p in self.problems:
            print(f"   PROBLEM {p}")
        print("   " + ("OK" if self.ok else "FAILED"))

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.lost or self.undecryptable or self.problems) and (
            self.acknowledged == self.published
        )


class Scenario:
    def __init__(self, name: str, plan: Plan, workdir: Path, settings: dict[str, str]) -> None:
        self.name = name
        self.plan = plan
        self.workdir = workdir
        self.env = base_env()
        self.env.update(
            {
                "IOTVAULT_DATA_DIR": str(workdir / "data"),
                "IOTVAULT_HTTP_PORT": str(free_port()),
                "IOTVAULT_MQTT_PORT": str(free_port()),
                "IOTVAULT_LOG_LEVEL": "info",
                "IOTVAULT_HTTP_SHUTDOWN_GRACE_S": "3",
                "IOTVAULT_INGEST_CLIENT_ID": f"faults-{name}",
            }
        )
        self.env.update(settings)
        self.node = Iotvault(self.env, workdir / "iotvault.log")
        self.report = Report(name)
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.external = "IOTVAULT_BROKER_URL" in settings
        self.windows: list[tuple[str, float, float]] = []  # (dependency, start, end) of outages
        self.devices: list[Device] = []
        self.auth = ""

    def fault(self, what: str) -> None:
        line = f"{time.monotonic() - self.t0:6.1f}s {what}"
        self.report.faults.append(line)
        print(f"[{self.name}] {line}", flush=True)

    def register(self, mqtt_port: int, *, with_passwords: bool) -> None:
        from iotvault.accounts import create_api_key  # noqa: PLC0415 - after the environment is set
        from iotvault.config import load_settings  # noqa: PLC0415
        from iotvault.context import context  # noqa: PLC0415
        from iotvault.devices import register_device  # noqa: PLC0415
        from iotvault.domain.accounts import Roles  # noqa: PLC0415

        p = self.plan
        with context(load_settings(environ=self.env)) as ctx:
            for i in range(p.devices):
                dev = register_device(ctx, "thermo", f"{self.name}-{i}")
                self.devices.append(
                    Device(
                        dev.device_id,
                        dev.credential if with_passwords else None,
                        mqtt_port,
                        int(p.rate * p.seconds),
                        p.rate,
                    )
                )
            key = create_api_key(
                ctx,
                roles=Roles(reader=True),
                devices=[d.device_id for d in self.devices],
                created_by="faults",
            )
        self.auth = "Basic " + base64.b64encode(f"{key.key}:{key.password}".encode()).decode()

    def outage(self, dependency: str, started: float) -> None:
        """A fault window that ``/readyz`` must report (naming ``dependency``) and recover from."""
        self.windows.append((dependency, started, time.monotonic()))

    def _check_readiness(self, samples: list[tuple[float, str]]) -> None:
        """Readiness matches the outage windows: not ready (naming the dependency) during
        each, or within :data:`REPORT_S` after its start, and ready again within
        :data:`RECOVER_S` of its end."""
        for dependency, start, end in self.windows:
            during = [st for t, st in samples if start <= t <= end + REPORT_S]
            if not any(st.startswith("not ready") and dependency in st for st in during):
                self.report.problems.append(
                    f"readyz never named {dependency!r} during its outage at {start - self.t0:.1f}s"
                )
            after = [t for t, st in samples if t > end and st == "ready"]
            if not after or after[0] - end > RECOVER_S:
                self.report.problems.append(
                    f"readyz not ready again within {RECOVER_S:.0f}s of the {dependency!r} recovery "
                    f"at {end - self.t0:.1f}s"
                )

    def kill_and_restart(self, times: int, every_s: float) -> None:
        for _ in range(times):
            time.sleep(every_s)
            self.node.kill()
            self.fault("SIGKILL iotvault")
            time.sleep(1)
            self.node.start()
            self.fault("iotvault restarted")

    def sigterm_with_streams(self) -> None:
        streams = [open_sse(self.node.http, d.device_id, self.auth) for d in self.devices[:3]]
        try:
            took = self.node.terminate(timeout=20)
            self.fault(f"SIGTERM with {len(streams)} live streams open: exited in {took:.1f}s")
        finally:
            for s in streams:
                s.close()

    def run(self, faults: Callable[[Scenario], None]) -> Report:
        watch = ApiWatch(self.node.http, self.auth, [d.device_id for d in self.devices])
        started = time.monotonic()
        deadline = started + self.plan.seconds * 3 + 120
        done = threading.Event()
        loop_result: list[BaseException] = []

        def publish() -> None:
            async def all_devices() -> None:
                await asyncio.gather(*(d.run(started, deadline) for d in self.devices))

            try:
                asyncio.run(all_devices())
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                loop_result.append(exc)
            finally:
                done.set()

        publisher = threading.Thread(target=publish, daemon=True, name="devices")
        with watch.running():
            publisher.start()
            try:
                faults(self)
            except FaultRunError as exc:
                self.report.problems.append(str(exc))
            if self.node.proc is None:
                self.node.start()
                self.fault("iotvault started again")
            done.wait(max(0.0, deadline - time.monotonic()))
            self.fault("devices finished" if done.is_set() else "devices did NOT finish in time")
            time.sleep(2)
        if loop_result:
            self.report.problems.append(f"publisher failed: {loop_result[0]!r}")
        self._settle_and_count()
        r = self.report
        r.api = dict(watch.statuses)
        r.problems += watch.problems[:20]
        r.readiness = [f"{at - self.t0:6.1f}s {state}" for at, state in watch.readiness]
        self._check_readiness(watch.samples)
        return r

    def _settle_and_count(self) -> None:
        from iotvault.config import load_settings  # noqa: PLC0415
        from iotvault.context import context  # noqa: PLC0415
        from iotvault.errors import IotVaultError  # noqa: PLC0415

        r = self.report
        r.published = sum(d.next_seq for d in self.devices)
        r.acknowledged = sum(len(d.acked) for d in self.devices)
        r.resent = sum(d.resent for d in self.devices)
        settings = load_settings(environ=self.env)
        seqs: Counter[tuple[str, int]] = Counter()
        when: dict[tuple[str, int], list[float]] = {}  # stored copies' receive times, run-relative
        deadline = time.monotonic() + 60  # with an external broker, stored can trail acknowledged
        while True:
            seqs.clear()
            r.undecryptable = 0
            with context(settings) as ctx:
                for d in self.devices:
                    after = "0"
                    while page := ctx.store.events_page(d.device_id, count=1000, after=after):
                        for e in page:
                            try:
                                doc = json.loads(ctx.keyring.decrypt(d.device_id, e.event_id, e.payload))
                                k = (d.device_id, int(doc["seq"]))
                                seqs[k] += 1
                                when.setdefault(k, []).append(e.received_us / 1e6 - self.t0_wall)
                            except (IotVaultError, ValueError, KeyError):
                                r.undecryptable += 1
                        after = page[-1].event_id
            r.stored = sum(seqs.values())
            if r.stored >= r.acknowledged or time.monotonic() > deadline:
                break
            time.sleep(1)
        resent = {(d.device_id, s) for d in self.devices for s in d.resent_seqs} if self.external else set()
        r.broker_resends = sum(n - 1 for k, n in seqs.items() if n > 1 and k in resent)
        r.duplicates = sum(n - 1 for k, n in seqs.items() if n > 1 and k not in resent)
        dupes = sorted(k for k, n in seqs.items() if n > 1 and k not in resent)
        if dupes:
            r.problems.append(
                "stored twice, e.g. "
                + ", ".join(f"{k} at {', '.join(f'{t:.1f}s' for t in when[k])}" for k in dupes[:5])
            )
        lost = sorted((d.device_id, s) for d in self.devices for s in d.acked if (d.device_id, s) not in seqs)
        r.lost = len(lost)
        if lost:
            r.problems.append(f"lost, e.g. {lost[:3]} … {lost[-3:]}")
        if not all(d.done for d in self.devices):
            r.problems.append(f"{sum(len(d.unacked) for d in self.devices)} events never acknowledged")


# ---- the two scenarios ------------------------------------------------------------------
def _hold_lock(url: str, table: str, seconds: float) -> threading.Thread:
    import psycopg  # noqa: PLC0415 - the postgres extra

    locked = threading.Event()

    def hold() -> None:
        with psycopg.connect(url) as conn:
            conn.execute(f"LOCK TABLE {table} IN SHARE MODE")
            locked.set()
            time.sleep(seconds)
            conn.rollback()

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    locked.wait(10)
    return t


def _writable_by_mosquitto(workdir: Path) -> None:
    """Mosquitto started as root drops to the ``mosquitto`` user: its persistence directory
    (and the way to it) must be open to that user, or it silently keeps nothing on disk and a
    restart loses the ingest session with its queued messages."""
    workdir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return
    for parent in [workdir, *workdir.parents]:
        if parent == Path(tempfile.gettempdir()):
            break
        parent.chmod(parent.stat().st_mode | 0o755)
    with contextlib.suppress(LookupError, OSError):
        shutil.chown(workdir, "mosquitto")


def external_scenario(plan: Plan, workdir: Path) -> Report:
    if mosquitto_binary() is None:
        raise ServiceMissingError("the mosquitto binary is not installed")
    try:
        pg = PrivatePostgres()
    except PrivatePostgresError as exc:
        raise ServiceMissingError(str(exc)) from None
    mosq = Mosquitto(workdir / "mosquitto", free_port())
    _writable_by_mosquitto(mosq.workdir)
    with pg:
        url = pg.create_database("faults", lock_timeout="2s")
        mosq.start()
        try:
            sc = Scenario(
                "external",
                plan,
                workdir,
                {"IOTVAULT_DATABASE_URL": url, "IOTVAULT_BROKER_URL": f"mqtt://127.0.0.1:{mosq.port}"},
            )
            sc.register(mosq.port, with_passwords=False)
            sc.node.start()  # subscribed before the devices publish

            def faults(s: Scenario) -> None:
                step = plan.seconds / (5 + plan.kills)
                s.kill_and_restart(plan.kills, step)
                time.sleep(step)
                s.fault(f"LOCK TABLE events IN SHARE MODE for {plan.lock_s:.0f}s")
                started = time.monotonic()
                _hold_lock(url, "events", plan.lock_s).join()
                s.outage("ingest", started)  # its commits time out on the lock
                s.fault(f"LOCK TABLE devices IN SHARE MODE for {plan.lock_s:.0f}s")
                _hold_lock(url, "devices", plan.lock_s).join()
                time.sleep(step / 2)
                mosq.stop()
                started = time.monotonic()
                s.fault("Mosquitto stopped")
                time.sleep(1)
                mosq.start()
                s.outage("broker", started)
                s.fault("Mosquitto started")
                time.sleep(step / 2)
                pg.stop()
                started = time.monotonic()
                s.fault(f"PostgreSQL stopped for {plan.outage_s:.0f}s")
                time.sleep(plan.outage_s)
                pg.start()
                s.outage("database", started)
                s.fault("PostgreSQL started")
                time.sleep(step)
                s.sigterm_with_streams()

            try:
                return sc.run(faults)
            finally:
                sc.node.stop()
        finally:
            mosq.stop()


@contextlib.contextmanager
def small_disk(workdir: Path, size_mb: int) -> Iterator[Path]:
    where = workdir / "small"
    where.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise ServiceMissingError(
            f"cannot mount a small tmpfs (needs root): {done.stderr.decode().strip()[:200]}"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def embedded_scenario(plan: Plan, workdir: Path) -> Report:
    with small_disk(workdir, 24) as disk:
        sc = Scenario("embedded", plan, workdir, {"IOTVAULT_DATA_DIR": str(disk / "data")})
        sc.register(int(sc.env["IOTVAULT_MQTT_PORT"]), with_passwords=True)
        sc.node.start()

        def faults(s: Scenario) -> None:
            step = plan.seconds / (3 + plan.kills)
            s.kill_and_restart(plan.kills, step)
            time.sleep(step)
            filler = disk / "filler"
            with filler.open("wb") as fh, contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * (1 << 20))
            started = time.monotonic()
            s.fault(f"disk full for {plan.disk_full_s:.0f}s")
            time.sleep(plan.disk_full_s)
            filler.unlink()
            s.outage("disk full", started)
            s.fault("disk space freed")
            time.sleep(step)
            s.sigterm_with_streams()

        try:
            return sc.run(faults)
        finally:
            sc.node.stop()


def run(plan: Plan, scenarios: list[str], *, keep: bool = False) -> list[Report]:
    reports = []
    root = Path(tempfile.mkdtemp(prefix="iotvault-faults-"))
    if keep:
        print(f"logs kept in {root}")
    try:
        for name in scenarios:
            fn = {"external": external_scenario, "embedded": embedded_scenario}[name]
            try:
                reports.append(fn(plan, root / name))
            except ServiceMissingError:
                raise
            except FaultRunError as exc:
                r = Report(name)
                r.problems.append(str(exc))
                reports.append(r)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the short version (as in the test suite)")
    parser.add_argument("--scenario", action="append", choices=["external", "embedded"], help="default: both")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data of the run")
    args = parser.parse_args(argv)
    plan = SHORT if args.short else LONG
    try:
        reports = run(plan, args.scenario or ["external", "embedded"], keep=args.keep)
    except ServiceMissingError as exc:
        print(f"faults: cannot run: {exc}")
        return 2
    for r in reports:
        r.print()
    ok = all(r.ok for r in reports)
    print("\nfaults: " + ("every scenario OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
