"""``iotvault login`` and ``iotvault token``: a person's tokens for scripts and terminals.

``login`` runs the device authorization grant and saves the token response (0600) with the
issuer and client it came from. ``token`` prints a valid access token from that file,
refreshing it first when it expires within :data:`REFRESH_MARGIN_S` (the refresh token
rotates, so the file is rewritten) — what ``gcloud auth print-access-token`` does.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from iotvault import nodefile
from iotvault.cli.common import CliState, state
from iotvault.documents import iso

REFRESH_MARGIN_S = 30
_TIMEOUT_S = 10.0

TokenFileOption = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        dir_okay=False,
        help="Where the tokens are saved (0600). Default: $XDG_CONFIG_HOME/iotvault/token.json",
    ),
]


def default_issuer(st: CliState) -> str:
    """The running node's public URL (it may have moved to a free port), else the settings'."""
    s = st.settings
    running = nodefile.read(s.data_dir)
    return running.public_url if running is not None else s.public_url


def login(
    cli: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(
            help="iotvault's public URL, the issuer (default: the running node's, IOTVAULT_PUBLIC_URL)."
        ),
    ] = None,
    client_id: Annotated[
        str, typer.Option("--client-id", help="The OAuth client to log in as.")
    ] = "iotvault-cli",
    scope: Annotated[str, typer.Option(help="Scopes to ask for.")] = "openid profile offline_access",
    output: TokenFileOption = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the tokens as JSON instead of saving them.")
    ] = False,
) -> None:
    """Log in from a terminal with the device authorization grant (RFC 8628)."""
    from iotvault.identity.login import (
        Verification,
        default_token_file,
        device_login,
        save_tokens,
        whoami,
    )

    st = state(cli)
    err = st.err
    issuer = url or default_issuer(st)

    def show(v: Verification) -> None:
        err.print(f"To log in, open {v.uri} in a browser and enter the code {v.user_code}", highlight=False)
        if v.uri_complete:
            err.print(f"(or open {v.uri_complete})", highlight=False)
        err.print(f"waiting for you to allow it (the code expires in {v.expires_in // 60} minutes)...")

    tokens = device_login(issuer, client_id=client_id, scope=scope, show=show)
    if json_out:
        sys.stdout.write(json.dumps(tokens) + "\n")
        return
    path = output or default_token_file()
    save_tokens(path, {**tokens, "issuer": issuer.rstrip("/"), "client_id": client_id})
    who = whoami(issuer, tokens)
    err.print(f"logged in{f' as {who}' if who else ''}; tokens saved to {path}", highlight=False)
    err.print("scripts get a fresh access token with: iotvault token", highlight=False)


def access_token_expiry(token: str) -> int | None:
    """The ``exp`` of a JWT access token, read without checking it (the server checks it)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return int(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def refresh(saved: dict[str, Any], http: httpx.Client) -> dict[str, Any]:
    """Trade the saved refresh token for new tokens at the saved issuer's token endpoint."""
    from iotvault.errors import OAuthError
    from iotvault.identity.login import LoginError

    issuer, client_id, refresh_token = saved.get("issuer"), saved.get("client_id"), saved.get("refresh_token")
    if not (isinstance(issuer, str) and isinstance(client_id, str) and isinstance(refresh_token, str)):
        raise LoginError("the saved login cannot be refreshed (no refresh token); run 'iotvault login' again")
    try:
        discovery = http.get(issuer + "/.well-known/openid-configuration").json()
        if str(discovery.get("issuer", "")).rstrip("/") != issuer:
            raise LoginError(f"{issuer} is not the issuer of the saved login")
        answer = http.post(
            str(discovery["token_endpoint"]),
            data={"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id},
        ).json()
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LoginError(f"cannot refresh the login at {issuer}: {exc}; is iotvault running there?") from None
    if not isinstance(answer, dict) or "access_token" not in answer:
        error = answer.get("error", "refused") if isinstance(answer, dict) else "refused"
        raise OAuthError(str(error), "the saved login has expired or was revoked; run 'iotvault login' again")
    return {**saved, **answer}


def token(
    cli: typer.Context,
    output: TokenFileOption = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the token, its type and expiry as JSON.")
    ] = False,
) -> None:
    """Print a valid access token of the saved login, refreshing it if it is about to expire."""
    from iotvault.identity.login import LoginError, default_token_file, save_tokens

    state(cli)
    path = output or default_token_file()
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoginError(f"not logged in (no {path}); run 'iotvault login' first") from None
    except (OSError, ValueError) as exc:
        raise LoginError(f"cannot read the saved login {path}: {exc}") from None
    if not isinstance(saved, dict):
        raise LoginError(f"{path} is not a saved login; run 'iotvault login' again")
    expires = access_token_expiry(str(saved.get("access_token", "")))
    if expires is None or expires - REFRESH_MARGIN_S <= time.time():
        with httpx.Client(timeout=_TIMEOUT_S, follow_redirects=False) as http:
            saved = refresh(saved, http)
        save_tokens(path, saved)
        expires = access_token_expiry(str(saved["access_token"]))
    access = str(saved["access_token"])
    if json_out:
        doc = {
            "accessToken": access,
            "tokenType": "Bearer",
            "expiresOn": iso(expires * 1_000_000) if expires is not None else None,
        }
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        sys.stdout.write(access + "\n")


def register(app: typer.Typer) -> None:
    app.command()(login)
    app.command()(token)
