"""Rotating the devices' data keys and re-encrypting stored events: a service, not a command.

``iotvault keys rotate [--reencrypt]`` calls it today; an admin route or a scheduled job can
call the same functions. Rotation starts a new key version per device (old events stay
readable under their version); re-encryption rewrites, page by page, only the events whose
record is not sealed under the device's current version, so an interrupted run resumes where
it stopped when started again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from iotvault.audit.changes import changed
from iotvault.context import Context

PAGE = 500
"""Events read and rewritten per transaction."""


def rotate_data_keys(ctx: Context) -> dict[str, int]:
    """A new data-key version for every registered device: ``{deviceId: version}``."""
    versions = {d: ctx.keyring.rotate(d) for d in ctx.store.device_ids()}
    changed("keys.rotate", "data keys", devices=len(versions))
    return versions


def reencrypt_events(
    ctx: Context, device_ids: Iterable[str], on_page: Callable[[int], None] = lambda _n: None
) -> int:
    """Rewrite the devices' events under their current keys; returns how many were rewritten.

    ``on_page`` is told how many events each page held (rewritten or not), for progress.
    """
    rewritten, done = 0, 0
    for device_id in device_ids:
        done += 1
        after: str | None = "0"
        while True:
            page = ctx.store.events_page(device_id, count=PAGE, after=after)
            if not page:
                break
            rows = []
            for e in page:
                if ctx.keyring.needs_reencrypt(e.device_id, e.event_id, e.payload):
                    plain = ctx.keyring.decrypt(e.device_id, e.event_id, e.payload)
                    rows.append(
                        (e.device_id, e.event_id, ctx.keyring.encrypt(e.device_id, e.event_id, plain))
                    )
            ctx.store.replace_payloads(rows)
            rewritten += len(rows)
            on_page(len(page))
            after = page[-1].event_id
    changed("keys.reencrypt", "events", devices=done, rewritten=rewritten)
    return rewritten
