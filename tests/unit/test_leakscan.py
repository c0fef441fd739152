"""The suite-wide secret-leak scan (tests/leakscan.py) finds what it must and nothing else.

A planted secret is found in each form a log could carry it (plain, JSON-escaped, URL-encoded,
base64 at every alignment); ids and short strings are never registered; the report names the
place and the kind, never the secret; and the hook really fails a pytest session (run in a
child process, so that this session's own collector is left alone).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

import leakscan
from leakscan import Collector, looks_secret, scan_texts

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent


def _planted(secret: str) -> dict[str, bytes]:
    raw = secret.encode()
    return {
        "plain": b"INFO login ok for alice with " + raw + b" trailing",
        "json": json.dumps({"message": f'said "{secret}"'}).encode(),
        "url": b"GET /cb?x=" + quote(secret, safe="").encode() + b"&y=1",
        "base64 aligned": b"blob " + base64.b64encode(raw) + b" end",
        "base64 inside": b"blob " + base64.b64encode(b"user:" + raw + b":more") + b" end",
        "base64 offset 1": b"blob " + base64.b64encode(b"u" + raw + b"z") + b" end",
        "base64 offset 2": b"blob " + base64.urlsafe_b64encode(b"uv" + raw + b"zz") + b" end",
    }


@pytest.mark.parametrize(
    "secret",
    [
        secrets.token_urlsafe(32),
        "alice-Pw-" + secrets.token_urlsafe(12),
        'pass "with" quotes/and spaces & ' + secrets.token_hex(6),  # escapes in JSON and URLs
    ],
)
def test_a_planted_secret_is_found_in_every_form(secret: str) -> None:
    for form, text in _planted(secret).items():
        leaks = scan_texts([(secret, "user password")], [("serve.log", text)])
        assert [(leak.where, leak.kind) for leak in leaks] == [("serve.log", "user password")], form


def test_nothing_is_found_where_the_secret_is_not() -> None:
    secret = secrets.token_urlsafe(24)
    other = secrets.token_urlsafe(24)
    texts = list(_planted(other).items())
    assert scan_texts([(secret, "token")], texts) == []
    assert scan_texts([(secret, "token")], [("log", secret[:-1].encode())]) == []


def test_ids_and_short_or_plain_strings_are_never_registered() -> None:
    for value in ("kitchen-1", "device-0001", "x" * 40, "aaaaaaaaaaab", "abcabcabcabcabc", "short"):
        assert not looks_secret(value), value
    assert looks_secret(secrets.token_urlsafe(16))
    assert looks_secret("cluster-password-123")
    c = Collector()
    c.secret("kitchen-1", "device id")
    c.secret("aaaaaaaaaaaaaaaaaa", "password")
    assert c.secrets == {}
    c.output("log", "server log", b"device kitchen-1 connected; aaaaaaaaaaaaaaaaaa")
    assert c.scan() == []


def test_the_report_names_place_and_kind_never_the_secret(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(20)
    log = tmp_path / "serve.log"
    log.write_text(f"token {secret} issued\n")
    c = Collector()
    c.secret(secret, "access_token (response)")
    c.file(log, "server log")
    c.file(tmp_path / "never-written.log", "server log")  # a server that never started: no error
    (leak,) = c.scan()
    assert str(leak) == f"{log} (server log) holds a access_token (response)"
    assert secret not in str(leak)


def test_what_the_tests_see_is_harvested() -> None:
    before = dict(leakscan.COLLECTOR.secrets)
    try:
        token, verifier, code, cookie = (secrets.token_urlsafe(24) for _ in range(4))
        leakscan.harvest_json({"a": [{"access_token": token, "code": "invalid_request"}]}, "response")
        leakscan.harvest_text(f"password (shown once): {verifier}\nall fine\n", "the iotvault command")
        redirect = httpx_response(
            302, {"location": f"http://x/cb?code={code}&state=s", "set-cookie": f"web={cookie}; Path=/"}
        )
        leakscan.harvest_response(redirect)
        added = set(leakscan.COLLECTOR.secrets) - set(before)
        assert added == {token, verifier, code, cookie}  # an error code word is not a secret
    finally:
        leakscan.COLLECTOR.secrets.clear()
        leakscan.COLLECTOR.secrets.update(before)


def httpx_response(status: int, headers: dict[str, str]) -> object:
    import httpx  # noqa: PLC0415 - only this test builds a response

    return httpx.Response(status, headers=headers)


PLANTING_TEST = """
import leakscan

SECRET = "{secret}"


def test_a_server_writes_a_secret_to_its_log(tmp_path):
    log = tmp_path / "serve.log"
    log.write_text("INFO user logged in with " + SECRET + "\\n")
    leakscan.secret(SECRET, "user password")
    leakscan.server_log(log)
"""

CLEAN_TEST = """
import leakscan


def test_a_server_writes_only_ids(tmp_path):
    log = tmp_path / "serve.log"
    log.write_text("INFO device kitchen-1 connected\\n")
    leakscan.secret("{secret}", "user password")
    leakscan.server_log(log)
"""


def _session(tmp_path: Path, test_source: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(
        "from leakscan import pytest_configure, pytest_sessionfinish, pytest_terminal_summary\n"
    )
    (tmp_path / "test_planted.py").write_text(test_source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_hook_fails_a_session_whose_server_log_holds_a_secret(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(18)
    done = _session(tmp_path, PLANTING_TEST.format(secret=secret))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 passed" in done.stdout  # the test itself passed: the scan failed the run
    assert "SECRET LEAK" in done.stdout
    assert "serve.log (server log) holds a user password" in done.stdout
    assert secret not in done.stdout + done.stderr


def test_the_hook_lets_a_clean_session_pass(tmp_path: Path) -> None:
    done = _session(tmp_path, CLEAN_TEST.format(secret=secrets.token_urlsafe(18)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "secret-leak scan: 1 secrets in 2 logs" in done.stdout  # its log and the in-process one
    assert "SECRET LEAK" not in done.stdout
