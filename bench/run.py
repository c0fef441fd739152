"""``python -m bench``: iotvault's speed on this machine, each figure beside a same-run baseline.

What runs, for each case (database x broker):

1. a fresh database (SQLite file, or a throwaway PostgreSQL database that is dropped after)
   with N devices registered through ``register_device`` (real credentials, which the
   publishers present when they connect);
2. the **baseline**: iotvault's own MQTT transport with a pipeline that acknowledges at once
   (:mod:`bench.ackonly`), fed by the publishers; its rate is events / (last acknowledgement -
   first publish);
3. **iotvault**: ``python -m iotvault serve`` on the same database and a fresh broker, fed by
   the same publishers; its rate is rows committed / (time the last row was seen committed -
   first publish), and the row count must equal the number published, exactly;
4. for the API cases, with ingest offered at half the rate just measured: the same load
   generator and concurrency against ``GET /healthz`` and ``GET /iotf/devices/{id}?count=50``
   with a bearer token from an external issuer (:class:`bench.services.Issuer`); then the
   same against a second server process with ``--role api`` on the same database, the
   first one still ingesting (``--no-api-split`` skips that).

Then the cost of field encryption against raw AES-GCM (:mod:`bench.crypto`). Publishers,
baseline subscribers and the load generator are separate processes; the CPU of each is
printed beside every rate. ``--soak MINUTES`` instead runs one case at a steady rate and
samples the resident memory of the server and its audit writer. ``--smoke`` runs two cases (both brokers, both
databases) with tiny counts, to check the harness (tests/integration/test_bench_smoke.py), not
the speed. ``--profile DIR`` records the server with py-spy (:mod:`bench.pyspy`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import cluster, crypto
from bench.pyspy import Recorder
from bench.reads import Hello, find, history_paths, page_events, versus
from bench.services import (
    BenchError,
    Child,
    Issuer,
    Mosquitto,
    Server,
    base_env,
    free_port,
    mosquitto_binary,
    mosquitto_version,
    pg_available,
    pg_version,
    publish_once,
    tail,
    throwaway_pg_database,
)
from bench.stats import CpuWindow, family, fmt_cpu, machine, memory, mib
from iotvault.config import load_settings

AUDIENCE = "iotvault-bench"
GROUP = "bench-readers"
TYPE_ID = "bench"
PROBE = "bench-probe"
CASES = ("sqlite/mosquitto", "postgres/mosquitto", "sqlite/embedded", "postgres/embedded")

TARGETS = {
    "ingest_events_s": 10_000,
    "ingest_ratio": 0.5,
    "api_p99_ms": 25.0,
    "api_throughput_ratio": 0.25,
    "crypto_ratio": 2.0,
    "history_events_s": 50_000,
}


@dataclass
class Config:
    devices: int = 200
    publishers: int = 2
    window: int = 50
    events: int = 60_000
    api_cases: tuple[str, ...] = ("sqlite/mosquitto", "postgres/mosquitto")
    api_connections: int = 10
    api_split: bool = True
    api_warmup_s: float = 2.0
    api_seconds: float = 10.0
    api_ingest_rate: float = 5000.0  # events/s offered while the API is measured; 0: half the max
    crypto_number: int = 20_000
    crypto_repeat: int = 5
    cases: tuple[str, ...] = CASES
    soak_minutes: float = 0.0
    soak_case: str = "sqlite/mosquitto"
    soak_rate: float = 0.0
    soak_interval_s: float = 5.0
    keep: bool = False
    smoke: bool = False
    repeat: int = 1
    profile: Path | None = None
    profile_threads: bool = False
    server_settings: dict[str, str] = field(default_factory=dict)
    cluster: bool = True  # bench.cluster: one and two ingest nodes, fan-out latency across nodes
    cluster_fanout_events: int = 1000

    @property
    def per_device(self) -> int:
        return max(1, math.ceil(self.events / self.devices))

    @property
    def total(self) -> int:
        return self.per_device * self.devices


SMOKE = {
    "smoke": True,
    "devices": 4,
    "events": 200,
    "window": 10,
    "api_warmup_s": 0.2,
    "api_seconds": 0.5,
    "api_connections": 2,
    "crypto_number": 300,
    "crypto_repeat": 2,
    "api_cases": ("sqlite/mosquitto", "postgres/embedded"),
    "cases": ("sqlite/mosquitto", "postgres/embedded"),  # both brokers, both databases
    "cluster": False,  # its own smoke: python -m bench.cluster --smoke
}


# ---- results ----------------------------------------------------------------------------
@dataclass
class Rate:
    events: int
    seconds: float
    cpu: dict[str, float]
    others: list[tuple[str, float]] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class ApiFigure:
    endpoint: str
    requests: int
    ok: int
    p50_ms: float
    p99_ms: float
    rps: float
    cpu: dict[str, float]
    ingest_per_s: float
    others: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class CaseResult:
    case: str
    baseline: Rate | None = None
    iotvault: Rate | None = None
    stored: int = 0
    published: int = 0
    peak_rss: int | None = None
    batches: int = 0
    api: list[ApiFigure] = field(default_factory=list)
    api_idle: list[ApiFigure] = field(default_factory=list)  # no ingest meanwhile
    history_page_events: float = 0.0  # events in one history-1000 page (bench.reads)
    api_split: list[ApiFigure] = field(default_factory=list)  # the API in a process of its own
    api_ingest_target: float = 0.0
    error: str | None = None
    skipped: str | None = None
    all_runs: list[tuple[float, float]] = field(default_factory=list)  # (iotvault, baseline) per run


def say(line: str = "") -> None:
    print(line, flush=True)


# ---- the database, seen from outside the server -----------------------------------------
_STATUS_SQLITE = "SELECT status FROM devices WHERE device_id = ?"
_STATUS_PG = "SELECT status FROM devices WHERE device_id = %s"


class Db:
    """Counts committed rows and reads the probe device's status, from a connection of ours."""

    def __init__(self, kind: str, url: str | None, data_dir: Path) -> None:
        self.kind = kind
        self.url = url
        self._sqlite: sqlite3.Connection | None = None
        self._pg: Any = None
        self._path = data_dir / "iotvault.db"

    def _conn(self) -> Any:
        if self.kind == "sqlite":
            if self._sqlite is None:
                self._sqlite = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, timeout=30)
            return self._sqlite
        if self._pg is None:
            import psycopg  # noqa: PLC0415

            self._pg = psycopg.connect(str(self.url), autocommit=True)
        return self._pg

    def count(self) -> int:
        row = self._conn().execute("SELECT count(*) FROM events").fetchone()
        return int(row[0])

    def status(self, device_id: str) -> str | None:
        q = _STATUS_SQLITE if self.kind == "sqlite" else _STATUS_PG
        row = self._conn().execute(q, (device_id,)).fetchone()
        return str(row[0]) if row else None

    def pg_pids(self) -> list[int]:
        """The PostgreSQL processes serving this database, and the writers of the WAL."""
        if self.kind != "postgres":
            return []
        rows = (
            self._conn()
            .execute(
                "SELECT pid FROM pg_stat_activity WHERE (datname = current_database() AND "
                "pid <> pg_backend_pid()) OR backend_type IN "
                "('walwriter', 'checkpointer', 'background writer')"
            )
            .fetchall()
        )
        return [int(r[0]) for r in rows]

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pg is not None:
            self._pg.close()


@contextlib.contextmanager
def database(kind: str) -> Iterator[str | None]:
    if kind == "sqlite":
        yield None  # the default: <data dir>/iotvault.db
    else:
        with throwaway_pg_database() as url:
            yield url


# ---- load -------------------------------------------------------------------------------
def start_publishers(
    cfg: Config, *, workdir: Path, port: int, creds: list[tuple[str, str, str]], per_device: int, rate: float
) -> list[Child]:
    pubs = []
    n = min(cfg.publishers, len(creds))
    for i in range(n):
        child = Child(f"publisher-{i}", "bench.publisher", [], base_env(), workdir / f"publisher-{i}.log")
        spec = {
            "host": "127.0.0.1",
            "port": port,
            "window": cfg.window,
            "rate": rate / n if rate > 0 else 0,
            "devices": creds[i::n],
            "per_device": per_device,
            "seed": i + 1,
            "timeout": 900,
        }
        child.send(json.dumps(spec))
        pubs.append(child)
    try:
        for p in pubs:
            p.expect("ready", 120)
    except BaseException:
        for p in pubs:
            p.stop(timeout=5)
        raise
    return pubs


def go(pubs: list[Child]) -> None:
    for p in pubs:
        p.send("go")


def collect(pubs: list[Child], timeout: float) -> list[dict[str, Any]]:
    results = [p.expect("sent", timeout) for p in pubs]
    for p in pubs:
        p.stop()
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        raise BenchError(f"publisher failed: {errors[0]}")
    return results


def probe(port: int, password: str, seen: Callable[[], bool], what: str) -> None:
    """Publish a status message until ``seen()``: the subscription or hook is in place."""
    topic = f"iot-2/type/{TYPE_ID}/id/{PROBE}/mon"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        publish_once(port, PROBE, password, topic, b'{"status":"connected"}')
        for _ in range(10):
            if seen():
                return
            time.sleep(0.02)
    raise BenchError(f"{what}: the probe message never arrived")


@contextlib.contextmanager
def profiled(cfg: Config, pid: int, name: str) -> Iterator[None]:
    """py-spy on ``pid`` for the duration, when ``--profile DIR`` was given."""
    if cfg.profile is None:
        yield
        return
    rec = Recorder(pid, cfg.profile / f"{name.replace('/', '-')}.txt", threads=cfg.profile_threads)
    rec.start()
    time.sleep(0.5)  # py-spy attaches
    try:
        yield
    finally:
        rec.stop()


def deadline_for(events: int) -> float:
    return max(60.0, events / 500)


# ---- one case ---------------------------------------------------------------------------
def server_env(
    workdir: Path, url: str | None, broker_url: str, issuer: Issuer, settings: dict[str, str]
) -> dict[str, str]:
    env = base_env()
    env.update(
        {
            "IOTVAULT_DATA_DIR": str(workdir / "data"),
            "IOTVAULT_HTTP_PORT": str(free_port()),
            "IOTVAULT_MQTT_PORT": str(free_port()),
            "IOTVAULT_BROKER_URL": broker_url,
            "IOTVAULT_LOG_LEVEL": "warning",
            # the benchmark measures the limiter's cost on every request, not its refusals
            "IOTVAULT_RATE_LIMIT_PER_IP": "1000000000/minute",
            "IOTVAULT_RATE_LIMIT_PER_PRINCIPAL": "1000000000/minute",
            "IOTVAULT_OIDC_EXTERNAL_ISSUER": issuer.url,
            "IOTVAULT_OIDC_EXTERNAL_AUDIENCE": AUDIENCE,
        }
    )
    if url:
        env["IOTVAULT_DATABASE_URL"] = url
    env.update({f"IOTVAULT_{k.upper()}": v for k, v in settings.items()})
    return env


def register(env: dict[str, str], n: int) -> tuple[list[tuple[str, str, str]], str]:
    """N devices with real credentials, a probe device, and a group that may read them all."""
    from iotvault.accounts import create_group  # noqa: PLC0415
    from iotvault.context import context  # noqa: PLC0415
    from iotvault.devices import register_device  # noqa: PLC0415
    from iotvault.domain.accounts import Roles  # noqa: PLC0415

    with context(load_settings(environ=env)) as ctx:
        creds = []
        for i in range(n):
            d = register_device(ctx, TYPE_ID, f"bench-{i:04d}")
            creds.append((d.device_id, d.type_id, d.credential))
        probe_cred = register_device(ctx, TYPE_ID, PROBE).credential
        create_group(ctx, GROUP, roles=Roles(reader=True), devices=[c[0] for c in creds])
    return creds, probe_cred


def operator_auth(env: dict[str, str]) -> dict[str, str]:
    """Basic credentials of a new administrator's API key: ``/metrics`` needs ``metrics:read``."""
    import base64  # noqa: PLC0415

    from iotvault.accounts import create_api_key  # noqa: PLC0415
    from iotvault.context import context  # noqa: PLC0415
    from iotvault.domain.accounts import Roles  # noqa: PLC0415

    with context(load_settings(environ=env)) as ctx:
        key = create_api_key(ctx, roles=Roles(admin=True), created_by="bench")
    return {"Authorization": "Basic " + base64.b64encode(f"{key.key}:{key.password}".encode()).decode()}


def mqtt_port(env: dict[str, str], mosq: Mosquitto | None) -> int:
    return mosq.port if mosq is not None else int(env["IOTVAULT_MQTT_PORT"])


def run_baseline(
    cfg: Config,
    case: str,
    *,
    workdir: Path,
    env: dict[str, str],
    broker: str,
    creds: list[tuple[str, str, str]],
    probe_pw: str,
) -> Rate:
    with contextlib.ExitStack() as stack:
        env = dict(env)
        mosq = None
        if broker == "mosquitto":
            mosq = stack.enter_context(Mosquitto(workdir / "mosquitto-baseline"))
            env["IOTVAULT_BROKER_URL"] = f"mqtt://127.0.0.1:{mosq.port}"
        env["IOTVAULT_MQTT_PORT"] = str(free_port())
        ack = Child("ack-only", "bench.ackonly", [str(cfg.total)], env, workdir / "ackonly.log")
        stack.callback(ack.stop)
        ack.expect("ready", 60)
        port = mqtt_port(env, mosq)
        probed = [False]

        def probe_seen() -> bool:
            probed[0] = probed[0] or ack.poll("probe") is not None
            return probed[0]

        probe(port, probe_pw, probe_seen, "ack-only")
        pubs = start_publishers(
            cfg, workdir=workdir, port=port, creds=creds, per_device=cfg.per_device, rate=0
        )
        for pub in pubs:
            stack.callback(pub.stop, timeout=5)
        groups: dict[str, Callable[[], list[int]]] = {"ack-only": lambda: [ack.pid]}
        if mosq is not None and mosq.proc is not None:
            groups["mosquitto"] = lambda: [mosq.proc.pid] if mosq.proc else []
        groups["harness"] = lambda: [os.getpid()]
        cpu = CpuWindow(groups)
        with profiled(cfg, ack.pid, f"{case}-ackonly"):
            cpu.start()
            go(pubs)
            done = ack.expect("done", deadline_for(cfg.total))
            cpu.stop()
        results = collect(pubs, 60)
        cpu.add("publishers", sum(r["cpu_s"] for r in results), [p.pid for p in pubs])
        t_first = min(r["t_first"] for r in results)
        return Rate(cfg.total, done["t_last"] - t_first, cpu.percents(), cpu.others())


def run_case(cfg: Config, case: str, root: Path, issuer: Issuer) -> CaseResult:  # noqa: PLR0915 - one story
    db_kind, broker = case.split("/")
    res = CaseResult(case)
    workdir = root / case.replace("/", "-")
    workdir.mkdir(parents=True)
    with database(db_kind) as url, contextlib.ExitStack() as stack:
        env = server_env(workdir, url, "embedded", issuer, cfg.server_settings)
        creds, probe_pw = register(env, cfg.devices)
        # the baseline and the real run each get a fresh broker (Mosquitto, or the embedded one)
        res.baseline = run_baseline(
            cfg, case, workdir=workdir, env=env, broker=broker, creds=creds, probe_pw=probe_pw
        )
        say(f"  {case}: ack-only baseline {res.baseline.per_s:,.0f} events/s")

        mosq = None
        if broker == "mosquitto":
            mosq = stack.enter_context(Mosquitto(workdir / "mosquitto"))
            env["IOTVAULT_BROKER_URL"] = f"mqtt://127.0.0.1:{mosq.port}"
        env["IOTVAULT_MQTT_PORT"] = str(free_port())
        db = Db(db_kind, url, workdir / "data")
        stack.callback(db.close)
        server = stack.enter_context(Server(env, workdir / "iotvault.log"))
        port = mqtt_port(env, mosq)
        probe(port, probe_pw, lambda: db.status(PROBE) == "online", "iotvault")

        pubs = start_publishers(
            cfg, workdir=workdir, port=port, creds=creds, per_device=cfg.per_device, rate=0
        )
        for pub in pubs:
            stack.callback(pub.stop, timeout=5)
        groups: dict[str, Callable[[], list[int]]] = {"iotvault": lambda: family(server.pid)}
        if mosq is not None:
            groups["mosquitto"] = lambda: [mosq.proc.pid] if mosq.proc else []
        if db_kind == "postgres":
            groups["postgres"] = db.pg_pids
        groups["harness"] = lambda: [os.getpid()]
        cpu = CpuWindow(groups)
        n = cfg.total
        prof = stack.enter_context(contextlib.ExitStack())
        prof.enter_context(profiled(cfg, server.pid, f"{case}-ingest"))
        cpu.start()
        go(pubs)
        t_go = time.monotonic()
        deadline = t_go + deadline_for(n)
        seen, t_end, last_sample = 0, 0.0, t_go
        while time.monotonic() < deadline:
            if server.proc is None or server.proc.poll() is not None:
                raise BenchError(f"{case}: iotvault exited during the run:\n{tail(server.log)}")
            t_query = time.monotonic()
            seen = db.count()
            if seen >= n:
                t_end = t_query  # the last commit happened before this query's snapshot
                break
            now = time.monotonic()
            if now - last_sample > 1.0:
                cpu.sample()
                last_sample = now
            rate = seen / max(1e-3, now - t_go)
            # poll rarely while far from the end, often near it: ~1% of the run's length
            eta = (n - seen) / rate if rate > 0 else 1.0
            time.sleep(min(0.25, max(0.005, eta / 4)))
        cpu.stop()
        prof.close()
        if not t_end:
            raise BenchError(f"{case}: only {seen} of {n} events stored after {deadline - t_go:.0f}s")
        results = collect(pubs, 60)
        cpu.add("publishers", sum(r["cpu_s"] for r in results), [p.pid for p in pubs])
        t_first = min(r["t_first"] for r in results)
        res.iotvault = Rate(n, t_end - t_first, cpu.percents(), cpu.others())
        res.published = sum(r["acked"] for r in results)
        time.sleep(1.0)  # anything stored twice would show up now
        res.stored = db.count()
        _, res.peak_rss = memory(server.pid)
        res.batches = _metric(
            int(env["IOTVAULT_HTTP_PORT"]), "iotvault_ingest_batches_total", operator_auth(env)
        )
        if res.stored != n or res.published != n:
            raise BenchError(f"{case}: published {res.published}, stored {res.stored}, expected {n}")
        say(
            f"  {case}: iotvault {res.iotvault.per_s:,.0f} events/s durable "
            f"({res.stored}/{n} rows), peak RSS {mib(res.peak_rss)}"
        )
        if case in cfg.api_cases:
            run_api(
                cfg,
                res,
                workdir=workdir,
                env=env,
                server=server,
                db=db,
                groups=groups,
                creds=creds,
                issuer=issuer,
                port=port,
            )
    return res


def _metric(http_port: int, name: str, auth: dict[str, str]) -> int:
    status, body = _get(f"http://127.0.0.1:{http_port}/metrics", auth)
    if status != 200:
        raise BenchError(f"/metrics answered {status}")
    for line in body.decode(errors="replace").splitlines():
        if line.startswith((name + " ", name + "{")):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def _get(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers)  # noqa: S310 - a loopback http:// URL of ours
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - as above
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def run_api(
    cfg: Config,
    res: CaseResult,
    *,
    workdir: Path,
    env: dict[str, str],
    server: Server,
    db: Db,
    groups: dict[str, Callable[[], list[int]]],
    creds: list[tuple[str, str, str]],
    issuer: Issuer,
    port: int,
) -> None:
    if res.iotvault is None:
        raise BenchError("the API benchmark needs the ingest rate first")
    http_port = int(env["IOTVAULT_HTTP_PORT"])
    token = issuer.token(groups=[GROUP], preferred_username="bench-reader", lifetime_s=3600)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    devices = [c[0] for c in creds[:50]]
    status, body = _get(f"http://127.0.0.1:{http_port}/iotf/devices/{devices[0]}?count=50", headers)
    if status != 200 or len(json.loads(body)["events"]) != min(50, cfg.per_device):
        raise BenchError(f"GET /iotf/devices/{{id}}: {status} {body[:300]!r}")

    rate = min(cfg.api_ingest_rate, res.iotvault.per_s) or res.iotvault.per_s / 2
    res.api_ingest_target = rate
    full = fill_history(cfg, workdir=workdir, port=port, creds=creds, db=db)
    # the same-run baseline (bench.reads): measured right before the iotvault figures, each phase
    hello = Hello(workdir)
    endpoints = {
        "hello": ["/"],
        "healthz": ["/healthz"],
        "last-50": [f"/iotf/devices/{d}?count=50" for d in devices],
        "history-1000": history_paths(full),
    }
    res.history_page_events = page_events(http_port, endpoints["history-1000"], headers)

    def phase(
        server_pid: int,
        api_port: int,
        suffix: str,
        phase_groups: dict[str, Callable[[], list[int]]],
        *,
        offered: float = rate,
        names: tuple[str, ...] = ("hello", "healthz", "last-50"),
    ) -> list[ApiFigure]:
        """Ingest at ``offered`` events/s (none: idle), fresh publishers; each endpoint in turn."""
        span = len(names) * (cfg.api_warmup_s + cfg.api_seconds) + 15
        per_device = max(1, math.ceil(offered * span / len(creds)))
        pubs = (
            start_publishers(
                cfg, workdir=workdir, port=port, creds=creds, per_device=per_device, rate=offered
            )
            if offered > 0
            else []
        )
        load_groups = {
            **phase_groups,
            "publishers": lambda: [p.pid for p in pubs],
            "hello": lambda: [hello.pid],
        }
        try:
            go(pubs)
            if pubs:
                time.sleep(min(2.0, cfg.api_warmup_s))
            return [
                measure_endpoint(
                    cfg,
                    res.case,
                    name + suffix,
                    endpoints[name],
                    hello.port if name == "hello" else api_port,
                    headers,
                    server_pid,
                    load_groups,
                    db,
                    workdir,
                )
                for name in names
            ]
        finally:
            for p in pubs:
                p.stop(timeout=5)
            drain(db)  # what the broker kept while ingest fell behind must not spill into the next

    with hello:
        res.api_idle = phase(
            server.pid, http_port, " (idle)", groups, offered=0.0, names=("hello", "last-50", "history-1000")
        )
        res.api = phase(server.pid, http_port, "", groups)
        if cfg.api_split:
            run_api_split(res, env, workdir, groups, phase)


HISTORY_DEVICES = 10


def fill_history(
    cfg: Config, *, workdir: Path, port: int, creds: list[tuple[str, str, str]], db: Db
) -> list[str]:
    """Devices whose history holds a full ``count=1000`` page, as the target counts it.

    The ingest run leaves ``per_device`` events a device (100 by default): a history read of
    one of those serves 100 events for the cost of a request. The history figure reads the
    first devices, topped up to a page and a half first (2 devices, 30 events with ``--smoke``).
    """
    n, page = (2, 20) if cfg.smoke else (HISTORY_DEVICES, 1000)
    chosen = creds[:n]
    more = page + page // 2 - cfg.per_device
    if more > 0:
        pubs = start_publishers(cfg, workdir=workdir, port=port, creds=chosen, per_device=more, rate=0)
        go(pubs)
        collect(pubs, 300)
        drain(db)
    return [c[0] for c in chosen]


def run_api_split(
    res: CaseResult,
    env: dict[str, str],
    workdir: Path,
    groups: dict[str, Callable[[], list[int]]],
    phase: Callable[..., list[ApiFigure]],
) -> None:
    # the same, against a second process serving only HTTP (`iotvault serve --role api`) on
    # the same database, while the first one goes on ingesting: the API with a GIL of its own
    api_env = dict(env, IOTVAULT_HTTP_PORT=str(free_port()))
    api_env.pop("IOTVAULT_API_PROCESSES", None)  # --set api_processes=N: for the first node only
    with Server(api_env, workdir / "iotvault-api.log", role="api") as api_server:
        res.api_split = phase(
            api_server.pid,
            int(api_env["IOTVAULT_HTTP_PORT"]),
            " (--role api)",
            {"iotvault-api": lambda: family(api_server.pid), **groups},  # with its audit writer
        )


def drain(db: Db, quiet_s: float = 1.0, timeout: float = 120.0) -> None:
    """Wait until no more rows arrive: the broker's backlog is stored."""
    deadline = time.monotonic() + timeout
    last, since = db.count(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.1)
        n = db.count()
        if n != last:
            last, since = n, time.monotonic()


def measure_endpoint(  # noqa: PLR0917 - one measurement, described by its arguments
    cfg: Config,
    case: str,
    name: str,
    paths: list[str],
    http_port: int,
    headers: dict[str, str],
    server_pid: int,
    groups: dict[str, Callable[[], list[int]]],
    db: Db,
    workdir: Path,
) -> ApiFigure:
    """One endpoint under the load generator: latency, throughput, and the ingest meanwhile."""
    tag = name.split(" ", maxsplit=1)[0]
    lg = Child(f"loadgen-{tag}", "bench.loadgen", [], base_env(), workdir / f"loadgen-{tag}.log")
    try:
        lg.send(
            json.dumps(
                {
                    "host": "127.0.0.1",
                    "port": http_port,
                    "paths": paths,
                    "headers": headers,
                    "concurrency": cfg.api_connections,
                    "warmup_s": cfg.api_warmup_s,
                    "duration_s": cfg.api_seconds,
                }
            )
        )
        lg.expect("ready", 30)
        cpu = CpuWindow({**groups, "loadgen": lambda: [lg.pid]})
        lg.send("go")
        time.sleep(cfg.api_warmup_s)
        c0, t0 = db.count(), time.monotonic()
        with profiled(cfg, server_pid, f"{case}-api-{name.replace(' ', '')}"):
            cpu.start()
            out = lg.expect("requests", cfg.api_warmup_s + cfg.api_seconds + 60)
            cpu.stop()
        ingested = (db.count() - c0) / (time.monotonic() - t0)
    finally:
        lg.stop()
    if out["failures"]:
        raise BenchError(f"load generator: {out['failures'][0]}")
    fig = ApiFigure(
        name,
        out["requests"],
        out["ok"],
        out["p50_ms"],
        out["p99_ms"],
        out["rps"],
        cpu.percents(),
        ingested,
        cpu.others(),
    )
    say(
        f"  {case}: API {name} p50 {fig.p50_ms:.1f} ms, p99 {fig.p99_ms:.1f} ms, "
        f"{fig.rps:,.0f} req/s ({fig.ok}/{fig.requests} 2xx); ingest meanwhile {ingested:,.0f} events/s"
    )
    return fig


# ---- soak -------------------------------------------------------------------------------
def run_soak(cfg: Config, root: Path, issuer: Issuer) -> None:
    db_kind, broker = cfg.soak_case.split("/")
    workdir = root / "soak"
    workdir.mkdir(parents=True)
    with database(db_kind) as url, contextlib.ExitStack() as stack:
        env = server_env(workdir, url, "embedded", issuer, cfg.server_settings)
        creds, probe_pw = register(env, cfg.devices)
        mosq = None
        if broker == "mosquitto":
            mosq = stack.enter_context(Mosquitto(workdir / "mosquitto"))
            env["IOTVAULT_BROKER_URL"] = f"mqtt://127.0.0.1:{mosq.port}"
        db = Db(db_kind, url, workdir / "data")
        stack.callback(db.close)
        server = stack.enter_context(Server(env, workdir / "iotvault.log"))
        port = mqtt_port(env, mosq)
        probe(port, probe_pw, lambda: db.status(PROBE) == "online", "iotvault")
        rate = cfg.soak_rate
        seconds = cfg.soak_minutes * 60
        per_device = max(1, math.ceil(rate * (seconds + 30) / len(creds)))
        pubs = start_publishers(
            cfg, workdir=workdir, port=port, creds=creds, per_device=per_device, rate=rate
        )
        for pub in pubs:
            stack.callback(pub.stop, timeout=5)
        say(
            f"soak {cfg.soak_case}: {rate:,.0f} events/s for {cfg.soak_minutes:g} min, "
            f"RSS every {cfg.soak_interval_s:g}s"
        )
        samples: list[tuple[float, int]] = []
        t0 = time.monotonic()
        go(pubs)
        c0 = db.count()
        while (t := time.monotonic() - t0) < seconds:
            time.sleep(min(cfg.soak_interval_s, max(0.0, seconds - t)))
            rss, _ = memory(server.pid)
            n = db.count()
            if rss is None:
                raise BenchError("the server is gone")
            # the node's own processes count too: its audit writer holds memory of its own
            children = sum(memory(pid)[0] or 0 for pid in family(server.pid)[1:])
            samples.append((time.monotonic() - t0, rss + children))
            say(
                f"soak t={samples[-1][0]:6.0f}s  RSS {mib(rss + children):>8} "
                f"(server {mib(rss)}, its children {mib(children)})  rows {n:,}  "
                f"({(n - c0) / samples[-1][0]:,.0f}/s)"
            )
        _, hwm = memory(server.pid)
    if len(samples) >= 4:
        # ingest's dedupe index holds each message for ingest_dedupe_window_s (120 s): memory
        # grows until then by design; "flat" is judged on the second half of the run
        half = [s for s in samples if s[0] >= samples[-1][0] / 2]
        xs, ys = [s[0] / 60 for s in half], [s[1] / 2**20 for s in half]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / max(
            1e-9, sum((x - mx) ** 2 for x in xs)
        )
        say(
            f"soak: RSS first {mib(samples[0][1])}, at half time {mib(half[0][1])}, "
            f"last {mib(samples[-1][1])}, server peak {mib(hwm)}; "
            f"second half: min {mib(min(s[1] for s in half))}, "
            f"max {mib(max(s[1] for s in half))}, slope {slope:+.2f} MiB/min"
        )


# ---- report -----------------------------------------------------------------------------
def _us_per_event(rate: Rate, process: str) -> str:
    """CPU time of one process per event: steadier than a rate on a machine others also use."""
    return f"{rate.cpu.get(process, 0.0) / 100 * rate.seconds / rate.events * 1e6:.0f} µs"


def report(cfg: Config, results: list[CaseResult], cr: crypto.CryptoResult | None) -> list[str]:
    """Print every figure with its baseline and ratio; return the targets not met."""
    missed: list[str] = []
    say()
    say("== ingest: QoS 1 publish -> encrypted row committed -> PUBACK (durable events/s)")
    say(
        f"   {cfg.devices} devices over {cfg.publishers} publisher processes, window {cfg.window}/device, "
        f"{cfg.total:,} events, ~150-byte JSON"
    )
    for r in results:
        report_ingest(r, missed)
    for r in results:
        if len(r.api) == 3:
            report_api(cfg, r, missed)
        if len(r.api_split) == 3:
            report_api_split(r)
    if cr is not None:
        report_crypto(cfg, cr, missed)
    say()
    if cfg.smoke:
        say("== targets: not judged in a smoke run (tiny counts: the figures check the harness)")
        return []
    say("== targets: " + ("all met" if not missed else f"{len(missed)} not met"))
    for m in missed:
        say(f"   NOT met: {m}")
    return missed


def report_ingest(r: CaseResult, missed: list[str]) -> None:
    if r.skipped:
        say(f"ingest {r.case}: SKIPPED ({r.skipped})")
        return
    if r.error or r.iotvault is None or r.baseline is None:
        say(f"ingest {r.case}: FAILED ({r.error})")
        missed.append(f"ingest {r.case} failed")
        return
    ratio = r.iotvault.per_s / r.baseline.per_s
    say(
        f"ingest {r.case}: {r.iotvault.per_s:,.0f} events/s durable | ack-only baseline "
        f"{r.baseline.per_s:,.0f} events/s | ratio {ratio:.2f} | stored {r.stored}/{r.published} | "
        f"peak RSS {mib(r.peak_rss)} | {r.stored / max(1, r.batches):.0f} events/commit"
    )
    say(
        f"    server CPU per event: iotvault {_us_per_event(r.iotvault, 'iotvault')} | "
        f"ack-only {_us_per_event(r.baseline, 'ack-only')}"
    )
    if len(r.all_runs) > 1:
        say(
            "    runs (iotvault / ack-only events/s): "
            + ", ".join(f"{a:,.0f} / {b:,.0f}" for a, b in r.all_runs)
            + " — the median run is shown"
        )
    say(f"    cpu iotvault run: {fmt_cpu(r.iotvault.cpu, r.iotvault.others)}")
    say(f"    cpu baseline run: {fmt_cpu(r.baseline.cpu, r.baseline.others)}")
    if r.iotvault.per_s < TARGETS["ingest_events_s"]:
        missed.append(f"ingest {r.case} {r.iotvault.per_s:,.0f} < {TARGETS['ingest_events_s']:,} events/s")
    if ratio < TARGETS["ingest_ratio"]:
        missed.append(f"ingest {r.case} ratio {ratio:.2f} < {TARGETS['ingest_ratio']}")


def _api_lines(r: CaseResult, figures: list[ApiFigure]) -> None:
    """Each figure beside the hello baseline measured right before it (bench.reads)."""
    hello = find(figures, "hello")
    for f in figures:
        say(
            f"api {r.case} {f.endpoint}: p50 {f.p50_ms:.1f} ms | p99 {f.p99_ms:.1f} ms | {f.rps:,.0f} req/s "
            f"| {f.ok}/{f.requests} 2xx | ingest meanwhile {f.ingest_per_s:,.0f} events/s"
            + ("" if f is hello else versus(f, hello))
        )
        say(f"    cpu: {fmt_cpu(f.cpu, f.others)}")


def report_api(cfg: Config, r: CaseResult, missed: list[str]) -> None:
    hello, bare, last = r.api
    say()
    say(
        f"== API {r.case}: {cfg.api_connections} keep-alive connections, {cfg.api_seconds:g}s each; "
        "baseline: a minimal ASGI app on uvicorn (httptools, uvloop) in its own process, same load"
    )
    if len(r.api_idle) >= 2:
        say("   idle (no ingest):")
        _api_lines(r, r.api_idle)
        history = find(r.api_idle, "history-1000")
        if history is not None:
            served = history.rps * r.history_page_events
            say(
                f"api {r.case} history-1000 (idle): {r.history_page_events:,.0f} events/page -> "
                f"{served:,.0f} events/s served (target {TARGETS['history_events_s']:,})"
            )
            if served < TARGETS["history_events_s"]:
                missed.append(
                    f"API {r.case} history {served:,.0f} < {TARGETS['history_events_s']:,} events/s"
                )
        idle = r.api_idle[1]
        idle_ratio = idle.rps / r.api_idle[0].rps if r.api_idle[0].rps else float("nan")
        if idle_ratio < TARGETS["api_throughput_ratio"]:
            missed.append(
                f"API {r.case} idle last-50 / hello {idle_ratio:.3f} < {TARGETS['api_throughput_ratio']}"
            )
    say(f"   while ingest is offered ~{r.api_ingest_target:,.0f} events/s:")
    _api_lines(r, [hello, bare, last])
    if last.ingest_per_s < 0.9 * r.api_ingest_target:
        missed.append(
            f"API {r.case}: ingest during last-50 {last.ingest_per_s:,.0f} < 0.9 x "
            f"{r.api_ingest_target:,.0f} events/s offered"
        )
    tput = last.rps / bare.rps if bare.rps else float("nan")
    say(
        f"api {r.case} ratio: throughput last-50/healthz {tput:.2f} | p99 last-50/healthz "
        f"{last.p99_ms / bare.p99_ms:.1f}x"
    )
    if last.p99_ms > TARGETS["api_p99_ms"]:
        missed.append(f"API {r.case} p99 {last.p99_ms:.1f} ms > {TARGETS['api_p99_ms']:g} ms")
    if tput < TARGETS["api_throughput_ratio"]:
        missed.append(f"API {r.case} throughput ratio {tput:.2f} < {TARGETS['api_throughput_ratio']}")
    if last.ok != last.requests or bare.ok != bare.requests:
        missed.append(f"API {r.case}: non-2xx answers")


def report_api_split(r: CaseResult) -> None:
    _hello, bare, last = r.api_split
    say(
        "   the same with the API in its own process (`iotvault serve --role api`, same database), "
        "ingest going on in the first:"
    )
    _api_lines(r, r.api_split)
    tput = last.rps / bare.rps if bare.rps else float("nan")
    say(
        f"api {r.case} ratio (--role api): throughput last-50/healthz {tput:.2f} | p99 last-50/healthz "
        f"{last.p99_ms / bare.p99_ms:.1f}x"
    )


def report_crypto(cfg: Config, cr: crypto.CryptoResult, missed: list[str]) -> None:
    say()
    say(f"== crypto: seal + open one {cr.payload_bytes}-byte event (timeit, best of {cfg.crypto_repeat})")
    say(
        f"crypto: iotvault {cr.iotvault_us:.2f} µs/event | raw AESGCM {cr.raw_us:.2f} µs/event | "
        f"ratio {cr.ratio:.2f}"
    )
    say(
        f"    of which: record format {cr.record_us:.2f} µs ({cr.record_us / cr.raw_us:.2f}x raw), "
        f"key ring and cache {cr.iotvault_us - cr.record_us:.2f} µs; "
        f"the OS nonce alone {cr.nonce_us:.2f} µs"
    )
    if cr.ratio > TARGETS["crypto_ratio"]:
        missed.append(f"crypto ratio {cr.ratio:.2f} > {TARGETS['crypto_ratio']}")


def median_run(runs: list[CaseResult]) -> CaseResult:
    """The run whose iotvault rate is the median; the others' rates are kept beside it."""
    ordered = sorted(runs, key=lambda r: r.iotvault.per_s if r.iotvault else 0.0)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.all_runs = [
        (r.iotvault.per_s, r.baseline.per_s)
        for r in runs
        if r.iotvault is not None and r.baseline is not None
    ]
    return chosen


def parse(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny counts: checks the harness, not the speed")
    p.add_argument("--cases", default=None, help=f"comma-separated db/broker cases (all: {','.join(CASES)})")
    p.add_argument("--api-cases", default=None, help="cases that also run the API benchmark")
    p.add_argument("--events", type=int, default=None, help="events per ingest run")
    p.add_argument("--devices", type=int, default=None)
    p.add_argument("--publishers", type=int, default=None, help="publisher processes")
    p.add_argument("--window", type=int, default=None, help="unacknowledged PUBLISH packets per device")
    p.add_argument("--api-connections", type=int, default=None)
    p.add_argument("--api-seconds", type=float, default=None)
    p.add_argument(
        "--api-ingest-rate",
        type=float,
        default=None,
        help="events/s offered while the API is measured (default 5000; 0: half the measured maximum)",
    )
    p.add_argument("--no-crypto", action="store_true")
    p.add_argument("--no-api-split", action="store_true", help="skip the API-in-its-own-process run")
    p.add_argument("--no-cluster", action="store_true", help="skip the several-nodes part (bench.cluster)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each case N times and report the median run (shared machines)",
    )
    p.add_argument("--soak", type=float, default=0.0, metavar="MINUTES", help="memory soak instead")
    p.add_argument("--soak-case", default="sqlite/mosquitto")
    p.add_argument("--soak-rate", type=float, default=5000.0, help="events/s during the soak")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR", help="py-spy the server into DIR")
    p.add_argument(
        "--profile-threads",
        action="store_true",
        help="profile every thread, idle ones too (py-spy --idle --threads), not only the GIL holder",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an iotvault setting for the server under test, e.g. --set ingest_batch_size=1000",
    )
    a = p.parse_args(argv)
    cfg = Config(**SMOKE) if a.smoke else Config()  # type: ignore[arg-type]
    if a.cases is not None:
        cfg.cases = tuple(c.strip() for c in a.cases.split(",") if c.strip())
    unknown = [c for c in cfg.cases if c not in CASES]
    if unknown:
        p.error(f"unknown case {unknown[0]!r}; known: {', '.join(CASES)}")
    if a.api_cases is not None:
        cfg.api_cases = tuple(c.strip() for c in a.api_cases.split(",") if c.strip())
    for name in (
        "events",
        "devices",
        "publishers",
        "window",
        "api_connections",
        "api_seconds",
        "api_ingest_rate",
    ):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    cfg.soak_minutes, cfg.soak_case, cfg.soak_rate, cfg.keep = a.soak, a.soak_case, a.soak_rate, a.keep
    cfg.repeat = max(1, a.repeat)
    cfg.api_split = not a.no_api_split
    cfg.cluster = cfg.cluster and not a.no_cluster
    for item in a.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--set expects NAME=VALUE, got {item!r}")
        cfg.server_settings[name.strip().lower()] = value
    if a.profile is not None:
        a.profile.mkdir(parents=True, exist_ok=True)
        cfg.profile = a.profile.resolve()
        cfg.profile_threads = a.profile_threads
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse(argv)
    m = machine()
    say(
        f"== machine: {m['cores']} cores, {m['cpu']}, {m['ram']} RAM, {m['os']}; Python {m['python']}, "
        f"SQLite {m['sqlite']}, Mosquitto {mosquitto_version()}, PostgreSQL "
        f"{pg_version() if pg_available() is None else 'unavailable'}"
    )
    root = Path(tempfile.mkdtemp(prefix="iotvault-bench-"))
    results: list[CaseResult] = []
    cr = None
    several = None
    try:
        with Issuer(audience=AUDIENCE, subject="bench-reader") as issuer:
            if cfg.soak_minutes > 0:
                run_soak(cfg, root, issuer)
                return 0
            for case in cfg.cases:
                db_kind, broker = case.split("/")
                why = None
                if db_kind == "postgres":
                    why = pg_available()
                if broker == "mosquitto" and mosquitto_binary() is None:
                    why = "the mosquitto binary is not installed"
                if why:
                    results.append(CaseResult(case, skipped=why))
                    say(f"  {case}: SKIPPED ({why})")
                    continue
                say(f"-- {case}")
                runs: list[CaseResult] = []
                try:
                    for i in range(cfg.repeat):
                        runs.append(run_case(cfg, case, root / f"run-{i}", issuer))
                except BenchError as exc:
                    say(f"  {case}: FAILED: {exc}")
                    results.append(CaseResult(case, error=str(exc).splitlines()[0]))
                    continue
                results.append(median_run(runs))
            several = cluster.run_cluster(cfg, root, issuer) if cfg.cluster else None
        if not args.no_crypto:
            cr = crypto.measure(cfg.crypto_number, cfg.crypto_repeat)
        report(cfg, results, cr)
        cluster.report(several)
        if args.json is not None:
            doc = {
                "machine": m,
                "config": asdict(cfg),
                "cases": [asdict(r) for r in results],
                "crypto": asdict(cr) if cr else None,
            }
            args.json.write_text(json.dumps(doc, indent=2, default=str))
    finally:
        if cfg.keep:
            say(f"work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if any(r.error for r in results) or (several is not None and several.error) else 0


if __name__ == "__main__":
    sys.exit(main())
