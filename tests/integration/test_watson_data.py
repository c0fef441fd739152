"""Watson IoT devices, the data side (issue 16), against a real ``iotvault serve`` process.

Events in formats other than ``json`` (published over MQTT, or posted over HTTP as Watson's
device messaging API took them) are stored encrypted and served as text or base64; a device
set to unsigned command delivery gets the payload as sent, and its command is ``delivered``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gmqtt
import httpx
import pytest
from gmqtt.mqtt.constants import MQTTv311
from helpers import ServerProcess, server_env
from sqlalchemy import select
from typer.testing import CliRunner

from iotvault.accounts import create_api_key
from iotvault.cli.main import app as cli_app
from iotvault.config import Settings, load_settings
from iotvault.context import context
from iotvault.devices import register_device
from iotvault.domain.accounts import Roles
from iotvault.storage.schema import events

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

HOST = "127.0.0.1"


@dataclass
class Served:
    env: dict[str, str]
    settings: Settings
    base: str
    mqtt_port: int

    def register(self, device_id: str, type_id: str = "thermo") -> str:
        with context(self.settings) as ctx:
            return register_device(ctx, type_id, device_id).credential

    def key(self, roles: Roles, devices: tuple[str, ...] = ()) -> dict[str, str]:
        with context(self.settings) as ctx:
            new = create_api_key(ctx, roles=roles, devices=devices, created_by="test")
        token = base64.b64encode(f"{new.key}:{new.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def count(self, device_id: str | None = None) -> int:
        with context(self.settings) as ctx:
            return ctx.store.count_events(device_id)

    def wait_count(self, expected: int, device_id: str | None = None, within: float = 20.0) -> int:
        deadline = time.monotonic() + within
        n = self.count(device_id)
        while n < expected and time.monotonic() < deadline:
            time.sleep(0.1)
            n = self.count(device_id)
        return n

    def stored_payloads(self) -> list[bytes]:
        """The payload column as stored (ciphertext), every row."""
        with context(self.settings) as ctx, ctx.engine.connect() as conn:
            return [bytes(r[0]) for r in conn.execute(select(events.c.payload))]

    def cli(self, *args: str) -> Any:
        return CliRunner().invoke(cli_app, list(args), env=self.env)


@pytest.fixture
def served(tmp_path: Path, database_url: str, server_factory: list[ServerProcess]) -> Served:
    env = server_env(tmp_path, database_url=database_url, max_payload_bytes="4096", http_body_timeout_s="2")
    server = ServerProcess(env, tmp_path / "server.log")
    server_factory.append(server)
    settings = load_settings(environ=env)
    with context(settings):
        pass  # the schema, made here: the test registers devices before the server starts
    server.start()
    return Served(env, settings, f"http://{HOST}:{env['IOTVAULT_HTTP_PORT']}", int(env["IOTVAULT_MQTT_PORT"]))


class Device:
    """A device over MQTT in iotvault's own login form (client id = user name = deviceId)."""

    def __init__(self, device_id: str) -> None:
        self.client = gmqtt.Client(device_id, clean_session=True)
        self.client.set_config({"reconnect_retries": -2})
        self.messages: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: None

    def _on_message(self, _c: Any, topic: str, payload: bytes, _qos: int, _p: Any) -> int:
        self.messages.put_nowait((topic, payload))
        return 0

    async def connect(self, port: int, password: str) -> None:
        self.client.set_auth_credentials(self.client._client_id, password)
        await asyncio.wait_for(self.client.connect(HOST, port, version=MQTTv311, keepalive=30), 5)

    async def close(self) -> None:
        await asyncio.wait_for(self.client.disconnect(), 5)


# ---- formats other than json --------------------------------------------------------------------
TEXT = "température 21,5 °C SECRET-TEXT"
FORMATS: list[tuple[str, str, bytes]] = [
    # each: the event type, the format, the payload
    ("reading", "json", b'{"t": 21.5, "k": "SECRET-JSON"}'),
    ("note", "text", TEXT.encode()),
    ("doc", "xml", b"<r><v>SECRET-XML</v></r>"),
    ("blob", "bin", bytes(range(256)) + b"SECRET-BIN"),
    ("raw", "raw", b"\xff\xfe\x00SECRET-RAW"),
    ("bad", "text", b"\xffSECRET-BADTEXT"),  # a text format, but not UTF-8: base64
    ("long", "f" * 64, b"SECRET-LONGFMT"),  # the longest format a topic level can name
    ("esc", "txt", b"\x1b[31mred\x1b[0m SECRET-ESC"),  # terminal escapes in a text payload
]


async def test_events_in_any_format_are_stored_encrypted_and_served_as_text_or_base64(
    served: Served,
) -> None:
    credential = served.register("fmt-1")
    reader = served.key(Roles(reader=True), ("fmt-1",))
    device = Device("fmt-1")
    await device.connect(served.mqtt_port, credential)
    async with httpx.AsyncClient(base_url=served.base, headers=reader, timeout=10) as http:
        # a live stream, opened before the events arrive, must carry them too
        async with http.stream("GET", "/iotf/devices/fmt-1/stream") as stream:
            assert stream.status_code == 200
            for event_type, fmt, payload in FORMATS:
                device.client.publish(
                    f"iot-2/type/thermo/id/fmt-1/evt/{event_type}/fmt/{fmt}", payload, qos=1
                )
            live: list[dict[str, Any]] = []
            lines = stream.aiter_lines()
            async with asyncio.timeout(20):
                while len(live) < len(FORMATS):
                    line = await anext(lines)
                    if line.startswith("data: "):
                        live.append(json.loads(line[6:]))
        await device.close()
        assert await asyncio.to_thread(served.wait_count, len(FORMATS)) == len(FORMATS)

        r = await http.get("/iotf/devices/fmt-1", params={"count": 20})
        assert r.status_code == 200
        latest = {e["eventType"]: e for e in r.json()["events"]}
        page = await http.get("/iotf/devices/fmt-1/events", params={"count": 20})
        assert {e["eventType"]: e for e in page.json()["events"]} == latest
    assert {e["eventType"]: e for e in live} == latest

    # json as before: no new field
    assert latest["reading"]["payload"] == {"t": 21.5, "k": "SECRET-JSON"}
    assert "payloadEncoding" not in latest["reading"]
    shown = {
        k: (e["format"], e["payloadEncoding"], e["payload"]) for k, e in latest.items() if k != "reading"
    }
    assert shown["note"] == ("text", "text", TEXT)
    assert shown["doc"] == ("xml", "text", "<r><v>SECRET-XML</v></r>")
    for name, fmt, payload in FORMATS:
        if name in ("blob", "raw", "bad", "long"):
            assert shown[name][0] == fmt
            assert shown[name][1] == "base64"
            assert base64.b64decode(shown[name][2]) == payload
    assert shown["blob"][1:] == ("base64", base64.b64encode(FORMATS[3][2]).decode())
    assert all(e["error"] is None for e in latest.values())

    # nothing was refused, and no payload is in the database in plaintext
    with context(served.settings) as ctx:
        assert ctx.store.rejected_counts() == {}
    # an answer to a command is JSON whatever its topic says: refused, not stored as an event
    device = Device("fmt-1")
    await device.connect(served.mqtt_port, credential)
    device.client.publish("iot-2/type/thermo/id/fmt-1/evt/cmdack/fmt/text", b"ok", qos=1)
    deadline = time.monotonic() + 10
    rejected: dict[str, int] = {}
    while not rejected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        with context(served.settings) as ctx:
            rejected = ctx.store.rejected_counts()
    await device.close()
    assert rejected == {"bad_command_ack": 1}
    rows = await asyncio.to_thread(served.stored_payloads)
    assert len(rows) == len(FORMATS)
    for row in rows:
        assert b"SECRET" not in row
        assert TEXT.encode() not in row

    # the command line shows them too, a text payload with its control characters escaped
    out = await asyncio.to_thread(served.cli, "events", "tail", "fmt-1", "--count", "20")
    assert out.exit_code == 0, out.output
    assert f'text (text) "{TEXT}"' in out.output
    assert "\x1b" not in out.output
    assert "\\u001b[31mred" in out.output
    assert "bin (base64)" in out.output


# ---- unsigned command delivery --------------------------------------------------------------------
async def test_unsigned_delivery_sends_the_payload_as_sent_and_signed_stays_the_default(
    served: Served,
) -> None:
    creds = {d: served.register(d) for d in ("u-1", "s-1")}
    admin = served.key(Roles(admin=True))
    writer = served.key(Roles(reader=True, writer=True), ("u-1", "s-1"))
    async with httpx.AsyncClient(base_url=served.base, timeout=10) as http:
        # only an admin may change it, and only to a known value
        change = {"commandDelivery": "unsigned"}
        assert (await http.patch("/iotf/devices/u-1", json=change)).status_code == 401
        assert (await http.patch("/iotf/devices/u-1", json=change, headers=writer)).status_code == 403
        bad = await http.patch("/iotf/devices/u-1", json={"commandDelivery": "none"}, headers=admin)
        assert bad.status_code == 422
        extra = await http.patch("/iotf/devices/u-1", json={**change, "typeId": "x"}, headers=admin)
        assert extra.status_code == 422
        r = await http.patch("/iotf/devices/nobody", json=change, headers=admin)
        assert r.status_code == 404
        before = await http.get("/iotf/devices", headers=admin)
        assert {d["deviceId"]: d["commandDelivery"] for d in before.json()["devices"]} == {
            "s-1": "signed",  # the default
            "u-1": "signed",
        }
        r = await http.patch("/iotf/devices/u-1", json=change, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json()["commandDelivery"] == "unsigned"

        devices = {d: Device(d) for d in creds}
        for d, device in devices.items():
            await device.connect(served.mqtt_port, creds[d])
            device.client.subscribe(f"iot-2/type/thermo/id/{d}/cmd/+/fmt/json", qos=1)
        await asyncio.sleep(0.5)

        body = {"command": "setInterval", "payload": {"zeta": 1, "alpha": "é", "n": [1, 2]}}
        sent = await http.post("/iotf/devices/u-1/commands", json=body, headers=writer)
        assert sent.status_code == 202, sent.text
        assert sent.json()["status"] == "delivered"
        assert sent.json()["delivery"] == "unsigned"
        topic, payload = await asyncio.wait_for(devices["u-1"].messages.get(), 10)
        assert topic == "iot-2/type/thermo/id/u-1/cmd/setInterval/fmt/json"
        assert payload == '{"zeta":1,"alpha":"é","n":[1,2]}'.encode()  # as sent: no JWS, key order kept
        status = await http.get(f"/iotf/devices/u-1/commands/{sent.json()['commandId']}", headers=writer)
        assert status.json()["status"] == "delivered"
        assert status.json()["delivery"] == "unsigned"

        signed = await http.post("/iotf/devices/s-1/commands", json=body, headers=writer)
        assert signed.status_code == 202
        assert signed.json() == {
            "commandId": signed.json()["commandId"],
            "status": "sent",
            "delivery": "signed",
        }
        _topic, payload = await asyncio.wait_for(devices["s-1"].messages.get(), 10)
        assert set(json.loads(payload)) == {"jws"}
        status = await http.get(f"/iotf/devices/s-1/commands/{signed.json()['commandId']}", headers=writer)
        assert (status.json()["status"], status.json()["delivery"]) == ("sent", "signed")
        for device in devices.values():
            await device.close()

        # the change and the unsigned command are on the audit record; the signed one is not
        audit = await http.get("/iotf/audit", headers=admin, params={"count": 1000})
        records = audit.json()["records"]
        changes = [r for r in records if r["action"] == "device.command_delivery"]
        assert [(r["target"], r["detail"]["commandDelivery"]) for r in changes] == [("u-1", "unsigned")]
        assert changes[0]["detail"]["before"]["commandDelivery"] == "signed"
        unsigned = [r for r in records if r["action"] == "command.unsigned"]
        assert [(r["target"], r["detail"]["commandId"]) for r in unsigned] == [
            ("u-1", sent.json()["commandId"])
        ]

    # the command line sets it back, and shows it
    out = await asyncio.to_thread(served.cli, "devices", "list")
    assert "unsigned delivery" in out.output
    out = await asyncio.to_thread(
        served.cli, "devices", "set", "u-1", "--command-delivery", "signed", "--json"
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["commandDelivery"] == "signed"
    out = await asyncio.to_thread(served.cli, "devices", "set", "u-1", "--command-delivery", "maybe")
    assert out.exit_code != 0


# ---- HTTP device messaging ------------------------------------------------------------------------
def _basic(user: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}


EVENTS = "/api/v0002/device/types/{t}/devices/{d}/events/{e}"


async def test_http_device_messaging_stores_events_as_mqtt_does(served: Served) -> None:
    cred = served.register("h-1", "rpi")
    other = served.register("h-2", "rpi")
    reader = served.key(Roles(reader=True), ("h-1",))
    with context(served.settings) as ctx:
        org = ctx.org_id
    url = EVENTS.format(t="rpi", d="h-1", e="status")
    token = _basic("use-token-auth", cred)
    async with httpx.AsyncClient(base_url=served.base, timeout=10) as http:
        posts = [
            ({"Content-Type": "application/json"}, b'{"cpu": 0.5}', "json"),
            ({"Content-Type": "application/json; charset=utf-8"}, b"[1, 2]", "json"),
            ({"Content-Type": "text/plain"}, "21,5 °C".encode(), "text"),
            ({"Content-Type": "application/xml"}, b"<a>1</a>", "xml"),
            ({"Content-Type": "application/octet-stream"}, b"\x00\x01\xff", "bin"),
            ({}, b"no type at all", "bin"),
        ]
        for headers, body, _fmt in posts:
            r = await http.post(url, content=body, headers={**token, **headers})
            assert r.status_code == 200, r.text
            assert r.content == b""  # Watson's answer: 200, empty
        # the user name can also be the device's Watson client id
        r = await http.post(url, content=b"{}", headers={**_basic(f"d:{org}:rpi:h-1", cred), **posts[0][0]})
        assert r.status_code == 200, r.text
        assert served.count("h-1") == len(posts) + 1  # 200 only after the commit: no waiting here

        page = await http.get("/iotf/devices/h-1", params={"count": 20}, headers=reader)
        docs = list(reversed(page.json()["events"]))
        assert [d["format"] for d in docs] == [f for _h, _b, f in posts] + ["json"]
        assert all(d["eventType"] == "status" and d["typeId"] == "rpi" for d in docs)
        assert docs[0]["payload"] == {"cpu": 0.5}
        assert docs[2]["payload"] == "21,5 °C"
        assert base64.b64decode(docs[4]["payload"]) == b"\x00\x01\xff"

        # ---- attacks: nothing below may store anything ----
        stored = served.count()
        json_type = {"Content-Type": "application/json"}
        refused = {
            "no credentials": await http.post(url, content=b"{}", headers=json_type),
            "wrong credential": await http.post(
                url, content=b"{}", headers={**_basic("use-token-auth", "x" * 43), **json_type}
            ),
            "another device's credential": await http.post(
                url, content=b"{}", headers={**_basic("use-token-auth", other), **json_type}
            ),
            "another org": await http.post(
                url, content=b"{}", headers={**_basic("d:otherorg:rpi:h-1", cred), **json_type}
            ),
            "another device's client id": await http.post(
                url, content=b"{}", headers={**_basic(f"d:{org}:rpi:h-2", cred), **json_type}
            ),
            "another type in the path": await http.post(
                EVENTS.format(t="cam", d="h-1", e="s"), content=b"{}", headers={**token, **json_type}
            ),
            "an unknown device": await http.post(
                EVENTS.format(t="rpi", d="ghost", e="s"), content=b"{}", headers={**token, **json_type}
            ),
            "a bearer token": await http.post(
                url, content=b"{}", headers={"Authorization": f"Bearer {cred}", **json_type}
            ),
            "a malformed header": await http.post(
                url, content=b"{}", headers={"Authorization": "Basic !!!", **json_type}
            ),
        }
        for what, r in refused.items():
            assert r.status_code == 401, (what, r.status_code, r.text)
            assert r.headers["www-authenticate"].startswith("Basic"), what
            assert r.headers["content-type"] == "application/problem+json", what
            assert cred not in r.text
        bad_json = await http.post(url, content=b'{"a": NaN}', headers={**token, **json_type})
        assert bad_json.status_code == 400
        too_big = await http.post(url, content=b"x" * 4097, headers={**token, "Content-Type": "text/plain"})
        assert too_big.status_code == 413
        bad_id = await http.post(
            EVENTS.format(t="rpi", d="h-1", e="a%2Fb"), content=b"{}", headers={**token, **json_type}
        )
        assert bad_id.status_code in (404, 422)
        assert served.count() == stored

        # security events are written in batches, and identical ones within a second counted
        wanted = {
            ("h-1", "invalid credentials"),
            ("ghost", "invalid credentials"),
            ("h-1", "the device type does not match the registry"),
            ("h-1", "malformed Basic credentials"),
            ("h-1", "expected Basic credentials: use-token-auth and the device credential"),
        }
        seen: set[tuple[str, str]] = set()
        deadline = time.monotonic() + 10
        while seen != wanted and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            with context(served.settings) as ctx:
                failed = [
                    e
                    for e in ctx.store.list_security_events(kinds=["login_failed"])
                    if e.detail["via"] == "http"
                ]
            seen = {(e.detail["deviceId"], e.detail["reason"]) for e in failed}
        assert seen == wanted
        assert all(cred not in json.dumps(e.detail) for e in failed)

        # the device is the actor of its requests on the audit record
        admin = served.key(Roles(admin=True))
        audit = await http.get("/iotf/audit", headers=admin, params={"target": "h-1", "count": 1000})
        records = audit.json()["records"]
        posted = [r for r in records if str(r["detail"].get("route", "")).startswith("/api/v0002/")]
        assert {r["actor"] for r in posted if r["outcome"] == "success"} == {"device:h-1"}
        assert {r["actor"] for r in posted if r["outcome"] == "denied"} == {"anonymous"}
        assert any(r["action"] == "device.login" for r in records)  # the failures, as security events


async def test_http_device_messaging_throttles_guessing_and_slow_bodies(served: Served) -> None:
    cred = served.register("g-1", "rpi")
    url = EVENTS.format(t="rpi", d="g-1", e="e")
    async with httpx.AsyncClient(base_url=served.base, timeout=10) as http:
        codes = []
        for i in range(40):  # the default limit: 30 failures a minute per address
            r = await http.post(url, content=b"1", headers=_basic("use-token-auth", f"guess-{i}"))
            codes.append(r.status_code)
        assert codes[0] == 401
        assert codes[-1] == 429
        assert 429 in codes[:35]
        throttled = await http.post(url, content=b"1", headers=_basic("use-token-auth", "guess-x"))
        assert throttled.status_code == 429
        assert int(throttled.headers["retry-after"]) >= 1
        # from the throttled address, this device is not even checked any more ...
        r = await http.post(url, content=b"1", headers=_basic("use-token-auth", cred))
        assert r.status_code == 429
    # ... but the guessing cannot lock the device out: from its own address it gets in
    elsewhere = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=served.base, timeout=10, transport=elsewhere) as device:
        r = await device.post(url, content=b"1", headers=_basic("use-token-auth", cred))
        assert r.status_code == 200, r.text
    assert served.count("g-1") == 1

    # a body that trickles in is cut off (the server's body timeout is 2 s here)
    port = int(served.env["IOTVAULT_HTTP_PORT"])
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=("127.0.0.3", 0))
    auth = _basic("use-token-auth", cred)["Authorization"]
    writer.write(
        f"POST {url} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: text/plain\r\n"
        "Content-Length: 100\r\n\r\nabc".encode()
    )
    await writer.drain()
    started = time.monotonic()
    head = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408"), head
    assert time.monotonic() - started < 8
    assert served.count("g-1") == 1


# ---- importing a Watson device list -----------------------------------------------------------------
async def test_devices_import_issues_new_credentials_once_and_devices_use_them(
    served: Served, tmp_path: Path
) -> None:
    export = {
        "results": [
            {
                "typeId": "rpi",
                "deviceId": "imp-1",
                "clientId": "d:abc123:rpi:imp-1",
                "authToken": "OLD-TOKEN",
            },
            {"typeId": "rpi", "deviceId": "-imp2", "metadata": {"room": "hall"}},  # a spreadsheet's formula
            {"typeId": "cam", "deviceId": "imp-3"},
        ]
    }
    source = tmp_path / "export.json"
    source.write_text(json.dumps(export))
    creds_csv = tmp_path / "creds.csv"
    out = await asyncio.to_thread(
        served.cli, "devices", "import", str(source), "--credentials-file", str(creds_csv)
    )
    assert out.exit_code == 0, out.output
    assert "registered 3, already registered 0" in out.output
    assert creds_csv.stat().st_mode & 0o777 == 0o600
    lines = creds_csv.read_text().splitlines()
    assert lines[0] == '"typeId","deviceId","credential"'
    assert lines[2].startswith('"rpi","\'-imp2","')  # what a spreadsheet would run starts with '
    issued = {
        row[1].lstrip("'"): row[2].lstrip("'")
        for row in (line.replace('"', "").split(",") for line in lines[1:])
    }
    assert set(issued) == {"imp-1", "-imp2", "imp-3"}
    assert "OLD-TOKEN" not in creds_csv.read_text()  # Watson's token is never used
    assert all(c not in out.output for c in issued.values())  # written to the file only

    # an imported device posts with its new credential (and the old token is refused)
    async with httpx.AsyncClient(base_url=served.base, timeout=10) as http:
        url = EVENTS.format(t="rpi", d="imp-1", e="hello")
        ok = await http.post(
            url,
            content=b"{}",
            headers={**_basic("use-token-auth", issued["imp-1"]), "Content-Type": "application/json"},
        )
        assert ok.status_code == 200, ok.text
        old = await http.post(
            url,
            content=b"{}",
            headers={**_basic("use-token-auth", "OLD-TOKEN"), "Content-Type": "application/json"},
        )
        assert old.status_code == 401
    with context(served.settings) as ctx:
        dev = ctx.store.get_device("-imp2")
        assert dev is not None
        assert dev.metadata == {"room": "hall"}

    # again: nothing changes, no credential is issued, so none is printed
    again = await asyncio.to_thread(served.cli, "devices", "import", str(source), "--json")
    assert again.exit_code == 0, again.output
    assert again.output.strip() == ""
    plain = await asyncio.to_thread(served.cli, "devices", "import", str(source))
    assert "registered 0, already registered 3" in plain.output

    # a new device printed once to stdout, as JSON Lines with --json
    more = tmp_path / "more.csv"
    more.write_text("typeId,deviceId\nrpi,imp-4\nrpi,imp-1\n")
    printed = await asyncio.to_thread(served.cli, "devices", "import", str(more), "--json")
    assert printed.exit_code == 0, printed.output
    (doc,) = [json.loads(line) for line in printed.output.splitlines() if line.startswith("{")]
    assert (doc["deviceId"], doc["typeId"]) == ("imp-4", "rpi")
    assert len(doc["password"]) >= 40

    # the same id under another type: refused with its line, nothing registered
    clash = tmp_path / "clash.csv"
    clash.write_text("typeId,deviceId\nrpi,imp-5\ncam,imp-1\n")
    refused = await asyncio.to_thread(
        served.cli, "devices", "import", str(clash), "--credentials-file", str(tmp_path / "c2.csv")
    )
    assert refused.exit_code == 1
    assert "clash.csv:3: imp-1 is registered with type rpi, not cam" in refused.output
    assert not (tmp_path / "c2.csv").exists()
    with context(served.settings) as ctx:
        assert ctx.store.get_device("imp-5") is None

    # the credentials file is never overwritten, nor a link followed
    (tmp_path / "target").write_text("keep me")
    (tmp_path / "link.csv").symlink_to(tmp_path / "target")
    more.write_text("typeId,deviceId\nrpi,imp-6\n")
    for existing in (creds_csv, tmp_path / "link.csv"):
        r = await asyncio.to_thread(
            served.cli, "devices", "import", str(more), "--credentials-file", str(existing)
        )
        assert r.exit_code == 1
        assert "must be new" in r.output
    assert (tmp_path / "target").read_text() == "keep me"

    # a huge file is refused before it is read whole
    huge = tmp_path / "huge.csv"
    with huge.open("wb") as fh:
        fh.truncate(40 * 1024 * 1024)
    r = await asyncio.to_thread(served.cli, "devices", "import", str(huge))
    assert r.exit_code == 1
    assert "MiB" in r.output
    with context(served.settings) as ctx:
        assert ctx.store.get_device("imp-6") is None


async def test_an_api_only_node_stores_http_events_itself(
    tmp_path: Path, mosquitto: Any, server_factory: list[ServerProcess]
) -> None:
    env = server_env(tmp_path, broker_url=f"mqtt://{HOST}:{mosquitto.port}")
    settings = load_settings(environ=env)
    with context(settings) as ctx:
        cred = register_device(ctx, "rpi", "api-1").credential
    server = ServerProcess(env, tmp_path / "api.log", args=("--role", "api"))
    server_factory.append(server)
    await asyncio.to_thread(server.start)
    url = f"http://{HOST}:{env['IOTVAULT_HTTP_PORT']}" + EVENTS.format(t="rpi", d="api-1", e="e")
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(
            url, content=b"hello", headers={**_basic("use-token-auth", cred), "Content-Type": "text/plain"}
        )
    assert r.status_code == 200, r.text
    with context(settings) as ctx:
        (event,) = ctx.store.last_events("api-1", 5)
        assert (event.fmt, ctx.keyring.decrypt("api-1", event.event_id, event.payload)) == ("text", b"hello")


async def test_a_type_setting_reaches_its_registered_and_its_new_devices(
    served: Served, tmp_path: Path
) -> None:
    for device_id, type_id in (("t-1", "rpi"), ("t-2", "rpi"), ("c-1", "cam")):
        served.register(device_id, type_id)
    admin = served.key(Roles(admin=True))
    writer = served.key(Roles(reader=True, writer=True), ("t-1",))
    change = {"commandDelivery": "unsigned"}
    async with httpx.AsyncClient(base_url=served.base, timeout=10) as http:
        assert (await http.patch("/iotf/device-types/rpi", json=change, headers=writer)).status_code == 403
        assert (await http.patch("/iotf/device-types/rpi", json=change)).status_code == 401
        assert (await http.patch("/iotf/device-types/r%2Fx", json=change, headers=admin)).status_code in (
            404,
            422,
        )
        r = await http.patch("/iotf/device-types/rpi", json=change, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json() == {"typeId": "rpi", "commandDelivery": "unsigned", "devicesChanged": ["t-1", "t-2"]}
        served.register("t-3", "rpi")  # registered after: gets the type's setting
        source = tmp_path / "more.csv"
        source.write_text("typeId,deviceId\nrpi,t-4\ncam,c-2\n")
        out = await asyncio.to_thread(served.cli, "devices", "import", str(source), "--json")
        assert out.exit_code == 0, out.output
        listed = await http.get("/iotf/devices", headers=admin)
        delivery = {d["deviceId"]: d["commandDelivery"] for d in listed.json()["devices"]}
        assert delivery == {
            "t-1": "unsigned",
            "t-2": "unsigned",
            "t-3": "unsigned",
            "t-4": "unsigned",
            "c-1": "signed",  # another type: untouched
            "c-2": "signed",
        }
        # one device of the type can still be set on its own
        r = await http.patch("/iotf/devices/t-2", json={"commandDelivery": "signed"}, headers=admin)
        assert r.json()["commandDelivery"] == "signed"
        audit = await http.get(
            "/iotf/audit", headers=admin, params={"action": "device_type.command_delivery"}
        )
        (record,) = audit.json()["records"]
        assert (record["target"], record["detail"]["devicesChanged"]) == ("rpi", 2)

    out = await asyncio.to_thread(
        served.cli, "devices", "set-type", "rpi", "--command-delivery", "signed", "--json"
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["devicesChanged"] == ["t-1", "t-3", "t-4"]
    served.register("t-5", "rpi")
    with context(served.settings) as ctx:
        t5 = ctx.store.get_device("t-5")
        assert t5 is not None
        assert t5.command_delivery == "signed"
