"""The web application in a real Chromium against a real ``iotvault serve``.

One server for the module (embedded broker, SQLite); a fresh browser per test. Screenshots of
the main pages land in docs/screenshots/ (the README shows them).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gmqtt
import httpx
import pytest
from gmqtt.mqtt.constants import MQTTv311
from playwright.async_api import expect

from iotvault.commands.keys import command_signing_key
from iotvault.config import load_settings
from iotvault.context import context
from iotvault.device.client import DeviceClient
from iotvault.device.connection import DeviceConnection, DeviceCredential
from iotvault.identity.store import IdentityStore
from iotvault.web.client import CLIENT_ID
from webfixture import PHONE, SCREENSHOTS, Site, browser_page, password, require_chromium, start_site

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICE_WORKER = Path(__file__).resolve().parents[2] / "src" / "iotvault" / "web" / "static" / "sw.js"
# form fields a screen reader could not name (no <label>, no aria-label)
UNLABELLED = """() => Array.from(document.querySelectorAll("input, select, textarea"))
    .filter(e => e.type !== "hidden" && !e.closest(".swagger-ui") && !(e.labels && e.labels.length)
                 && !e.getAttribute("aria-label"))
    .map(e => e.outerHTML)"""
ADMIN_PAGES = (
    "/admin/users",
    "/admin/groups",
    "/admin/devices",
    "/admin/apikeys",
    "/admin/clients",
    "/security",
    "/audit",
    "/admin/devices/thermo-1/access",
)
# text whose contrast with its background is below WCAG AA (4.5:1)
LOW_CONTRAST = """() => {
    const rgb = c => (c.match(/[\\d.]+/g) || []).map(Number);
    const linear = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    const weights = [0.2126, 0.7152, 0.0722];
    const lum = ([r, g, b]) => [r, g, b].map(linear).reduce((a, v, i) => a + v * weights[i], 0);
    const background = el => {
        for (let e = el; e; e = e.parentElement) {
            const c = rgb(getComputedStyle(e).backgroundColor);
            if (c.length === 3 || (c.length === 4 && c[3] > 0)) return c.slice(0, 3);
        }
        return [255, 255, 255];
    };
    const low = [];
    for (const el of document.querySelectorAll("header *, main *")) {
        if (el.closest(".swagger-ui, .u-legend, .chart") || !el.offsetParent) continue;
        const own = Array.from(el.childNodes).some(n => n.nodeType === 3 && n.textContent.trim());
        if (!own) continue;
        const [a, b] = [lum(rgb(getComputedStyle(el).color).slice(0, 3)), lum(background(el))];
        const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
        if (ratio < 4.5) low.push(`${el.tagName} ${el.textContent.trim().slice(0, 30)} ${ratio.toFixed(2)}`);
    }
    return low;
}"""
CACHED_URLS = """async () => {
    const urls = [];
    for (const name of await caches.keys()) {
        for (const request of await (await caches.open(name)).keys()) urls.push(request.url);
    }
    return urls;
}"""
UNSAFE = re.compile(r"unsafe-|\*")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_chromium()
    s = start_site(tmp_path_factory.mktemp("web"))
    try:
        yield s
    finally:
        assert s.server is not None
        s.server.stop()


async def sign_in(page: Any, user: str) -> None:
    await page.goto("/")
    await page.get_by_role("link", name="Sign in").click()
    await page.get_by_label("User name").fill(user)
    await page.get_by_label("Password").fill(password(user))
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url("**/devices")


def shot(name: str) -> str:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return str(SCREENSHOTS / f"{name}.png")


def live_grants(site: Site, user: str) -> list[object]:
    with context(load_settings(environ=site.env)) as ctx:
        store = IdentityStore(ctx.engine, ctx.accounts.url)
        return list(store.grants_of(user_name=user, client_id=CLIENT_ID))


def mqtt_port(site: Site) -> int:
    return int(site.env["IOTVAULT_MQTT_PORT"])


async def test_sign_in_shows_exactly_the_devices_one_may_read(site: Site) -> None:
    async with browser_page(site) as page:
        await sign_in(page, "alice")
        cards = page.locator("section.device-card h2")
        assert await cards.all_inner_texts() == ["thermo-1"]
        html = await page.content()
        assert "thermo-2" not in html
        assert "pump-1" not in html
        cookies = await page.context.cookies()
        assert [c["name"] for c in cookies if c["name"].startswith("iotvault-web")] == ["iotvault-web"]
        session = next(c for c in cookies if c["name"] == "iotvault-web")
        assert session["httpOnly"]
        assert session["sameSite"] == "Strict"
        assert not any("eyJ" in c["value"] for c in cookies)  # no token in the browser
        await page.goto("/devices")
        await page.screenshot(path=shot("devices-desktop"), full_page=True)


async def test_a_new_event_appears_live_in_table_and_chart(site: Site) -> None:
    async with browser_page(site) as page:
        await sign_in(page, "alice")
        overview = await page.context.new_page()  # the devices page follows its cards too
        await overview.goto("/devices")
        await page.goto("/devices/thermo-1")
        await expect(page.locator("#live")).to_have_text("live updates: on")
        cred = DeviceCredential("thermo-1", "thermo", site.credentials["thermo-1"])
        async with DeviceConnection(cred, "127.0.0.1", mqtt_port(site)) as device:
            for i in range(3):
                await device.publish_event("reading", {"d": {"temp": 20.5 + i, "hum": 40 + i, "label": "ok"}})
                await asyncio.sleep(0.3)
            assert await device.wait_acknowledged(timeout=10)
        row = page.locator("#events tbody tr").first
        await row.get_by_text("22.5").wait_for(timeout=10_000)
        card = overview.locator("section.device-card", has_text="thermo-1")
        await expect(card.locator("dl.values")).to_contain_text("22.5", timeout=10_000)
        await expect(card.locator(".status")).to_have_text("online")
        headers = await page.locator("#events thead th").all_inner_texts()
        assert {"d.temp", "d.hum", "d.label"} <= set(headers)
        legend = await page.locator("#chart .u-legend").inner_text()
        assert "d.temp" in legend
        assert "d.hum" in legend
        assert "d.label" not in legend
        await page.screenshot(path=shot("device-desktop"), full_page=True)


async def test_a_writer_sends_a_command_and_sees_it_acknowledged(site: Site) -> None:
    settings = load_settings(environ=site.env)
    with context(settings) as ctx:
        platform_key = command_signing_key(ctx.store, ctx.master).public
    seen: list[str] = []
    cred = DeviceCredential("thermo-1", "thermo", site.credentials["thermo-1"])
    device = DeviceClient(
        cred,
        "127.0.0.1",
        mqtt_port(site),
        platform_key=platform_key,
        state_file=None,
        on_command=lambda c: seen.append(c.name),
    )
    async with device, browser_page(site) as page:
        assert await device.wait_commands_ready(timeout=10)
        await sign_in(page, "bob")
        await page.goto("/devices/thermo-1")
        await page.get_by_label("Command name").fill("setInterval")
        await page.get_by_label("Payload (JSON object)").fill("[7]")  # not an object: said, not sent
        await page.get_by_role("button", name="Send").click()
        await expect(page.locator("#payload-error")).to_contain_text("JSON object")
        assert await page.locator("#command-list tr").count() == 0
        await page.get_by_label("Payload (JSON object)").fill('{"interval": 7}')
        await page.get_by_role("button", name="Send").click()
        status = page.locator("#command-list .command-status").first
        await expect(status).to_have_text(re.compile(r"^sent|^acknowledged"), timeout=10_000)
        await expect(status).to_have_text(re.compile(r"^acknowledged"), timeout=20_000)
        assert seen == ["setInterval"]


async def test_a_reader_sees_no_form_and_a_forged_post_is_refused(site: Site) -> None:
    async with browser_page(site) as page:
        await sign_in(page, "alice")
        await page.goto("/devices/thermo-1")
        assert await page.locator("#command-form").count() == 0
        forged = """async (withToken) => {
            const headers = {"Content-Type": "application/json"};
            const token = document.querySelector('meta[name="csrf-token"]').content;
            if (withToken) headers["X-CSRF-Token"] = token;
            const r = await fetch("/iotf/devices/thermo-1/commands", {method: "POST", headers,
                body: JSON.stringify({command: "open", payload: {}})});
            return [r.status, (await r.json()).detail];
        }"""
        status, detail = await page.evaluate(forged, True)
        assert status == 403
        assert "device:command" in detail
        status, detail = await page.evaluate(forged, False)
        assert status == 403
        assert "CSRF" in detail
        # a page of another site, even holding the token, is refused by its Origin
        cookie = next(c for c in await page.context.cookies() if c["name"] == "iotvault-web")
        token = await page.locator('meta[name="csrf-token"]').get_attribute("content")
    async with httpx.AsyncClient(base_url=site.url) as http:
        r = await http.post(
            "/iotf/devices/thermo-1/commands",
            json={"command": "open"},
            headers={
                "Cookie": f"iotvault-web={cookie['value']}",
                "X-CSRF-Token": token or "",
                "Origin": "https://elsewhere.example",
            },
        )
    assert r.status_code == 403
    assert "cross-origin" in r.json()["detail"]


async def test_a_non_admin_is_refused_admin_pages(site: Site) -> None:
    async with browser_page(site) as page:
        await sign_in(page, "alice")
        for path in ADMIN_PAGES:
            answer = await page.goto(path)
            assert answer is not None, path
            assert answer.status == 403, path
        assert await page.get_by_role("link", name="Admin").count() == 0


async def test_an_admin_registers_a_device_and_sees_its_credential_once(site: Site) -> None:
    async with browser_page(site) as page:
        await sign_in(page, "root")
        await page.goto("/admin/devices")
        await page.get_by_label("Device id").fill("valve-9")
        await page.get_by_label("Type id").fill("valve")
        await page.get_by_role("button", name="Register").click()
        await page.get_by_role("heading", name="Device valve-9 registered").wait_for()
        credential = (await page.locator("code.secret").inner_text()).strip()
        assert len(credential) >= 32
        details = await page.locator("dl.secrets").inner_text()
        assert "Client id" in details
        assert "iot-2/type/valve/id/valve-9/evt/" in details
        assert str(mqtt_port(site)) in details
        await page.screenshot(
            path=shot("admin-device-registered"), full_page=True, mask=[page.locator("code.secret")]
        )
        # the credential works on the broker, and is never shown again
        async with DeviceConnection(
            DeviceCredential("valve-9", "valve", credential), "127.0.0.1", mqtt_port(site)
        ) as dev:
            await dev.publish_event("state", {"open": False})
            assert await dev.wait_acknowledged(timeout=10)
        await page.goto("/admin/devices")
        assert credential not in await page.content()
        await page.goto("/admin/devices/thermo-1/access")
        table = await page.locator("#access").inner_text()
        assert "alice" in table
        assert "bob" in table
        assert "maria" in table
        assert "root" not in table
        await page.screenshot(path=shot("admin-access"), full_page=True)


async def test_audit_page_verifies_the_chain_and_security_lists_a_revoked_key_alert(site: Site) -> None:
    async with browser_page(site) as page:
        await sign_in(page, "root")
        await page.goto("/admin/apikeys")
        await page.get_by_label("Description").fill("leaked-later")
        await page.get_by_role("button", name="Create key").click()
        key, key_password = (t.strip() for t in await page.locator("code.secret").all_inner_texts())
        await page.goto("/admin/apikeys")
        await page.get_by_role("button", name=f"Revoke {key}").click()
        async with httpx.AsyncClient(base_url=site.url, auth=(key, key_password)) as http:
            assert (await http.get("/iotf/devices")).status_code == 401

        await page.goto("/audit")
        await page.get_by_label("Action").fill("apikey.revoke")
        await page.get_by_role("button", name="Filter").click()
        await page.wait_for_url("**/audit?*action=apikey.revoke*")
        rows = page.locator("#audit-records tbody tr")
        assert await rows.count() == 1
        row = await rows.first.inner_text()
        assert key in row
        assert "user:root" in row
        assert key_password not in await page.content()
        await page.get_by_role("button", name="Verify the whole chain now").click()
        await page.wait_for_url("**/audit")
        status = page.locator("#audit-verification")
        await expect(status).to_have_attribute("data-ok", "true")
        await expect(status).to_contain_text("Intact")
        await expect(status.locator("time")).to_have_attribute("datetime", re.compile(r"^\d{4}-.*Z$"))
        await page.screenshot(path=shot("audit-desktop"), full_page=True)

        for _ in range(50):  # the alert is raised as the node writes the record
            await page.goto("/security")
            alerts = await page.locator("#security-alerts tbody").inner_text()
            if "revoked_credential_use" in alerts:
                break
            await asyncio.sleep(0.2)
        assert "revoked_credential_use" in alerts
        assert f"apikey:{key}" in alerts


async def test_access_api_answers_from_the_policy(site: Site) -> None:
    async with browser_page(site) as page:
        await sign_in(page, "root")
        doc = await page.evaluate("async () => (await fetch('/iotf/devices/pump-1/access')).json()")
    rows = {(a["kind"], a["id"]): a for a in doc["access"]}
    assert rows[("anonymous", "anonymous")]["read"] is True
    assert rows[("user", "maria")]["readVia"] == ["readers-all"]
    assert ("user", "alice") not in rows
    assert ("user", "root") not in rows
    assert not any(a["command"] for a in doc["access"])


async def test_anonymous_sign_in_sees_what_the_anonymous_group_grants(site: Site) -> None:
    async with browser_page(site) as page:
        await page.goto("/")
        await page.get_by_role("link", name="Continue without an account").click()
        await page.wait_for_url("**/devices")
        assert await page.locator("section.device-card h2").all_inner_texts() == ["pump-1"]


async def test_logout_ends_the_session_and_revokes_the_tokens(site: Site) -> None:
    async with browser_page(site) as page:
        await sign_in(page, "maria")
        assert live_grants(site, "maria")  # the session's tokens, held by the server
        cookie = next(c for c in await page.context.cookies() if c["name"] == "iotvault-web")
        await page.get_by_role("button", name="Sign out").click()
        await page.wait_for_url(site.url + "/")
        await page.get_by_role("link", name="Sign in").wait_for()
    # the old cookie opens nothing any more
    async with httpx.AsyncClient(base_url=site.url, cookies={"iotvault-web": cookie["value"]}) as http:
        r = await http.get("/iotf/devices")
        assert r.status_code == 401
    assert live_grants(site, "maria") == []  # revoked: the API refuses their access tokens too


async def test_pages_have_a_strict_csp_and_no_external_urls(site: Site) -> None:
    async with browser_page(site) as page:
        violations: list[str] = []
        page.on(
            "console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None
        )
        external: list[str] = []
        page.on("request", lambda r: external.append(r.url) if not r.url.startswith(site.url) else None)
        await page.goto("/auth/login")  # one wrong password first: the security page shows it
        await page.get_by_label("User name").fill("root")
        await page.get_by_label("Password").fill("not-the-password")
        await page.get_by_role("button", name="Sign in").click()
        await page.get_by_text("is not right").wait_for()
        await sign_in(page, "root")
        for path in ("/", "/devices", *ADMIN_PAGES, "/docs"):
            answer = await page.goto(path)
            assert answer is not None, path
            assert answer.ok, path
            csp = (await answer.all_headers())["content-security-policy"]
            assert not UNSAFE.search(csp), (path, csp)
            assert "script-src 'self'" in csp, (path, csp)
            unlabelled = await page.evaluate(UNLABELLED)
            assert unlabelled == [], (path, unlabelled)
            low = await page.evaluate(LOW_CONTRAST)
            assert low == [], (path, low)
            html = await page.content()
            for url in re.findall(r'(?:src|href|action)="([^"]+)"', html):
                assert url.startswith(("/", "#", "?", site.url)), (path, url)
        # the contrast check sees a pale text when there is one
        pale = "() => { const p = document.createElement('p'); p.textContent = 'pale';"
        pale += " p.style.color = '#cccccc'; document.querySelector('main').appendChild(p); }"
        await page.evaluate(pale)
        assert len(await page.evaluate(LOW_CONTRAST)) == 1
        await page.goto("/docs")
        await page.locator(".swagger-ui .opblock").first.wait_for(timeout=20_000)
        await page.screenshot(path=shot("docs"))
        await page.goto("/security")
        await page.locator("#security-events tbody tr").first.wait_for(timeout=10_000)
        await page.screenshot(path=shot("security-desktop"), full_page=True)
        await page.get_by_label("Kind").select_option("oidc_login_failed")
        kinds = await page.locator("#security-events tbody tr td:nth-child(2)").all_inner_texts()
        assert kinds
        assert set(kinds) == {"oidc_login_failed"}
        await page.get_by_label("User or subject").fill("nobody-by-this-name")
        assert await page.locator("#security-events tbody tr").count() == 0
        failures = await page.locator("#auth-chart .u-legend").inner_text()
        assert "failures" in failures
        assert not violations, violations
        assert not external, external


async def test_a_phone_shows_one_device_per_tab(site: Site) -> None:
    async with browser_page(site, PHONE) as page:
        await sign_in(page, "maria")
        tabs = page.get_by_role("tab")
        assert await tabs.all_inner_texts() == ["pump-1", "thermo-1", "thermo-2"]
        assert [await p.is_visible() for p in await page.locator("section.device-card").all()] == [
            True,
            False,
            False,
        ]
        await page.screenshot(path=shot("devices-phone"), full_page=True)
        await tabs.nth(0).focus()
        await page.keyboard.press("ArrowRight")  # keyboard moves between tabs
        assert [await p.is_visible() for p in await page.locator("section.device-card").all()] == [
            False,
            True,
            False,
        ]
        manifest = await page.evaluate("async () => (await fetch('/manifest.webmanifest')).json()")
        assert manifest["display"] == "standalone"
        assert manifest["icons"]
        await page.goto("/devices/thermo-1")
        await page.screenshot(path=shot("device-phone"), full_page=True)
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"]  # nothing wider than the phone
        # installable: the service worker runs, and what it cached is the shell, nothing else
        await page.evaluate("navigator.serviceWorker.ready.then(() => true)")
        await page.reload()
        await page.goto("/devices")
        cached = await page.evaluate(CACHED_URLS)
        assert cached
        assert all("/static/" in url for url in cached), cached


def test_the_service_worker_caches_the_shell_only(site: Site) -> None:
    shell = re.findall(r'"(/[^"]+)"', SERVICE_WORKER.read_text().split("];")[0])
    assert shell
    assert all(p.startswith("/static/") for p in shell)
    with httpx.Client(base_url=site.url) as http:
        r = http.get("/sw.js")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/javascript")
        for path in shell:
            assert http.get(path).status_code == 200, path


async def test_an_admin_adds_and_disables_a_user_and_changes_a_group(site: Site) -> None:
    async with browser_page(site) as admin, browser_page(site) as other:
        await sign_in(admin, "root")
        await admin.goto("/admin/users")
        await admin.get_by_label("User name").fill("zoe")
        await admin.get_by_label("Groups (comma-separated)").fill("readers-1")
        await admin.get_by_role("button", name="Add user").click()
        zoe_password = (await admin.locator("code.secret").inner_text()).strip()
        # zoe signs in with the password shown once, and sees what readers-1 grants
        await other.goto("/auth/login")
        await other.get_by_label("User name").fill("zoe")
        await other.get_by_label("Password").fill(zoe_password)
        await other.get_by_role("button", name="Sign in").click()
        await other.wait_for_url("**/devices")
        assert await other.locator("section.device-card h2").all_inner_texts() == ["thermo-1"]
        # a group change reaches her next page: readers-1 now also holds thermo-2
        await admin.goto("/admin/groups")
        await admin.get_by_label("Devices of readers-1 (comma-separated)").fill("thermo-1, thermo-2")
        await admin.get_by_role("button", name="Save readers-1").click()
        await admin.wait_for_url("**/admin/groups")
        await asyncio.sleep(5.5)  # the API caches a token's principal for at most 5 s
        await other.goto("/devices")
        assert await other.locator("section.device-card h2").all_inner_texts() == ["thermo-1", "thermo-2"]
        # disabled: her session opens nothing any more
        await admin.goto("/admin/users")
        await admin.get_by_role("button", name="Disable zoe").click()
        await admin.wait_for_url("**/admin/users")
        assert "disabled" in await admin.locator("tr", has_text="zoe").inner_text()
        await asyncio.sleep(5.5)
        answer = await other.goto("/devices")
        assert answer is not None
        assert other.url == site.url + "/"  # back at the start: not signed in
        await admin.goto("/admin/groups")
        await admin.get_by_label("Devices of readers-1 (comma-separated)").fill("thermo-1")
        await admin.get_by_role("button", name="Save readers-1").click()


async def test_text_events_and_unsigned_delivery_show_on_the_device_page(site: Site) -> None:
    import gmqtt  # noqa: PLC0415
    from gmqtt.mqtt.constants import MQTTv311  # noqa: PLC0415

    from iotvault.devices import set_command_delivery  # noqa: PLC0415
    from iotvault.domain.commands import Delivery  # noqa: PLC0415

    settings = load_settings(environ=site.env)
    with context(settings) as ctx:
        set_command_delivery(ctx, "thermo-1", Delivery.UNSIGNED)
    received: asyncio.Queue[bytes] = asyncio.Queue()
    client = gmqtt.Client("thermo-1", clean_session=True)
    client.set_config({"reconnect_retries": -2})
    client.set_auth_credentials("thermo-1", site.credentials["thermo-1"])
    client.on_message = lambda _c, _t, payload, _q, _p: received.put_nowait(payload) or 0
    try:
        await client.connect("127.0.0.1", mqtt_port(site), version=MQTTv311)
        client.subscribe("iot-2/type/thermo/id/thermo-1/cmd/+/fmt/json", qos=1)
        async with browser_page(site) as page:
            await sign_in(page, "bob")
            await page.goto("/devices/thermo-1")
            await expect(page.locator("#unsigned-delivery")).to_contain_text("Unsigned delivery")
            await expect(page.locator("#live")).to_have_text("live updates: on")
            client.publish("iot-2/type/thermo/id/thermo-1/evt/note/fmt/text", b"<b>door open</b>", qos=1)
            row = page.locator("#events tbody tr").first
            await row.get_by_text("<b>door open</b>").wait_for(timeout=10_000)  # as text, not markup
            assert "text" in await page.locator("#events thead th").all_inner_texts()
            await page.get_by_label("Command name").fill("open")
            await page.get_by_label("Payload (JSON object)").fill('{"door": 1}')
            await page.get_by_role("button", name="Send").click()
            status = page.locator("#command-list .command-status").first
            await expect(status).to_have_text("delivered — unsigned delivery", timeout=10_000)
        assert await asyncio.wait_for(received.get(), 10) == b'{"door":1}'
    finally:
        with context(settings) as ctx:
            set_command_delivery(ctx, "thermo-1", Delivery.SIGNED)
        await client.disconnect()


async def test_an_admin_makes_a_watson_form_key_that_a_watson_application_logs_in_with(site: Site) -> None:
    async with browser_page(site) as page:
        await sign_in(page, "root")
        await page.goto("/admin/apikeys")
        help_text = await page.locator("#watson-help").inner_text()
        org = re.search(r"organization (\S+)\.", help_text)
        assert org is not None, help_text
        await page.get_by_label("Description").fill("watson-app")
        await page.get_by_label("Watson form key id").check()
        await page.get_by_role("button", name="Create key").click()
        await page.get_by_role("heading", name="API key created").wait_for()
        key, key_password = (t.strip() for t in await page.locator("code.secret").all_inner_texts())
        assert key.startswith(f"a-{org[1]}-")
        assert "client id a:<org>:<appId>" in await page.locator("main").inner_text()
        # the key logs in as a Watson application over MQTT
        app = gmqtt.Client(f"a:{org[1]}:webapp", clean_session=True)
        app.set_config({"reconnect_retries": -2})
        app.set_auth_credentials(key, key_password)
        await asyncio.wait_for(app.connect("127.0.0.1", mqtt_port(site), version=MQTTv311), 5)
        await app.disconnect()
        # an ordinary key keeps the ordinary form
        await page.goto("/admin/apikeys")
        await page.get_by_label("Description").fill("plain")
        await page.get_by_role("button", name="Create key").click()
        plain = (await page.locator("code.secret").first.inner_text()).strip()
        assert not plain.startswith("a-")
