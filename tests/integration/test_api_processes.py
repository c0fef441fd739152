"""``iotvault serve --api-processes N``: HTTP from N children on the parent's socket (iotvault.apiprocs).

Real processes on SQLite: the parent ingests (embedded broker), the children serve HTTP on
the inherited socket, and a live stream served by a child hears an MQTT event the parent
stored through the data dir's fan-out. A signal to the parent stops every process; a child
that dies is started again; a taken port or another role gets one clear line.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import ServerProcess, server_env

from gmqttclient import GmqttClient
from iotvault.accounts import create_api_key
from iotvault.apiprocs import MAX_FAILED_STARTS, ApiProcesses, ApiProcessesFailedError
from iotvault.config import load_settings
from iotvault.context import context
from iotvault.devices import register_device
from iotvault.domain.accounts import Roles
from iotvault.metrics import SnapshotFile

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _env(tmp_path: Path) -> dict[str, str]:
    env = server_env(tmp_path)
    env["IOTVAULT_DATA_DIR"] = str(tmp_path / "d")  # a Unix socket's path has ~100 bytes
    return env


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(log: Path) -> list[int]:
    return [int(p) for p in re.findall(r"API process \d+ started \(pid (\d+)\)", log.read_text())]


def _sample(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_two_api_processes_serve_stream_and_stop_with_the_parent(
    tmp_path: Path, sig: signal.Signals
) -> None:
    env = _env(tmp_path)
    with context(load_settings(environ=env)) as ctx:
        d = register_device(ctx, "thermo", "ap-1")
        key = create_api_key(ctx, roles=Roles(reader=True), devices=["ap-1"], created_by="test")
        admin = create_api_key(ctx, roles=Roles(admin=True), created_by="test")
    auth = httpx.BasicAuth(key.key, key.password)
    server = ServerProcess(env, tmp_path / "serve.log", args=("--api-processes", "2"))
    server.start(timeout=60)
    assert server.proc is not None
    parent = server.proc.pid
    try:
        kids = _children(server.log)
        assert len(kids) == 2, server.log.read_text()
        assert all(_alive(p) for p in kids)
        base = f"http://127.0.0.1:{env['IOTVAULT_HTTP_PORT']}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            for _ in range(6):  # new connections: the kernel hands them to either child
                async with httpx.AsyncClient(base_url=base, timeout=10) as one:
                    assert (await one.get("/healthz")).status_code == 200
            r = await http.get("/iotf/devices/ap-1", auth=auth)
            assert r.status_code == 200, r.text
            assert r.json()["deviceId"] == "ap-1"
            # a stream served by a child hears what the parent ingested, through the fan-out
            latencies: list[float] = []
            ready = asyncio.Event()

            async def listen() -> None:
                async with http.stream("GET", "/iotf/devices/ap-1/stream", auth=auth) as s:
                    assert s.status_code == 200
                    async for line in s.aiter_lines():
                        if line.startswith(": connected"):
                            ready.set()
                        if line.startswith("data: "):
                            latencies.append(time.time() - json.loads(line[6:])["payload"]["t"])
                            if len(latencies) == 10:
                                return

            task = asyncio.create_task(listen())
            await asyncio.wait_for(ready.wait(), 10)
            pub = GmqttClient(d.device_id)
            await pub.connect(int(env["IOTVAULT_MQTT_PORT"]), d.device_id, d.credential)
            for i in range(10):
                topic = f"iot-2/type/{d.type_id}/id/{d.device_id}/evt/r/fmt/json"
                pub.publish(topic, json.dumps({"i": i, "t": time.time()}).encode())
                await asyncio.sleep(0.05)
            await asyncio.wait_for(task, 10)
            await pub.close()
            # one scrape (of either child) shows the requests it served and what the parent ingested
            deadline, stored, lag = time.monotonic() + 5, 0.0, 0.0
            while time.monotonic() < deadline and (stored < 10 or lag < 1):
                r = await http.get("/metrics", auth=httpx.BasicAuth(admin.key, admin.password))
                assert r.status_code == 200, r.text
                stored = _sample(r.text, "iotvault_ingest_events_stored_total")
                lag = _sample(r.text, "iotvault_ingest_lag_seconds_count")
                await asyncio.sleep(0.2)
            assert stored >= 10, r.text
            assert lag >= 1, r.text
            # the answering child's own families too (it may not have timed a request of its own
            # yet: the kernel hands each new connection to either child)
            assert "# TYPE iotvault_http_request_duration_seconds histogram" in r.text
            assert "# TYPE iotvault_http_authentications_total counter" in r.text
            assert (tmp_path / "d" / SnapshotFile.NAME).stat().st_mode & 0o077 == 0
        print(f"stream on a child: max {max(latencies) * 1000:.1f} ms")
        assert max(latencies) < 1.0, latencies
        os.kill(parent, sig)
        assert server.proc.wait(timeout=60) == 0, server.log.read_text()[-3000:]
        assert _gone_within(kids, 5), f"orphans: {[p for p in kids if _alive(p)]}"
        assert not (tmp_path / "d" / SnapshotFile.NAME).exists()  # gone with the node
        server.proc = None
    finally:
        server.stop()


def test_a_child_that_dies_is_started_again(tmp_path: Path) -> None:
    env = _env(tmp_path)
    server = ServerProcess(env, tmp_path / "serve.log", args=("--api-processes", "1"))
    server.start(timeout=60)
    try:
        (first,) = _children(server.log)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while len(_children(server.log)) < 2:
            assert time.monotonic() < deadline, server.log.read_text()[-3000:]
            time.sleep(0.05)
        second = _children(server.log)[1]
        assert "exited with -9; starting it again" in server.log.read_text()
        base = f"http://127.0.0.1:{env['IOTVAULT_HTTP_PORT']}"
        while True:
            try:
                assert httpx.get(f"{base}/healthz", timeout=2).status_code == 200
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        server.stop()
        assert _gone_within([second], 5)
        assert not _alive(first)
    finally:
        server.stop()


def _serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iotvault", "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_taken_port_or_another_role_gives_one_clear_line(tmp_path: Path) -> None:
    env = _env(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["IOTVAULT_HTTP_PORT"])))
        taken.listen()
        done = _serve(env, "--api-processes", "2")
    assert done.returncode != 0
    assert "IOTVAULT_HTTP_PORT" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not list(Path(env["IOTVAULT_DATA_DIR"]).glob("fanout.*"))  # stopped before anything ran
    done = _serve(env, "--role", "api", "--api-processes", "2")
    assert done.returncode != 0
    assert "--api-processes" in done.stderr
    assert "role all only" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2, done.stderr
    done = _serve(dict(env, IOTVAULT_API_PROCESSES="17"))
    assert done.returncode != 0
    assert "IOTVAULT_API_PROCESSES" in done.stderr, done.stderr


def test_the_children_stop_when_the_parent_is_killed(tmp_path: Path) -> None:
    env = _env(tmp_path)
    server = ServerProcess(env, tmp_path / "serve.log", args=("--api-processes", "2"))
    server.start(timeout=60)
    kids = _children(server.log)
    assert len(kids) == 2
    server.kill()  # SIGKILL: no chance to stop them; the kernel tells them (Linux)
    assert _gone_within(kids, 30), f"orphans: {[p for p in kids if _alive(p)]}"


async def test_children_that_keep_dying_at_start_stop_serve_with_one_clear_error(tmp_path: Path) -> None:
    fatal: list[str] = []
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        procs = ApiProcesses(
            1,
            lambda: socket.socket(fileno=os.dup(sock.fileno())),
            ["--config", str(tmp_path / "missing.toml")],
            stop_grace_s=5,
            on_fatal=fatal.append,
        )
        started = time.monotonic()
        with pytest.raises(ApiProcessesFailedError) as caught:
            async with procs:
                pytest.fail("ready with a child that cannot start")
    assert f"died {MAX_FAILED_STARTS} times before it was ready" in str(caught.value)
    assert len(procs.pids) == 1
    assert not _alive(procs.pids[0])
    assert fatal == []  # at start the error itself stops serve; on_fatal is for later deaths
    assert time.monotonic() - started < 60


def test_ctrl_c_to_the_whole_process_group_stops_everything_without_restarts(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the parent and its children at once (one process group)."""
    env = _env(tmp_path)
    log = tmp_path / "serve.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iotvault", "serve", "--api-processes", "2"],
            env=env,
            stdout=fh,
            stderr=fh,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group, as a shell's foreground job
        )
    try:
        deadline = time.monotonic() + 60
        while "ready:" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        kids = _children(log)
        assert len(kids) == 2
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert _gone_within(kids, 5)
        assert _children(log) == kids, "a child was started again while stopping"
        assert "starting it again" not in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _holders(port: int, conns: list[socket.socket]) -> collections.Counter[int]:
    """Which process holds the server end of each of ``conns`` (from ``ss``)."""
    ours = {c.getsockname()[1] for c in conns}
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    held: collections.Counter[int] = collections.Counter()
    for line in out.splitlines():
        peer = re.search(r":(\d+)\s+users:", line)
        pid = re.search(r"pid=(\d+)", line)
        if peer and pid and int(peer.group(1)) in ours:
            held[int(pid.group(1))] += 1
    return held


def test_connections_are_spread_over_the_children_and_a_dead_one_holds_none(tmp_path: Path) -> None:
    """Each child accepts on a socket of its own (SO_REUSEPORT): on one shared socket the child
    that woke first took every waiting connection (9 of 10); a dead child's socket is closed,
    so new connections go to the living one instead of waiting for the restart."""
    env = _env(tmp_path)
    port = int(env["IOTVAULT_HTTP_PORT"])
    server = ServerProcess(env, tmp_path / "serve.log", args=("--api-processes", "2"))
    server.start(timeout=60)
    try:
        kids = _children(server.log)
        conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(40)]
        for c in conns:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.recv(4096).startswith(b"HTTP/1.1 200")
        held = _holders(port, conns)
        assert set(held) == set(kids), (held, kids)
        assert min(held.values()) >= 8, held  # binomial(40, 1/2): below 8 once in 10^4 runs
        for c in conns:
            c.close()
        os.kill(kids[0], signal.SIGKILL)
        assert _gone_within([kids[0]], 10)
        time.sleep(0.3)  # the parent closes its socket at once; the restart takes seconds
        for _ in range(20):  # every new connection is answered, none waits for the restart
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert c.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        server.stop()
