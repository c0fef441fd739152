"""``GET /iotf/audit`` and ``GET /iotf/alerts``: the audit log and the alerts, for administrators.

Reading the audit log needs its own permission (``audit:read``), held by administrators; paging
is by cursor (``before``: the ``seq`` of the oldest record of the previous page), newest first.
The verification status shown is the result of a full verification run by this request when
``verify=true`` (it reads the whole chain: for scripts, ``iotvault audit verify`` does the same).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from iotvault.api.deps import Ctx, Requires
from iotvault.api.problems import Problem
from iotvault.api.schemas import ERRORS
from iotvault.audit.log import verify_log
from iotvault.auth.policy import Permission, Principal
from iotvault.documents import iso
from iotvault.domain.audit import AuditRecord
from iotvault.storage.audit import AlertRecord, AuditFilter, AuditStore

router = APIRouter(prefix="/iotf", tags=["audit"], responses=ERRORS)

AuditReader = Annotated[Principal, Requires(Permission.AUDIT_READ)]
_Text = Annotated[str | None, Query(max_length=200)]
MAX_CURSOR = 2**63 - 1  # the largest sequence number or id a database column holds


def audit_doc(r: AuditRecord) -> dict[str, Any]:
    e = r.entry
    return {
        "seq": r.seq,
        "timestamp": iso(e.at_us),
        "actor": e.actor,
        "action": e.action,
        "target": e.target,
        "outcome": e.outcome,
        "client": e.client,
        "requestId": e.request_id,
        "detail": dict(e.detail),
        "prevHash": r.prev_hash,
        "hash": r.hash,
    }


def alert_doc(a: AlertRecord) -> dict[str, Any]:
    return {
        "id": a.id,
        "timestamp": iso(a.at_us),
        "kind": a.kind,
        "subject": a.subject,
        "severity": a.severity,
        "count": a.count,
        "summary": a.summary,
        "delivery": a.delivery,
    }


def _us(value: datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise Problem(422, "times need a time zone, e.g. 2026-12-05T10:00:00Z")
    return int(value.timestamp() * 1_000_000)


@router.get("/audit", summary="Audit records, newest first, with filters and cursor paging")
async def audit_records(
    ctx: Ctx,
    _p: AuditReader,
    actor: _Text = None,
    action: _Text = None,
    target: _Text = None,
    outcome: Annotated[str | None, Query(pattern="^(success|failure|denied|error)$")] = None,
    since: Annotated[datetime | None, Query(description="ISO 8601 time, inclusive")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601 time, exclusive")] = None,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_CURSOR, description="records older than this seq (the cursor)")
    ] = None,
    count: Annotated[int, Query(ge=1, le=1000)] = 100,
    verify: Annotated[bool, Query(description="also verify the whole chain (reads every record)")] = False,
) -> Any:
    log = ctx.audit
    await run_in_threadpool(log.flush)  # what this node queued so far is part of the answer
    where = AuditFilter(actor, action, target, outcome, _us(since), _us(until))
    store = AuditStore(ctx.engine, ctx.settings.effective_database_url)
    page = await run_in_threadpool(store.query, where, before_seq=before, limit=count)
    body: dict[str, Any] = {
        "records": [audit_doc(r) for r in page],
        "next": page[-1].seq if len(page) == count else None,
    }
    if verify:
        verdict = await run_in_threadpool(verify_log, store, log.public_key)
        body["verification"] = {
            "ok": verdict.ok,
            "checked": verdict.checked,
            "firstBadRecord": verdict.bad_seq,
            "reason": verdict.reason,
            "publicKey": log.public_key,
        }
    return body


@router.get("/alerts", summary="Alerts raised from audit records and security events, newest first")
async def alerts(
    ctx: Ctx,
    _p: AuditReader,
    kind: Annotated[str | None, Query(pattern="^[a-z_]{1,32}$")] = None,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_CURSOR, description="alerts older than this id (the cursor)")
    ] = None,
    count: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Any:
    store = AuditStore(ctx.engine, ctx.settings.effective_database_url)
    page = await run_in_threadpool(store.list_alerts, kind=kind, before_id=before, limit=count)
    return {"alerts": [alert_doc(a) for a in page], "next": page[-1].id if len(page) == count else None}
