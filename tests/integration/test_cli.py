"""The ``iotvault`` command as a user meets it: real processes, real ports, real exit codes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import ServerProcess, free_port, server_env, wait_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def iotvault(
    *args: str, env: dict[str, str], timeout: float = 60, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iotvault", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input_text,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The failure is a single 'iotvault: error:' line, without a traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("iotvault: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_help_for_every_command(tmp_path: Path) -> None:
    env = server_env(tmp_path)
    for args in (
        [],
        ["serve"],
        ["demo"],
        ["simulate"],
        ["db", "upgrade"],
        ["keys", "rotate"],
        ["devices", "register"],
        ["devices", "list"],
        ["devices", "delete"],
        ["devices", "rotate-credential"],
        ["events", "tail"],
    ):
        result = iotvault(*args, "--help", env=env)
        assert result.returncode == 0, (args, result.stderr)
        assert "Usage" in result.stdout


def test_invalid_setting_names_the_variable(tmp_path: Path) -> None:
    env = server_env(tmp_path)
    env["IOTVAULT_HTTP_PORT"] = "eighty"
    line = one_line_error(iotvault("devices", "list", env=env))
    assert "IOTVAULT_HTTP_PORT" in line
    env = server_env(tmp_path)
    env["IOTVAULT_BROKER_URL"] = "amqp://rabbit"
    assert "IOTVAULT_BROKER_URL" in one_line_error(iotvault("serve", env=env))


def test_config_file_unknown_key_and_values(tmp_path: Path) -> None:
    env = server_env(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("htp_port = 9000\n")
    assert "htp_port" in one_line_error(iotvault("--config", str(bad), "devices", "list", env=env))
    good = tmp_path / "good.toml"
    good.write_text(f'data_dir = "{tmp_path / "from-file"}"\n')
    del env["IOTVAULT_DATA_DIR"]
    assert iotvault("--config", str(good), "devices", "register", "t", "d0", env=env).returncode == 0
    result = iotvault("--config", str(good), "devices", "list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert [d["deviceId"] for d in json.loads(result.stdout)] == ["d0"]
    assert (tmp_path / "from-file" / "iotvault.db").exists()
    assert (tmp_path / "from-file" / "master.key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "from-file" / "iotvault.db").stat().st_mode & 0o077 == 0


def test_taken_ports_and_unreachable_services_give_one_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = str(holder.getsockname()[1])
        env = server_env(tmp_path, http_port=taken)
        assert "IOTVAULT_HTTP_PORT" in one_line_error(iotvault("serve", env=env))
        env = server_env(tmp_path, mqtt_port=taken)
        assert "IOTVAULT_MQTT_PORT" in one_line_error(iotvault("serve", env=env))
    env = server_env(tmp_path, broker_url=f"mqtt://127.0.0.1:{free_port()}")
    assert "IOTVAULT_BROKER_URL" in one_line_error(iotvault("serve", env=env))
    env = server_env(tmp_path, database_url=f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    line = one_line_error(iotvault("devices", "list", env=env))
    assert "cannot reach the database" in line
    assert "IOTVAULT_DATABASE_URL" in line


def test_wrong_master_key_is_refused(tmp_path: Path) -> None:
    env = server_env(tmp_path)
    assert iotvault("devices", "register", "t", "d1", env=env).returncode == 0
    env["IOTVAULT_MASTER_KEY_FILE"] = str(tmp_path / "other.key")
    line = one_line_error(iotvault("devices", "list", env=env))
    assert "master key" in line
    assert "IOTVAULT_MASTER_KEY_FILE" in line


def test_device_lifecycle_and_secret_shown_once(tmp_path: Path) -> None:
    env = server_env(tmp_path)
    reg = iotvault("devices", "register", "thermo", "k-1", "--json", env=env)
    assert reg.returncode == 0, reg.stderr
    doc = json.loads(reg.stdout)
    assert doc["deviceId"] == "k-1"
    assert len(doc["password"]) >= 40
    listing = iotvault("devices", "list", "--json", env=env)
    assert doc["password"] not in listing.stdout
    assert [d["deviceId"] for d in json.loads(listing.stdout)] == ["k-1"]
    raw = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("iotvault.db*"))
    assert doc["password"].encode() not in raw  # only a hash is kept
    assert "already exists" in one_line_error(iotvault("devices", "register", "thermo", "k-1", env=env))
    assert "deviceId" in one_line_error(iotvault("devices", "register", "thermo", "k/1", env=env))
    rot = iotvault("devices", "rotate-credential", "k-1", "--json", env=env)
    assert json.loads(rot.stdout)["password"] != doc["password"]
    assert iotvault("devices", "delete", "k-1", env=env, input_text="n\n").returncode != 0
    assert iotvault("devices", "delete", "k-1", "--yes", env=env).returncode == 0
    assert json.loads(iotvault("devices", "list", "--json", env=env).stdout) == []
    assert "does not exist" in one_line_error(iotvault("events", "tail", "k-1", env=env))


def test_serve_health_metrics_and_sigterm(tmp_path: Path, server_factory: list[ServerProcess]) -> None:
    env = server_env(tmp_path)
    made = iotvault("apikeys", "add", "--admin", "--description", "prometheus", "--json", env=env)
    operator = json.loads(made.stdout)
    reader = json.loads(iotvault("apikeys", "add", "--reader", "--json", env=env).stdout)
    server = ServerProcess(env, tmp_path / "server.log")
    server_factory.append(server)
    server.start()
    base = f"http://127.0.0.1:{env['IOTVAULT_HTTP_PORT']}"
    with httpx.Client(base_url=base, timeout=5) as client:
        health = client.get("/healthz")
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        assert health.headers["cache-control"] == "no-store"
        assert health.headers["x-content-type-options"] == "nosniff"
        assert "server" not in health.headers
        assert client.get("/readyz").json() == {"status": "ready"}
        # /metrics is for operators: Basic credentials of an administrator's API key
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", auth=(reader["key"], reader["password"])).status_code == 403
        assert client.get("/metrics", auth=(operator["key"], "not-its-password")).status_code == 401
        metrics = client.get("/metrics", auth=(operator["key"], operator["password"]))
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert "iotvault_ingest_events_stored_total 0" in metrics.text
        lines = set(metrics.text.splitlines())
        # this request's own authentication is counted before the page is made
        assert 'iotvault_http_authentications_total{outcome="missing"} 1' in lines
        assert 'iotvault_http_authentications_total{outcome="failure"} 1' in lines
        assert 'iotvault_http_authentications_total{outcome="success"} 2' in lines
        assert "iotvault_alerts_total 0" in lines
        assert any(line.startswith("iotvault_audit_queue_depth ") for line in lines)
        assert any(line.startswith("iotvault_audit_write_lag_seconds ") for line in lines)
    assert server.proc is not None
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=15) == 0
    assert time.monotonic() - started < 10


def test_demo_runs_and_data_arrives(tmp_path: Path) -> None:
    env = server_env(tmp_path)
    del env["IOTVAULT_MQTT_PORT"]  # the demo finds a free port when 1883 is taken
    with (tmp_path / "demo.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iotvault", "demo", "--rate", "20"], env=env, stdout=log, stderr=log
        )
    try:
        wait_port(int(env["IOTVAULT_HTTP_PORT"]), timeout=30)
        deadline = time.monotonic() + 30
        events: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            tail = iotvault("events", "tail", "demo-thermo-1", "--count", "5", "--json", env=env)
            if tail.returncode == 0:
                events = [json.loads(line) for line in tail.stdout.splitlines() if line.strip()]
                if len(events) >= 5:
                    break
            time.sleep(0.5)
        assert len(events) == 5, (tmp_path / "demo.log").read_text()
        assert all(e["deviceId"] == "demo-thermo-1" for e in events)
        assert all(isinstance(e["payload"], dict) and "d" in e["payload"] for e in events)
        assert all(str(e["timestamp"]).endswith("Z") for e in events)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log_text = (tmp_path / "demo.log").read_text()
    assert "Traceback" not in log_text, log_text
    # demo users are made on first start, their generated passwords printed once
    assert "demo user 'demo' created; password (shown once): " in log_text
    assert "demo user 'admin' created" in log_text
    users = json.loads(iotvault("users", "list", "--json", env=env).stdout)
    assert {u["userName"] for u in users} >= {"demo", "admin"}


def test_simulate_command_with_progress(tmp_path: Path, server_factory: list[ServerProcess]) -> None:
    env = server_env(tmp_path)
    server = ServerProcess(env, tmp_path / "server.log")
    server_factory.append(server)
    server.start()
    result = iotvault("simulate", "--devices", "3", "--rate", "0", "--count", "20", env=env)
    assert result.returncode == 0, result.stderr
    assert "acknowledged 60" in result.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        tail = iotvault("events", "tail", "sim-0002", "--count", "100", "--json", env=env)
        if len(tail.stdout.splitlines()) == 20:
            break
        time.sleep(0.3)
    assert len(tail.stdout.splitlines()) == 20
