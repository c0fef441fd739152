"""The suite-wide secret-leak scan: no secret the test run made or used reaches iotvault's logs.

Issue 15 asks that "a full test run's logs and audit records contain none of the passwords,
tokens, API-key passwords, device credentials or payload plaintext that the run used". This
module is that check, as a pytest plugin (``tests/conftest.py`` loads it):

* **Secrets** are collected where they cross the test's hands, whichever test it is, so that no
  test has to remember: what the tests send and receive over HTTP (:func:`harvest_request`,
  :func:`harvest_response`: passwords, tokens, client secrets, PKCE verifiers, codes in
  redirects, session cookies, Basic passwords, bearer tokens), what the ``iotvault`` command
  prints once (``--json`` or text, through ``subprocess.run``), what iotvault makes or hashes in
  the test process (``new_secret``, ``hash_password``: API keys, device credentials, passwords
  given to ``create_user``), payloads sent through the device SDK or sealed in process, and what
  a test registers itself (:func:`secret`). A secret that never leaves the server (a web
  session's refresh token) is out of its reach: test_secret_leaks.py drives those paths.
* **Files**: only what iotvault itself writes: every server process's log (stdout and stderr as
  :class:`helpers.ServerProcess` captures them), audit exports (``IOTVAULT_AUDIT_EXPORT_FILE``,
  ``iotvault audit export``), and the records of iotvault's loggers in the test process (those
  their levels let through: warnings and above unless a test lowers one). Never the test's own
  files (a credential file the CLI wrote on purpose, a test's request log), nor the output of
  ``iotvault demo``, which prints its demo passwords once by design.
* At the end of the session each file is searched for each secret in plain, JSON-escaped,
  URL-encoded and base64 (standard and URL-safe, at any alignment) forms. A hit fails the run
  and names the file and the kind of secret, never the secret.

Only values worth the name are kept: at least :data:`MIN_LEN` characters and varied enough
(:func:`looks_secret`), so a device id or a short fixed string a test prints is never one.
The search indexes each form by its first :data:`GRAM` characters and walks the files' long
"word" runs once, so its cost grows with the size of the logs, not with the number of secrets.
"""

from __future__ import annotations

import base64
import inspect
import json
import logging
import math
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit

import httpx
import pytest

import iotvault.accounts
import iotvault.devices
import iotvault.identity.clients
from iotvault.crypto import keyring
from iotvault.device import connection

MIN_LEN: Final = 12
GRAM: Final = 12
MIN_BITS_PER_CHAR: Final = 2.5
MIN_DISTINCT: Final = 6
# JSON keys whose value is a secret, at any depth of a request, response or CLI output
JSON_KEYS: Final = frozenset(
    {
        "password",
        "new_password",
        "access_token",
        "refresh_token",
        "id_token",
        "client_secret",
        "device_code",
        "secret",
    }
)
# form fields and query parameters whose value is a secret (an OAuth code only ever travels so)
FORM_KEYS: Final = frozenset(
    {"password", "code", "code_verifier", "refresh_token", "token", "client_secret", "device_code"}
)
# what the ``iotvault`` command prints once in text form: "… (shown once): VALUE", "curl -u KEY:PW"
_TEXT_SECRET: Final = (
    re.compile(r"shown once[^)]*\):\s*(\S+)"),
    re.compile(r"-u\s+[^:\s]+:(\S+)"),
)
# a "word" as logs carry a secret in any of the forms searched (JSON escapes, %xx, base64)
_RUN: Final = re.compile(rb"[A-Za-z0-9_\-\.~+/=%\\]{" + str(GRAM).encode() + rb",}")


def looks_secret(value: str) -> bool:
    """Long and varied enough to be a secret, not an id or a word a test happens to print."""
    if len(value) < MIN_LEN or len(set(value)) < MIN_DISTINCT:
        return False
    counts = Counter(value)
    bits = -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())
    return bits >= MIN_BITS_PER_CHAR


def forms(value: str) -> set[bytes]:
    """The ways a log could carry ``value``: as is, JSON-escaped, URL-encoded, base64."""
    raw = value.encode()
    found = {raw, json.dumps(value)[1:-1].encode(), quote(value, safe="").encode()}
    found.add(quote_plus(value).encode())
    for k in range(3):  # base64 of a longer text that holds the value at any of three alignments
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            enc = encode(b"\0" * k + raw)
            head = (4 * k + 2) // 3  # characters that also depend on what comes before
            tail = 4 if (k + len(raw)) % 3 else 0  # and on what comes after
            part = enc[head : len(enc) - tail].rstrip(b"=")
            if len(part) >= MIN_LEN:
                found.add(part)
    return {f for f in found if len(f) >= GRAM}


@dataclass(frozen=True)
class Leak:
    where: str  # the file, or a label for a captured output
    what: str  # the kind of file
    kind: str  # the kind of secret: never the secret itself

    def __str__(self) -> str:
        return f"{self.where} ({self.what}) holds a {self.kind}"


@dataclass
class Collector:
    secrets: dict[str, str] = field(default_factory=dict)  # value → kind
    files: dict[Path, str] = field(default_factory=dict)  # path → kind of file
    outputs: list[tuple[str, str, bytes]] = field(default_factory=list)  # (label, kind, text)
    scanned: int = 0  # texts the last scan read

    def secret(self, value: object, kind: str) -> None:
        if isinstance(value, str) and looks_secret(value) and value not in self.secrets:
            self.secrets[value] = kind

    def file(self, path: Path, kind: str) -> None:
        self.files[Path(path)] = kind

    def output(self, label: str, kind: str, text: str | bytes) -> None:
        self.outputs.append((label, kind, text.encode() if isinstance(text, str) else text))

    def scan(self) -> list[Leak]:
        index: dict[bytes, list[tuple[bytes, str]]] = {}
        literal: list[tuple[bytes, str]] = []  # forms with a space or quote: searched as they are
        for value, kind in self.secrets.items():
            for f in forms(value):
                if _RUN.fullmatch(f):
                    index.setdefault(f[:GRAM], []).append((f, kind))
                else:
                    literal.append((f, kind))
        leaks: set[Leak] = set()
        self.scanned = 0
        for where, what, text in self._texts():
            self.scanned += 1
            found = search(text, index) | {kind for f, kind in literal if f in text}
            leaks.update(Leak(where, what, kind) for kind in found)
        return sorted(leaks, key=lambda leak: (leak.where, leak.kind))

    def _texts(self) -> Iterator[tuple[str, str, bytes]]:
        for path, kind in self.files.items():
            if path.is_file():
                yield str(path), kind, path.read_bytes()
        yield from self.outputs


def search(text: bytes, index: dict[bytes, list[tuple[bytes, str]]]) -> set[str]:
    """The kinds of secret whose forms occur in ``text``."""
    hits: set[str] = set()
    if not index:
        return hits
    for run in _RUN.finditer(text):
        start, end = run.span()
        for i in range(start, end - GRAM + 1):
            candidates = index.get(text[i : i + GRAM])
            if candidates:
                hits.update(kind for f, kind in candidates if text.startswith(f, i))
    return hits


COLLECTOR = Collector()


def secret(value: object, kind: str) -> None:
    """Register a secret a test made by hand (a password it chose, a payload it publishes)."""
    COLLECTOR.secret(value, kind)


def server_log(path: Path) -> None:
    COLLECTOR.file(path, "server log")


def audit_export(path: Path) -> None:
    COLLECTOR.file(path, "audit export")


# ---- harvesting ------------------------------------------------------------------------------
def _json(text: str | bytes) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def harvest_json(doc: object, where: str) -> None:
    """Register every value under a secret key, at any depth."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in JSON_KEYS and isinstance(value, str):
                COLLECTOR.secret(value, f"{key} ({where})")
            else:
                harvest_json(value, where)
    elif isinstance(doc, list):
        for item in doc:
            harvest_json(item, where)


def harvest_text(text: str, where: str) -> None:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("{", "[")):
            harvest_json(_json(stripped), where)
        for pattern in _TEXT_SECRET:
            for match in pattern.finditer(line):
                COLLECTOR.secret(match.group(1), f"credential printed by {where}")
    if text.lstrip().startswith(("{", "[")):
        harvest_json(_json(text), where)


def harvest_payload(payload: object) -> None:
    """A payload's plaintext: the compact JSON a device sends, and its long string values."""
    if isinstance(payload, bytes | bytearray):
        COLLECTOR.secret(bytes(payload).decode("utf-8", "replace"), "payload plaintext")
        return
    try:
        COLLECTOR.secret(json.dumps(payload, separators=(",", ":")), "payload plaintext")
    except (TypeError, ValueError):
        return
    for value in _strings(payload):
        COLLECTOR.secret(value, "payload plaintext")


def _strings(doc: object) -> Iterator[str]:
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, dict):
        for value in doc.values():
            yield from _strings(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from _strings(item)


def harvest_request(request: Any) -> None:
    """What a test sends: form fields, JSON fields, Basic and Bearer credentials, query codes."""
    auth = request.headers.get("authorization", "")
    scheme, _, cred = auth.partition(" ")
    if scheme.lower() == "bearer":
        COLLECTOR.secret(cred.strip(), "bearer token")
    elif scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(cred).decode("utf-8", "replace").partition(":")
        except ValueError:
            password = ""
        COLLECTOR.secret(password, "API key password (Basic)")
    for key, value in parse_qsl(request.url.query.decode("latin-1") if request.url.query else ""):
        if key in FORM_KEYS:
            COLLECTOR.secret(value, f"{key} (query)")
    body = _body(request)
    if not body:
        return
    kind = request.headers.get("content-type", "")
    if "application/x-www-form-urlencoded" in kind:
        for key, value in parse_qsl(body.decode("utf-8", "replace")):
            if key in FORM_KEYS:
                COLLECTOR.secret(value, f"{key} (form)")
    elif "json" in kind:
        harvest_json(_json(body), "request")


def _body(request: Any) -> bytes:
    try:
        return bytes(request.content)
    except Exception:  # noqa: BLE001 - a streamed body: nothing to read without consuming it
        return b""


def harvest_response(response: Any) -> None:
    for header in response.headers.get_list("set-cookie"):  # session cookies are bearer secrets
        value = header.split(";", 1)[0].partition("=")[2]
        COLLECTOR.secret(value, "session cookie")
    location = response.headers.get("location", "")
    if location:
        for key, value in parse_qsl(urlsplit(location).query):
            if key in FORM_KEYS:
                COLLECTOR.secret(value, f"{key} (redirect)")
    content = getattr(response, "_content", None)  # None: a stream the test has not read
    if not content or "json" not in response.headers.get("content-type", ""):
        return
    if b"token" in content or b"password" in content or b"secret" in content:
        harvest_json(_json(content), "response")


# ---- installing the collection points --------------------------------------------------------
class _InProcessLog(logging.Handler):
    """iotvault's own log records in the test process (apps served in process), to a file."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.DEBUG)
        self.path = path
        self.stream = path.open("a", encoding="utf-8")
        self.addFilter(lambda record: record.name.startswith("iotvault"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - a log handler must never fail the code that logs
            self.handleError(record)

    def close(self) -> None:
        self.stream.close()
        super().close()


def _wrap(owner: Any, name: str, after: Callable[..., None]) -> None:
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        after(result, *args, **kwargs)
        return result

    async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        after(result, *args, **kwargs)
        return result

    setattr(owner, name, async_wrapper if inspect.iscoroutinefunction(original) else wrapper)


def _after_send(response: Any, _client: Any, request: Any, *_a: Any, **_k: Any) -> None:
    for earlier in response.history:  # redirects the client followed: their codes and requests
        harvest_request(earlier.request)
        harvest_response(earlier)
    harvest_request(request)
    harvest_response(response)


def _after_run(done: Any, *args: Any, **kwargs: Any) -> None:
    command = args[0] if args else kwargs.get("args")
    words = [str(w) for w in command] if isinstance(command, list | tuple) else [str(command)]
    if "iotvault" not in words and not any(w.endswith("/iotvault") for w in words):
        return
    out, err = (_text(o) for o in (done.stdout, done.stderr))
    harvest_text(out + "\n" + err, "the iotvault command")
    if "audit" in words and "export" in words:
        COLLECTOR.output("`iotvault audit export` output", "audit export", out)


def _text(output: str | bytes | None) -> str:
    return output if isinstance(output, str) else (output or b"").decode("utf-8", "replace")


def install() -> _InProcessLog:
    """Start collecting (once per session)."""
    _wrap(httpx.Client, "send", _after_send)
    _wrap(httpx.AsyncClient, "send", _after_send)
    _wrap(subprocess, "run", _after_run)
    for module in (iotvault.accounts, iotvault.devices, iotvault.identity.clients):
        _wrap(module, "new_secret", lambda value, *_a, **_k: COLLECTOR.secret(value, "generated secret"))
    _wrap(
        iotvault.accounts,
        "hash_password",
        lambda _h, password, *_a, **_k: COLLECTOR.secret(password, "user password"),
    )
    _wrap(
        connection.DeviceConnection,
        "publish_event",
        lambda _r, _self, _type, payload, *_a, **_k: harvest_payload(payload),
    )
    _wrap(
        keyring.KeyRing,
        "encrypt",
        lambda _r, _self, _device, _event, plaintext, *_a, **_k: harvest_payload(plaintext),
    )
    log_file = Path(tempfile.mkdtemp(prefix="leakscan-")) / "iotvault-in-process.log"
    handler = _InProcessLog(log_file)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    logging.getLogger().addHandler(handler)
    COLLECTOR.file(log_file, "iotvault log (in process)")
    return handler


# ---- the plugin ------------------------------------------------------------------------------
_HANDLER: list[_InProcessLog] = []
_RESULT: list[tuple[Any, ...]] = []  # the scan's (secrets, texts) counts, then one row per leak


def pytest_configure(config: pytest.Config) -> None:
    if not _HANDLER and not config.getoption("collectonly", False):
        _HANDLER.append(install())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Search every registered log and export; a hit fails the run (reported in the summary)."""
    for handler in _HANDLER:
        handler.flush()
    started = time.perf_counter()
    leaks = COLLECTOR.scan()
    took = time.perf_counter() - started
    for handler in _HANDLER:
        logging.getLogger().removeHandler(handler)
        handler.close()
        shutil.rmtree(handler.path.parent, ignore_errors=True)
    _HANDLER.clear()
    _RESULT[:] = [(len(COLLECTOR.secrets), COLLECTOR.scanned, took), *((str(leak), "") for leak in leaks)]
    if leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    del exitstatus


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _RESULT:
        return
    (n_secrets, n_texts, took), *leaks = _RESULT
    terminalreporter.write_line(
        f"secret-leak scan: {n_secrets} secrets in {n_texts} logs and audit exports ({took:.1f} s)"
    )
    for leak, _ in leaks:
        terminalreporter.write_line(f"SECRET LEAK: {leak}", red=True, bold=True)


def scan_texts(secrets: Iterable[tuple[str, str]], texts: Iterable[tuple[str, bytes]]) -> list[Leak]:
    """A scan over given secrets and texts, for the scanner's own tests."""
    c = Collector()
    for value, kind in secrets:
        c.secret(value, kind)
    for label, text in texts:
        c.output(label, "text", text)
    return c.scan()
