"""``iotvault apikeys …`` and ``iotvault seed import``: third-party keys, the seed's documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Column, Table

from iotvault import accounts as account_services
from iotvault.cli.common import JsonOption, iso_text, opened, read_json, roles_text, state
from iotvault.documents import api_key_doc
from iotvault.domain.accounts import Roles

apikeys_app = typer.Typer(help="API keys for third-party programs (HTTP Basic).", no_args_is_help=True)
seed_app = typer.Typer(help="Import the seed's user and userGroup documents.", no_args_is_help=True)


@apikeys_app.command("add")
def apikeys_add(
    cli: typer.Context,
    reader: Annotated[bool, typer.Option("--reader", help="Read its devices' events.")] = False,
    writer: Annotated[bool, typer.Option("--writer", help="Command its devices.")] = False,
    admin: Annotated[bool, typer.Option("--admin", help="Manage accounts and devices.")] = False,
    device: Annotated[list[str] | None, typer.Option("--device", "-d", help="A deviceId (repeat).")] = None,
    group: Annotated[
        list[str] | None, typer.Option("--group", "-g", help="A group whose devices it may use (repeat).")
    ] = None,
    expires_in: Annotated[
        int | None, typer.Option("--expires-in", min=1, max=3650, metavar="DAYS", help="Expire after DAYS.")
    ] = None,
    description: Annotated[str, typer.Option(help="What the key is for.")] = "",
    watson: Annotated[
        bool,
        typer.Option(
            "--watson", help="A key id of Watson's form (a-<org>-...), for Watson IoT application clients."
        ),
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """Create an API key; prints its key and password once (only a hash is kept)."""
    from iotvault.clock import now_us

    out = state(cli).out
    with opened(cli) as ctx:
        expires = now_us() + expires_in * 86_400_000_000 if expires_in else None
        new = account_services.create_api_key(
            ctx,
            roles=Roles(admin, reader, writer),
            devices=device or [],
            groups=group or [],
            expires_us=expires,
            description=description,
            created_by="cli",
            watson_org=ctx.org_id if watson else None,
        )
        found = ctx.accounts.get_api_key(new.key)
    assert found is not None  # noqa: S101 - just made
    if json_out:
        out.print_json(json.dumps({**api_key_doc(found[0]), "password": new.password}))
        return
    out.print(f"created API key {new.key} (roles: {roles_text(found[0].roles)})", highlight=False)
    out.print(f"password (shown once): {new.password}", highlight=False)
    out.print(
        f"use it as HTTP Basic credentials, e.g. curl -u {new.key}:PASSWORD …/iotf/devices", highlight=False
    )


@apikeys_app.command("list")
def apikeys_list(cli: typer.Context, json_out: JsonOption = False) -> None:
    """List API keys (never their passwords)."""
    out = state(cli).out
    with opened(cli, read_only=True) as ctx:
        keys = ctx.accounts.list_api_keys()
    if json_out:
        out.print_json(json.dumps([api_key_doc(k) for k in keys]))
        return
    table = Table(
        Column("key", no_wrap=True, min_width=22),
        "roles",
        "devices",
        "groups",
        "expires",
        "lastUsed",
        "revoked",
        "description",
    )
    for k in keys:
        table.add_row(
            k.key,
            roles_text(k.roles),
            ", ".join(k.devices),
            ", ".join(k.groups),
            iso_text(k.expires_us),
            iso_text(k.last_used_us),
            iso_text(k.revoked_us),
            k.description,
        )
    out.print(table)


@apikeys_app.command("revoke")
def apikeys_revoke(cli: typer.Context, key: Annotated[str, typer.Argument(metavar="KEY")]) -> None:
    """Revoke an API key at once; it stays listed, marked revoked."""
    with opened(cli) as ctx:
        account_services.revoke_api_key(ctx, key)
    state(cli).out.print(f"revoked {key}", highlight=False)


@seed_app.command("import")
def seed_import(
    cli: typer.Context,
    users: Annotated[
        Path | None, typer.Option("--users", dir_okay=False, help="JSON of user documents.")
    ] = None,
    groups: Annotated[
        Path | None, typer.Option("--groups", dir_okay=False, help="JSON of userGroup documents.")
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Create the seed's users and groups; existing ones are left unchanged. Generated passwords
    are printed once."""
    if users is None and groups is None:
        raise typer.BadParameter("give --users, --groups or both")
    out = state(cli).out
    users_doc, groups_doc = read_json("--users", users), read_json("--groups", groups)
    with opened(cli) as ctx:
        report = account_services.import_seed(ctx, users_doc, groups_doc)
    if json_out:
        out.print_json(
            json.dumps(
                {
                    "groupsCreated": list(report.groups_created),
                    "groupsSkipped": list(report.groups_skipped),
                    "usersCreated": list(report.users_created),
                    "usersSkipped": list(report.users_skipped),
                    "passwords": dict(report.passwords),
                }
            )
        )
        return
    out.print(f"groups: {len(report.groups_created)} created, {len(report.groups_skipped)} already existed")
    out.print(f"users: {len(report.users_created)} created, {len(report.users_skipped)} already existed")
    for name, password in report.passwords.items():
        out.print(f"password of {name} (shown once): {password}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(apikeys_app, name="apikeys")
    app.add_typer(seed_app, name="seed")
