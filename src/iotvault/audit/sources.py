"""What becomes an audit record: security events (broker, identity provider, HTTP edge).

The identity provider and the broker already report what they refuse and grant as security
events (:mod:`iotvault.storage.security_events`); the node hands each batch of them here, and
each becomes one audit record, so logins, lockouts, revocations and broker denials are on the
chain without a second call at every place that notices them. HTTP requests are recorded by
:mod:`iotvault.api.audit`, commands and administrative changes through it.

A name typed into a login form that failed may be a password typed into the wrong field, so it
is never written in clear: it becomes ``name#<keyed hash>`` (HMAC-SHA256 under a key of this
installation), which still lets failures against one name be counted and correlated.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any, Final

from iotvault.domain.audit import AuditEntry
from iotvault.storage.repository import SecurityEvent

__all__ = ["NameHasher", "entry_of_security_event"]

# identity-provider event kinds (``oidc_<kind>``) that are a success of the one named
_OIDC_SUCCESS: Final = frozenset(
    {
        "login_succeeded",
        "anonymous_login",
        "logout",
        "token_issued",
        "token_refreshed",
        "token_revoked",
        "device_approved",
        "allow",
    }
)
_BROKER_LOGIN: Final = frozenset({"login_failed", "login_throttled"})
_KEPT_DETAIL: Final = ("action", "reason", "topic", "count", "repeated", "window_s", "clientId", "folded")


class NameHasher:
    """``name#<16 hex>``: a keyed hash of a name that must not be stored in clear."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __call__(self, name: str) -> str:
        digest = hmac.new(self._key, b"login-name\0" + name.encode("utf-8", "replace"), hashlib.sha256)
        return "name#" + digest.hexdigest()[:16]


def _detail(detail: Mapping[str, Any]) -> dict[str, Any]:
    return {k: detail[k] for k in _KEPT_DETAIL if k in detail and detail[k] not in (None, "")}


def entry_of_security_event(event: SecurityEvent, hash_name: NameHasher) -> AuditEntry:
    """One audit entry for one security event, secrets and typed names kept out."""
    d = event.detail
    address = str(d.get("address") or "")[:64]
    kind = event.kind
    if kind.startswith("oidc_"):
        what = kind.removeprefix("oidc_")
        success = what in _OIDC_SUCCESS
        user = event.subject if event.subject != "-" else ""
        target = user if success or not user else hash_name(user)
        actor = f"user:{user}" if success and user else "anonymous"
        return AuditEntry(
            event.at_us, actor, f"oidc.{what}", target, "success" if success else "failure",
            client=address, detail=_detail(d),
        )  # fmt: skip
    if kind in _BROKER_LOGIN:
        return AuditEntry(
            event.at_us, f"device:{event.subject}", "device.login", event.subject, "denied",
            client=address, detail={**_detail(d), "kind": kind},
        )  # fmt: skip
    if kind == "acl_denied":
        action = f"device.{d.get('action', 'publish')}"
        return AuditEntry(
            event.at_us, f"device:{event.subject}", action, event.subject, "denied",
            client=address, detail=_detail(d),
        )  # fmt: skip
    outcome = "denied" if kind.endswith(("_denied", "_refused", "_violation", "_throttled")) else "error"
    if kind.startswith("command"):
        outcome = "failure"
    return AuditEntry(
        event.at_us, "system", f"security.{kind}", event.subject, outcome, client=address, detail=_detail(d)
    )
