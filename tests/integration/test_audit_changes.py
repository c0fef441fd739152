"""Administrative changes on the audit record, with the documents before and after.

Each change is made through the HTTP API (in process, over a real database), the web admin
pages' services or the command line's, and its record is then found in the chain: the actor,
the request id, the document before and after, and never a secret the change produced.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from apifixture import Api, running_api

from iotvault.accounts import create_api_key, revoke_api_key
from iotvault.audit.changes import Origin, origin
from iotvault.audit.monitor import AlertMonitor
from iotvault.datakeys import reencrypt_events, rotate_data_keys
from iotvault.devices import revoke_device_credential
from iotvault.documents import describe
from iotvault.domain.accounts import Roles
from iotvault.domain.audit import AuditRecord
from iotvault.storage.audit import AuditStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
async def api(tmp_path: Path, database_url: str) -> AsyncIterator[Api]:
    async with running_api(tmp_path, database_url) as a:
        yield a


def changes(api: Api) -> list[AuditRecord]:
    """Every record but the requests' own (those are the middleware's)."""
    api.ctx.audit.flush()
    store = AuditStore(api.ctx.engine, api.ctx.settings.effective_database_url)
    return [r for r in store.records(from_seq=1) if r.entry.action != "http.request"]


def one(records: list[AuditRecord], action: str, target: str) -> dict[str, Any]:
    found = [r.entry for r in records if r.entry.action == action and r.entry.target == target]
    assert len(found) == 1, f"{action} {target}: {[r.entry.action for r in records]}"
    entry = found[0]
    assert entry.outcome == "success"
    return {"actor": entry.actor, "request_id": entry.request_id, "client": entry.client, **entry.detail}


async def test_each_change_through_the_api_is_recorded_with_before_and_after(api: Api) -> None:
    root = {**api.auth("olga"), "X-Request-Id": "req-admin-1"}
    c = api.client
    secrets: list[str] = []

    r = await c.post("/iotf/users", json={"userName": "erin", "groups": ["readers-1"]}, headers=root)
    assert r.status_code == 201, r.text
    secrets.append(r.json()["password"])
    assert (
        await c.patch("/iotf/users/erin", json={"displayName": "Erin E."}, headers=root)
    ).status_code == 200
    r = await c.post("/iotf/users/erin/password", headers=root)
    secrets.append(r.json()["password"])
    r = await c.post("/iotf/groups", json={"groupName": "g9", "roleReader": True}, headers=root)
    assert r.status_code == 201, r.text
    assert (await c.patch("/iotf/groups/g9", json={"devices": ["d1"]}, headers=root)).status_code == 200
    assert (await c.put("/iotf/groups/g9/members/erin", headers=root)).status_code == 204
    assert (await c.delete("/iotf/groups/g9/members/erin", headers=root)).status_code == 204
    r = await c.post("/iotf/apikeys", json={"devices": ["d1"]}, headers=root)
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    secrets.append(r.json()["password"])
    assert (await c.delete(f"/iotf/apikeys/{key}", headers=root)).status_code == 204
    r = await c.post("/iotf/devices", json={"deviceId": "d9", "typeId": "thermo"}, headers=root)
    assert r.status_code == 201, r.text
    secrets.append(r.json()["password"])
    r = await c.post("/iotf/devices/d9/credential", json={}, headers=root)
    secrets.append(r.json()["password"])
    assert (await c.delete("/iotf/devices/d9", headers=root)).status_code == 204
    assert (await c.delete("/iotf/groups/g9", headers=root)).status_code == 204
    assert (await c.delete("/iotf/users/erin", headers=root)).status_code == 204

    records = changes(api)
    created = one(records, "user.create", "erin")
    assert created["actor"] == "user:olga"
    assert created["request_id"] == "req-admin-1"
    assert created["after"]["userName"] == "erin"
    assert created["after"]["groups"] == ["readers-1"]
    assert "before" not in created
    updated = one(records, "user.update", "erin")
    assert (updated["before"]["displayName"], updated["after"]["displayName"]) == ("erin", "Erin E.")
    assert one(records, "user.password.reset", "erin")["generated"] is True
    assert one(records, "user.delete", "erin")["before"]["displayName"] == "Erin E."
    assert one(records, "group.create", "g9")["after"]["roleReader"] is True
    group = one(records, "group.update", "g9")
    assert (group["before"]["devices"], group["after"]["devices"]) == ([], ["d1"])
    added = one(records, "group.member.add", "g9")
    assert "erin" in added["after"]["members"]
    assert "erin" not in added["before"]["members"]
    assert "erin" not in one(records, "group.member.remove", "g9")["after"]["members"]
    assert one(records, "group.delete", "g9")["before"]["devices"] == ["d1"]
    made = one(records, "apikey.create", key)
    assert made["after"]["devices"] == ["d1"]
    revoked = one(records, "apikey.revoke", key)
    assert revoked["before"]["revoked"] is None
    assert revoked["after"]["revoked"] is not None
    assert one(records, "device.register", "d9")["after"]["typeId"] == "thermo"
    assert one(records, "device.credential.rotate", "d9")["credential"] == "issued"
    deleted = one(records, "device.delete", "d9")
    assert deleted["before"]["deviceId"] == "d9"
    assert deleted["dataKeysDestroyed"] is True

    everything = json.dumps([r.entry.detail for r in records])
    for secret in secrets:
        assert secret not in everything
    assert "hash" not in everything.lower()  # no password, credential or key hash either


async def test_clients_credential_revocation_and_key_rotation(api: Api) -> None:
    root = api.auth("root")
    r = await api.client.post(
        "/iotf/clients",
        json={"clientId": "app9", "redirectUris": ["https://app.example/cb"], "confidential": True},
        headers=root,
    )
    assert r.status_code == 201, r.text
    client_secret = r.json()["clientSecret"]
    assert (await api.client.delete("/iotf/clients/app9", headers=root)).status_code == 204

    # the web pages and the command line share the services; the CLI's origin says "cli"
    with origin(Origin(api.ctx.audit.record, lambda: "cli", describe)):
        revoke_device_credential(api.ctx, "d1")
        versions = rotate_data_keys(api.ctx)
        rewritten = reencrypt_events(api.ctx, ["d1"])

    records = changes(api)
    assert one(records, "client.create", "app9")["after"]["confidential"] is True
    deleted = one(records, "client.delete", "app9")
    assert deleted["before"]["clientId"] == "app9"
    assert deleted["grantsRevoked"] is True
    assert one(records, "device.credential.revoke", "d1")["actor"] == "cli"
    assert one(records, "keys.rotate", "data keys")["devices"] == len(versions)
    assert one(records, "keys.reencrypt", "events")["rewritten"] == rewritten > 0
    assert client_secret not in json.dumps([r.entry.detail for r in records])


async def test_a_refused_change_records_nothing_but_the_request(api: Api) -> None:
    r = await api.client.post("/iotf/users", json={"userName": "mallory"}, headers=api.auth("alice"))
    assert r.status_code == 403
    assert not [r for r in changes(api) if r.entry.action.startswith("user.")]


async def test_using_a_revoked_api_key_raises_exactly_one_alert(api: Api) -> None:
    store = AuditStore(api.ctx.engine, api.ctx.settings.effective_database_url)
    raised: list[str] = []  # what the node's /metrics alert counter is told
    api.ctx.audit.observers.append(
        AlertMonitor(store, on_alert=lambda a: raised.append(a.kind.value)).observe_entry
    )
    new = create_api_key(api.ctx, roles=Roles(reader=True), devices=("d1",), created_by="test")
    other = create_api_key(api.ctx, roles=Roles(reader=True), devices=("d1",), created_by="test")
    headers = {"Authorization": "Basic " + base64.b64encode(f"{new.key}:{new.password}".encode()).decode()}
    assert (await api.client.get("/iotf/devices/d1", headers=headers)).status_code == 200
    revoke_api_key(api.ctx, new.key)
    for _ in range(3):  # the same episode: one alert, not three
        assert (await api.client.get("/iotf/devices/d1", headers=headers)).status_code == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(f"{other.key}:not-its-password".encode()).decode()}
    assert (await api.client.get("/iotf/devices/d1", headers=wrong)).status_code == 401  # not revoked

    alerts = store.list_alerts(kind="revoked_credential_use")
    assert [(a.subject, a.severity) for a in alerts] == [(f"apikey:{new.key}", "high")]
    assert raised == ["revoked_credential_use"]
    api.ctx.audit.flush()
    refused = [r.entry for r in store.records(from_seq=1) if r.entry.detail.get("revoked") is True]
    assert len(refused) == 3
    assert {e.detail["credential"] for e in refused} == {f"apikey:{new.key}"}
    assert new.password not in json.dumps([dict(e.detail) for e in refused])


async def test_without_request_records_changes_are_still_recorded(tmp_path: Path) -> None:
    async with running_api(tmp_path, audit_requests="false") as api:
        r = await api.client.post("/iotf/groups", json={"groupName": "g7"}, headers=api.auth("root"))
        assert r.status_code == 201, r.text
        assert (await api.client.get("/iotf/devices/d1", headers=api.auth("alice"))).status_code == 200
        api.ctx.audit.flush()
        store = AuditStore(api.ctx.engine, api.ctx.settings.effective_database_url)
        actions = [r.entry.action for r in store.records(from_seq=1)]
        assert "http.request" not in actions
        assert one(changes(api), "group.create", "g7")["actor"] == "user:root"
