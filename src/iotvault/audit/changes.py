"""Administrative changes on the audit record, with the document before and after.

The services that change things (:mod:`iotvault.accounts`, :mod:`iotvault.devices`,
:mod:`iotvault.datakeys`, the OAuth client routes) call :func:`changed` with the records they
read before and after the change. Who asked, from where and in which request is not theirs to
know: the HTTP middleware (:mod:`iotvault.api.audit`) and the command line set an
:class:`Origin` for the duration of a request or command, in a context variable that follows the
call into worker threads. Outside any origin (a unit test, an import) nothing is recorded.

Records become documents through the origin's ``describe``: the API's documents
(:mod:`iotvault.documents`), which hold no secret (no password hash, no credential, no API
key password), so the before/after in the chain never does either. Services pass records, never
documents, because documents sit above them in the import layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

from iotvault.clock import now_us
from iotvault.domain.audit import AuditEntry

__all__ = ["Origin", "changed", "enter_origin", "leave_origin", "origin"]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where the changes of one request or command come from, and where they are recorded."""

    record: Callable[[AuditEntry], None]
    actor: Callable[[], str]  # read when a change happens: the principal is known only by then
    describe: Callable[[Any], Any]
    client: str = ""
    request_id: str = ""


# How to make the origin of the changes in this context, not the origin itself: the HTTP
# middleware sets one for every request, and most requests (reads) change nothing, so it builds
# the Origin only when a change asks for it (BENCHMARKS.md, issue 17, "Audit record cost").
_ORIGIN: ContextVar[Callable[[], Origin] | None] = ContextVar("iotvault_audit_origin", default=None)


@contextmanager
def origin(where: Origin) -> Iterator[None]:
    """Changes made inside come from ``where`` (a command, a test)."""
    token = _ORIGIN.set(lambda: where)
    try:
        yield
    finally:
        _ORIGIN.reset(token)


def enter_origin(make: Callable[[], Origin]) -> Token[Callable[[], Origin] | None]:
    """Changes made from now on in this context come from the origin ``make()`` returns; for the
    HTTP middleware, which calls it for every request (:func:`origin` is a context manager of
    this pair). Undo with :func:`leave_origin`."""
    return _ORIGIN.set(make)


def leave_origin(token: Token[Callable[[], Origin] | None]) -> None:
    _ORIGIN.reset(token)


def changed(
    action: str,
    target: str,
    *,
    before: Any = None,
    after: Any = None,
    outcome: str = "success",
    **detail: Any,
) -> None:
    """Record ``action`` on ``target`` (``before``/``after`` are records, or None)."""
    make = _ORIGIN.get()
    if make is None:
        return
    where = make()
    d: dict[str, Any] = dict(detail)
    if before is not None:
        d["before"] = where.describe(before)
    if after is not None:
        d["after"] = where.describe(after)
    where.record(
        AuditEntry(now_us(), where.actor(), action, target[:200], outcome, where.client, where.request_id, d)
    )
