"""``iotvault clients …``: OAuth clients of the built-in OpenID Connect provider."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Column, Table

from iotvault.cli.common import JsonOption, YesOption, iso_text, opened, state
from iotvault.documents import client_doc

clients_app = typer.Typer(
    help="OAuth clients of the built-in OpenID Connect provider (apps, web apps, CLIs).", no_args_is_help=True
)


@clients_app.command("add")
def clients_add(
    cli: typer.Context,
    client_id: Annotated[str, typer.Argument(metavar="CLIENT_ID", help="clientId, e.g. iotvault-mobile")],
    name: Annotated[str, typer.Option("--name", help="Shown on the login page (default: CLIENT_ID).")] = "",
    redirect_uri: Annotated[
        list[str] | None,
        typer.Option("--redirect-uri", "-r", help="Exact redirect URI for the code flow (repeat)."),
    ] = None,
    post_logout_redirect_uri: Annotated[
        list[str] | None,
        typer.Option("--post-logout-redirect-uri", help="Where logout may send the browser back (repeat)."),
    ] = None,
    confidential: Annotated[
        bool,
        typer.Option("--confidential", help="A server-side app: gets a secret (HTTP Basic), shown once."),
    ] = False,
    device: Annotated[
        bool, typer.Option("--device", help="Allow the device authorization grant (terminals, headless).")
    ] = False,
    refresh: Annotated[bool, typer.Option("--refresh/--no-refresh", help="Issue refresh tokens.")] = True,
    anonymous: Annotated[
        bool, typer.Option("--anonymous", help='Offer anonymous login (tokens with amr ["anon"]).')
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """Register an OAuth client; a confidential client's secret is printed once."""
    from iotvault.identity import IdentityProvider
    from iotvault.identity.clients import AUTHORIZATION_CODE, DEVICE_CODE, REFRESH_TOKEN, add_client

    grants = ([AUTHORIZATION_CODE] if redirect_uri else []) + ([DEVICE_CODE] if device else [])
    if not grants:
        raise typer.BadParameter("give --redirect-uri (browser and app logins), --device, or both")
    if refresh:
        grants.append(REFRESH_TOKEN)
    out = state(cli).out
    with opened(cli) as ctx:
        new = add_client(
            IdentityProvider(ctx.settings, ctx).store,
            client_id,
            display_name=name,
            confidential=confidential,
            redirect_uris=redirect_uri or [],
            post_logout_redirect_uris=post_logout_redirect_uri or [],
            grant_types=grants,
            allow_anonymous=anonymous,
            created_by="cli",
        )
    if json_out:
        doc = client_doc(new.client)
        if new.secret is not None:
            doc["clientSecret"] = new.secret
        out.print_json(json.dumps(doc))
        return
    kind = "confidential" if confidential else "public (PKCE)"
    out.print(f"registered {kind} client {new.client.client_id}", highlight=False)
    if new.secret is not None:
        out.print(f"client secret (shown once): {new.secret}", highlight=False)


@clients_app.command("list")
def clients_list(cli: typer.Context, json_out: JsonOption = False) -> None:
    """List OAuth clients (never their secrets)."""
    from iotvault.identity import IdentityProvider

    out = state(cli).out
    with opened(cli, read_only=True) as ctx:
        clients = IdentityProvider(ctx.settings, ctx).store.list_clients()
    if json_out:
        out.print_json(json.dumps([client_doc(c) for c in clients]))
        return
    table = Table(
        Column("clientId", overflow="fold"), "type", "grants", "redirectUris", "anonymous", "created"
    )
    for c in clients:
        grants = ", ".join(g.rsplit(":", 1)[-1] for g in c.grant_types)
        table.add_row(
            c.client_id,
            "public" if c.public else "confidential",
            grants,
            "\n".join(c.redirect_uris),
            "yes" if c.allow_anonymous else "",
            iso_text(c.created_us),
        )
    out.print(table)


@clients_app.command("remove")
def clients_remove(
    cli: typer.Context, client_id: Annotated[str, typer.Argument(metavar="CLIENT_ID")], yes: YesOption = False
) -> None:
    """Remove an OAuth client; every token it holds is revoked."""
    from iotvault.identity import IdentityProvider
    from iotvault.identity.clients import remove_client

    if not yes:
        typer.confirm(f"Remove client {client_id} and revoke its tokens?", abort=True)
    with opened(cli) as ctx:
        store = IdentityProvider(ctx.settings, ctx).store
        store.on_change = ctx.accounts.on_change  # its revoked grants: running nodes are told
        remove_client(store, client_id)
    state(cli).out.print(f"removed client {client_id}; its tokens are revoked", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(clients_app, name="clients")
