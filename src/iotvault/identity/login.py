"""The client side of the device authorization grant (RFC 8628): what ``iotvault login`` runs.

A terminal or a headless machine cannot show a login page, so it asks the provider for a
device code, tells the person where to go and which code to type, and polls the token endpoint
until the person has allowed it (or denied it, or the code expired). It finds the endpoints by
discovery and checks that the discovery document names the issuer it was asked about, so a
wrong URL cannot hand the tokens to someone else's token endpoint.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from iotvault.errors import IdentityError, OAuthError

DEFAULT_SCOPE: Final = "openid profile offline_access"
_TIMEOUT_S: Final = 10.0
DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"


class LoginError(IdentityError):
    """``iotvault login`` could not talk to the provider; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Verification:
    """What the person must do: open ``uri`` and type ``user_code`` (or open ``uri_complete``)."""

    user_code: str
    uri: str
    uri_complete: str | None
    expires_in: int


def default_token_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "iotvault" / "token.json"


def save_tokens(path: Path, tokens: dict[str, Any]) -> None:
    """Write the tokens readable by their owner only (0600, in a 0700 directory)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)
        json.dump(tokens, fh, indent=2)
        fh.write("\n")


def _json(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        doc = response.json()
    except ValueError:
        raise LoginError(f"{what} answered {response.status_code} without JSON") from None
    if not isinstance(doc, dict):
        raise LoginError(f"{what} did not answer a JSON object")
    return doc


def device_login(
    issuer: str,
    *,
    client_id: str,
    scope: str = DEFAULT_SCOPE,
    show: Callable[[Verification], None],
    http: httpx.Client | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Run the device flow against ``issuer``; returns the token response."""
    client = http or httpx.Client(timeout=_TIMEOUT_S, follow_redirects=False)
    try:
        return _device_login(
            client, issuer.rstrip("/"), client_id=client_id, scope=scope, show=show, sleep=sleep
        )
    except httpx.HTTPError as exc:
        raise LoginError(f"cannot reach {issuer}: {exc} (set --url or IOTVAULT_PUBLIC_URL)") from None
    finally:
        if http is None:
            client.close()


def _device_login(
    http: httpx.Client,
    issuer: str,
    *,
    client_id: str,
    scope: str,
    show: Callable[[Verification], None],
    sleep: Callable[[float], None],
) -> dict[str, Any]:
    discovery = _json(http.get(issuer + "/.well-known/openid-configuration"), "the discovery document")
    if str(discovery.get("issuer", "")).rstrip("/") != issuer:
        raise LoginError(f"{issuer} is not an iotvault issuer (its discovery document names another)")
    device_endpoint = discovery.get("device_authorization_endpoint")
    token_endpoint = discovery.get("token_endpoint")
    if not isinstance(device_endpoint, str) or not isinstance(token_endpoint, str):
        raise LoginError(f"{issuer} does not offer the device authorization grant")
    started = _json(
        http.post(device_endpoint, data={"client_id": client_id, "scope": scope}), "device authorization"
    )
    if "error" in started:
        raise OAuthError(str(started["error"]), str(started.get("error_description", "")))
    show(
        Verification(
            user_code=str(started["user_code"]),
            uri=str(started["verification_uri"]),
            uri_complete=started.get("verification_uri_complete"),
            expires_in=int(started["expires_in"]),
        )
    )
    interval = max(1, int(started.get("interval", 5)))
    deadline = time.monotonic() + int(started["expires_in"])
    form = {"grant_type": DEVICE_GRANT, "device_code": str(started["device_code"]), "client_id": client_id}
    while time.monotonic() < deadline:
        sleep(interval)
        answer = _json(http.post(token_endpoint, data=form), "the token endpoint")
        error = answer.get("error")
        if error is None:
            return answer
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5
            continue
        raise OAuthError(str(error), str(answer.get("error_description", "")))
    raise OAuthError("expired_token", "the code expired before it was allowed")


def whoami(issuer: str, tokens: dict[str, Any], http: httpx.Client | None = None) -> str | None:
    """The user name the tokens belong to, asked of the userinfo endpoint (best effort)."""
    client = http or httpx.Client(timeout=_TIMEOUT_S, follow_redirects=False)
    try:
        discovery = client.get(issuer.rstrip("/") + "/.well-known/openid-configuration").json()
        info = client.get(
            discovery["userinfo_endpoint"], headers={"Authorization": f"Bearer {tokens['access_token']}"}
        ).json()
        name = info.get("preferred_username")
        return name if isinstance(name, str) else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return None
    finally:
        if http is None:
            client.close()
