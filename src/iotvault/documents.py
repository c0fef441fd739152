"""The JSON documents of users, groups, API keys and OAuth clients: one shape, two doors.

The admin API (``/iotf/users``, ``/iotf/groups``, ``/iotf/apikeys``, ``/iotf/clients``) returns
them and ``iotvault users|groups|apikeys|clients … --json`` prints them, so a script can move
between the two without translating. Field names are the seed's (``userName``, ``roleReader``);
times are UTC strings with milliseconds. Secrets are never part of a document: the one call that
makes a password, key password or client secret adds it to its own answer.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # records only: printing a user must not load the OpenID Connect provider
    from iotvault.domain.accounts import Roles
    from iotvault.identity.store import ClientRecord
    from iotvault.storage.accounts import ApiKeyRecord, GroupRecord, UserRecord


def iso(us: int | None) -> str | None:
    """``2026-11-22T10:00:00.123Z`` for microseconds since the epoch; None stays None.

    Whole-number arithmetic: a float division could round a time up into the next second.
    """
    if us is None:
        return None
    seconds, micros = divmod(us, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros // 1000:03d}Z"


def _roles(r: Roles) -> dict[str, bool]:
    """A group's or an API key's roles, as the seed's userGroup documents name them."""
    return {"roleAdmin": r.admin, "roleReader": r.reader, "roleWriter": r.writer}


def user_doc(u: UserRecord) -> dict[str, Any]:
    return {
        "userName": u.user_name,
        "displayName": u.display_name,
        "attributes": dict(u.attributes),
        "groups": list(u.groups),
        "disabled": u.disabled,
        "created": iso(u.created_us),
    }


def group_doc(g: GroupRecord) -> dict[str, Any]:
    return {
        "groupName": g.group_name,
        "displayName": g.display_name,
        **_roles(g.roles),
        "devices": list(g.devices),
        "members": list(g.members),
    }


def api_key_doc(k: ApiKeyRecord) -> dict[str, Any]:
    return {
        "key": k.key,
        "description": k.description,
        **_roles(k.roles),
        "devices": list(k.devices),
        "groups": list(k.groups),
        "expires": iso(k.expires_us),
        "lastUsed": iso(k.last_used_us),
        "revoked": iso(k.revoked_us),
        "createdBy": k.created_by,
        "created": iso(k.created_us),
    }


def client_doc(c: ClientRecord) -> dict[str, Any]:
    return {
        "clientId": c.client_id,
        "displayName": c.display_name,
        "confidential": not c.public,
        "redirectUris": list(c.redirect_uris),
        "postLogoutRedirectUris": list(c.post_logout_redirect_uris),
        "grantTypes": list(c.grant_types),
        "allowAnonymous": c.allow_anonymous,
        "createdBy": c.created_by,
        "created": iso(c.created_us),
    }
