"""The Audit page (filters, paging, the chain's verification) and the alerts of the Security page.

Rendered on the server like the other administration pages: no script is needed, so the strict
Content-Security-Policy holds as it is. The page needs ``audit:read``, the permission of
``GET /iotf/audit``.

The verification status is the newest ``audit.verify`` record of the chain itself: the button
runs a full verification (it reads every record, so it is a deliberate act, not a page load) and
records its result, so every node and every administrator sees the same status and time, and
who ran it is on the record too.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from iotvault.api.routes.audit import MAX_CURSOR, audit_doc
from iotvault.api.security import client_address, services
from iotvault.audit.log import verify_log
from iotvault.auth.policy import Permission, Principal
from iotvault.clock import now_us
from iotvault.context import Context
from iotvault.documents import iso
from iotvault.domain.audit import AuditEntry
from iotvault.storage.audit import AlertRecord, AuditFilter, AuditStore
from iotvault.web.pages import form_of
from iotvault.web.render import Page, page

router = APIRouter(include_in_schema=False)

AuditReader = Annotated[Principal, Page(Permission.AUDIT_READ)]
PAGE_SIZE = 50
VERIFY_ACTION = "audit.verify"
_Text = Annotated[str, Query(max_length=200)]


def _store(ctx: Context) -> AuditStore:
    return AuditStore(ctx.engine, ctx.settings.effective_database_url)


def last_verification(store: AuditStore) -> dict[str, Any] | None:
    """The newest recorded verification: when, by whom, and what it found."""
    found = store.query(AuditFilter(action=VERIFY_ACTION), before_seq=None, limit=1)
    if not found:
        return None
    e = found[0].entry
    return {"time": iso(e.at_us), "actor": e.actor, "ok": e.outcome == "success", **dict(e.detail)}


def recent_alerts(ctx: Context, count: int = 50) -> list[AlertRecord]:
    return _store(ctx).list_alerts(limit=count)


@router.get("/audit")
async def audit_page(
    request: Request,
    principal: AuditReader,
    actor: _Text = "",
    action: _Text = "",
    target: _Text = "",
    outcome: Annotated[str, Query(pattern="^(|success|failure|denied|error)$")] = "",
    before: Annotated[int | None, Query(ge=1, le=MAX_CURSOR)] = None,
) -> Response:
    ctx = services(request).ctx

    def load() -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        ctx.audit.flush()  # this node's queued records are part of the page
        store = _store(ctx)
        where = AuditFilter(actor or None, action or None, target or None, outcome or None)
        rows = store.query(where, before_seq=before, limit=PAGE_SIZE)
        return [audit_doc(r) for r in rows], last_verification(store)

    records, verification = await run_in_threadpool(load)
    filters = {"actor": actor, "action": action, "target": target, "outcome": outcome}
    older = None
    if len(records) == PAGE_SIZE:  # the next page: these filters, before the oldest shown
        older = urlencode({"before": records[-1]["seq"], **{k: v for k, v in filters.items() if v}})
    return page(
        request,
        "audit.html",
        principal=principal,
        records=records,
        filters=filters,
        older=older,
        verification=verification,
    )


@router.post("/audit/verify")
async def verify(request: Request, principal: AuditReader) -> Response:
    await form_of(request)
    ctx = services(request).ctx

    def run() -> None:
        log = ctx.audit
        log.flush()
        verdict = verify_log(_store(ctx), log.public_key)
        log.record(
            AuditEntry(
                now_us(),
                f"{principal.kind}:{principal.id}",
                VERIFY_ACTION,
                "audit",
                "success" if verdict.ok else "failure",
                client=client_address(request),
                detail={
                    "checked": verdict.checked,
                    "firstBadRecord": verdict.bad_seq,
                    "reason": verdict.reason,
                },
            )
        )
        log.flush()

    await run_in_threadpool(run)
    return RedirectResponse("/audit", status_code=303)
