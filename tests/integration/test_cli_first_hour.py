"""A new user's first hour with the command line: real processes, real ports, real brokers.

Read-only commands never create an installation; the demo settles its ports before it makes
anything and keeps a fallback port across restarts; the public URL follows the HTTP port; the
running node's ports are recorded for the commands that follow; the simulator never reports
success for events iotvault did not store; ``iotvault token`` refreshes a saved login.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import Mosquitto, ServerProcess, free_port, require_mosquitto, server_env, wait_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def iotvault(
    *args: str, env: dict[str, str], cwd: Path | None = None, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iotvault", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=90,
        input=input_text,
        check=False,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("iotvault: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_read_only_commands_create_nothing_and_say_where_they_looked(tmp_path: Path) -> None:
    env = server_env(tmp_path)
    data = tmp_path / "data"
    for args in (
        ("devices", "list"),
        ("events", "tail", "demo-thermo-1"),
        ("users", "list"),
        ("groups", "list"),
        ("apikeys", "list"),
        ("clients", "list"),
    ):
        line = error_line(iotvault(*args, env=env))
        assert f"no iotvault database in data dir {data}" in line, line
        assert not data.exists(), args  # no directory, no SQLite file, no new master key
    # "not found" names the database it looked in
    assert iotvault("devices", "register", "t", "d1", env=env).returncode == 0
    line = error_line(iotvault("events", "tail", "nope", env=env))
    assert "device 'nope' does not exist" in line
    assert f"data dir {data}" in line
    empty = iotvault("events", "tail", "d1", env=env)
    assert empty.returncode == 0
    assert "d1: no events stored yet" in empty.stderr


def test_version_help_unknown_variable_and_wide_tables(tmp_path: Path) -> None:
    env = server_env(tmp_path)
    assert iotvault("--version", env=env).stdout.startswith("iotvault ")
    assert "Usage" in iotvault("-h", env=env).stdout
    assert "Usage" in iotvault("devices", "-h", env=env).stdout
    env["IOTVAULT_HTTP_PROT"] = "9000"
    long_id = "a-rather-long-device-identifier-" + "x" * 32
    made = iotvault("devices", "register", "some-type-name", long_id, env=env)
    assert made.returncode == 0, made.stderr
    assert (
        "IOTVAULT_HTTP_PROT is not a setting and is ignored (did you mean IOTVAULT_HTTP_PORT?)" in made.stderr
    )
    listing = iotvault("devices", "list", env=env)  # piped: not cut to 80 columns
    assert any(long_id in line and "some-type-name" in line for line in listing.stdout.splitlines())


def test_simulate_refuses_a_broker_that_is_not_iotvaults(tmp_path: Path) -> None:
    require_mosquitto()
    foreign = Mosquitto(free_port(), tmp_path / "mosquitto")
    foreign.start()
    try:
        env = server_env(tmp_path, mqtt_port=str(foreign.port))  # no iotvault node is running
        result = iotvault("simulate", "--devices", "1", "--count", "5", "--rate", "0", env=env)
    finally:
        foreign.stop()
    line = error_line(result)
    assert "acknowledged 5 events but iotvault stored 0" in line
    assert f"127.0.0.1:{foreign.port}" in line


def test_simulate_finds_the_running_nodes_broker(tmp_path: Path, server_factory: list[ServerProcess]) -> None:
    env = server_env(tmp_path)
    server = ServerProcess(env, tmp_path / "server.log")
    server_factory.append(server)
    server.start()
    recorded = json.loads((tmp_path / "data" / "node.json").read_text())
    assert recorded["mqttPort"] == int(env["IOTVAULT_MQTT_PORT"])
    assert recorded["publicUrl"] == f"http://127.0.0.1:{env['IOTVAULT_HTTP_PORT']}"  # follows the port
    other = dict(env, IOTVAULT_MQTT_PORT=str(free_port()))  # stale settings: node.json wins
    result = iotvault("simulate", "--devices", "1", "--count", "5", "--rate", "0", env=other)
    assert result.returncode == 0, result.stderr
    assert "stored 5 (confirmed in iotvault's database)" in result.stderr


def _hold(port: int) -> socket.socket | None:
    """Bind ``port`` so that it is taken; None if something else holds it already."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
    except OSError:
        sock.close()
        return None
    return sock


def _start_demo(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "iotvault", "demo", "--rate", "5"], env=env, stdout=fh, stderr=fh
        )


def _wait_ready(proc: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "iotvault demo ready" in text:
            return text
        assert proc.poll() is None, text
        time.sleep(0.2)
    raise AssertionError(log.read_text())


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_demo_checks_ports_first_falls_back_and_keeps_the_port(tmp_path: Path) -> None:
    env = server_env(tmp_path)
    taken = _hold(free_port())
    assert taken is not None
    # a port the settings name is never moved: one line, and nothing created
    env["IOTVAULT_HTTP_PORT"] = str(taken.getsockname()[1])
    line = error_line(iotvault("demo", env=env))
    assert "IOTVAULT_HTTP_PORT" in line
    assert not (tmp_path / "data" / "iotvault.db").exists()
    # the default port 8000 taken (held here if nobody else holds it): the demo moves
    del env["IOTVAULT_HTTP_PORT"], env["IOTVAULT_MQTT_PORT"]
    holder = _hold(8000)
    log = tmp_path / "demo.log"
    proc = _start_demo(env, log)
    try:
        text = _wait_ready(proc, log)
        moved = re.search(r"port 8000 is taken \(another web server\?\); the demo uses (\d+) instead", text)
        assert moved, text
        port = int(moved.group(1))
        assert json.loads((tmp_path / "data" / "node.json").read_text())["httpPort"] == port
        curl = re.search(r"curl -u (\S+):(\S+) (http://127\.0\.0\.1:(\d+))/iotf/devices", text)
        assert curl, text
        assert int(curl.group(4)) == port  # the public URL followed the port
        key, password, base = curl.group(1), curl.group(2), curl.group(3)
        with httpx.Client(base_url=base, auth=(key, password), timeout=10) as http:
            devices = http.get("/iotf/devices").json()["devices"]
            assert {d["deviceId"] for d in devices} == {"demo-thermo-1", "demo-thermo-2", "demo-meter-1"}
            issuer = httpx.get(base + "/.well-known/openid-configuration", timeout=10).json()["issuer"]
            assert issuer == base
        hint = re.search(r"watch them arrive: (.+) events tail demo-thermo-1 --follow", text)
        assert hint, text
        assert hint.group(1).endswith("-m iotvault") or "iotvault" in hint.group(1)
    finally:
        _stop(proc)
    assert not (tmp_path / "data" / "node.json").exists()
    proc = _start_demo(env, log)  # restart: the same fallback port, no new secrets
    try:
        text = _wait_ready(proc, log)
        assert f"the demo uses {port} instead" in text
        assert "curl -u" not in text
        assert "password (shown once)" not in text
        assert "users set-password demo" in text
        wait_port(port)
    finally:
        _stop(proc)
        taken.close()
        if holder is not None:
            holder.close()


def _claims(jwt: str) -> dict[str, object]:
    payload = jwt.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


_HIDDEN = re.compile(r'<input type="hidden" name="([a-z_]+)" value="([^"]*)">')


def test_token_refreshes_the_saved_login(tmp_path: Path, server_factory: list[ServerProcess]) -> None:
    env = server_env(tmp_path)
    assert (
        iotvault(
            "users", "add", "alice", "--password-stdin", env=env, input_text="alice-password-123\n"
        ).returncode
        == 0
    )
    redirect = "http://127.0.0.1:4000/cb"
    assert iotvault("clients", "add", "script", "--redirect-uri", redirect, env=env).returncode == 0
    server = ServerProcess(env, tmp_path / "server.log")
    server_factory.append(server)
    server.start()
    base = f"http://127.0.0.1:{env['IOTVAULT_HTTP_PORT']}"
    verifier = "v" * 64
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    with httpx.Client(base_url=base, timeout=10) as browser:
        r = browser.get(
            "/oauth/authorize",
            params={
                "response_type": "code",
                "client_id": "script",
                "redirect_uri": redirect,
                "scope": "openid offline_access",
                "state": "s1",
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            },
        )
        assert r.status_code == 302, r.text
        page = browser.get(r.headers["location"])
        form = dict(_HIDDEN.findall(page.text))
        r = browser.post("/login", data={**form, "username": "alice", "password": "alice-password-123"})
        assert r.status_code == 303, r.text
        code = httpx.URL(r.headers["location"]).params["code"]
        tokens = browser.post(
            "/oauth/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect,
                "client_id": "script",
                "code_verifier": verifier,
            },
        ).json()
    assert "refresh_token" in tokens, tokens
    saved = tmp_path / "token.json"
    # as 'iotvault login' saves it, with an access token that has just expired
    stale = (
        "e30."
        + base64.urlsafe_b64encode(json.dumps({"exp": int(time.time()) - 5}).encode()).decode().rstrip("=")
        + ".x"
    )
    saved.write_text(json.dumps({**tokens, "access_token": stale, "issuer": base, "client_id": "script"}))
    result = iotvault("token", "--output", str(saved), env=env)
    assert result.returncode == 0, result.stderr
    fresh = result.stdout.strip()
    assert fresh != stale
    assert int(str(_claims(fresh)["exp"])) > time.time()
    assert (
        httpx.get(base + "/iotf/me", headers={"Authorization": f"Bearer {fresh}"}, timeout=10).status_code
        == 200
    )
    rotated = json.loads(saved.read_text())
    assert rotated["refresh_token"] != tokens["refresh_token"]  # refresh tokens rotate
    assert saved.stat().st_mode & 0o077 == 0
    again = iotvault("token", "--json", "--output", str(saved), env=env)  # still valid: no refresh
    doc = json.loads(again.stdout)
    assert doc["accessToken"] == fresh
    assert doc["tokenType"] == "Bearer"
    assert str(doc["expiresOn"]).endswith("Z")
    assert "not logged in" in error_line(iotvault("token", "--output", str(tmp_path / "none.json"), env=env))


def test_org_id_is_made_once_kept_and_a_setting_wins(tmp_path: Path) -> None:
    env = server_env(tmp_path)
    first = iotvault("org", env=env)
    assert first.returncode == 0, first.stderr
    made = first.stdout.strip()
    assert re.fullmatch(r"[a-z0-9]{6}", made), made
    again = json.loads(iotvault("org", "--json", env=env).stdout)
    assert again == {"orgId": made, "source": "database"}
    env["IOTVAULT_ORG_ID"] = "myorg"
    assert iotvault("org", env=env).stdout.strip() == "myorg"
    env["IOTVAULT_ORG_ID"] = "my:org"
    assert "invalid setting IOTVAULT_ORG_ID" in error_line(iotvault("org", env=env))
